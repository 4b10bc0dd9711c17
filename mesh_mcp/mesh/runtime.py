"""The mesh at run time: `Mesh`, the one facade the node and the planes above call. It drives the pure gossip
with a clock and the transport, keeps this node's record in step with what it serves, and reaches peers
(`reach`, `dial`: `PeerUnreachable` is the one error for a peer that cannot be reached). Its other duties live
beside it, each in its own module: getting in and back in (`joining.py`), the mesh secret through its epochs
(`keys.py`), and which peers answer and how fast (`liveness.py`).

Streams it serves on authenticated connections (besides `record`, `rotate`, `evicted` and `ping`, served by
those modules):
- `gossip`: one gossip message (`{"t": "gossip", "m": ...}`), answered on new streams;
- `http`: an API request tunnelled to this node (see `tunnel.py`; the API reaches peers through
  `api/mesh_directory.py`). The record also carries this node's llama.cpp build (`llama_cpp_identity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from starlette.types import ASGIApp

from mesh_llamacpp import Pin, load_pin
from mesh_mcp.clock import SYSTEM_CLOCK, Clock
from mesh_mcp.errors import MeshLLMError, PeerUnreachable, ProtocolError
from mesh_mcp.mesh.identity import Identity

from ..state import NodeState
from . import meshfile, tunnel
from .demand_wire import Item as DemandItem
from .gossip import Gossip, GossipConfig, Outgoing
from .gossip_wire import Delta, message_to_wire
from .joining import Joiner
from .keys import Keys
from .liveness import SEND_TIMEOUT_S, Liveness
from .meshfile import MeshConfig
from .quic import MeshTransport
from .records import (
    MAX_MODELS,
    MAX_REQUESTS,
    NodeRecord,
    ServedModel,
    expert_shards,
    split_stages,
    tenths,
    unsigned,
)
from .rtt import RttTable
from .tokens import InviteToken, encode
from .transport import PeerConnection, TransportFactory
from .wire import close_quietly

log = logging.getLogger("mesh_llm.mesh")

IN_FLIGHT_PUBLISH_S = 1.0
INTENT_REFRESH_S = 30.0  # a loading intent is re-signed this often (serving/assign.py: stale after 90 s)
DEMAND_PUBLISH_S = 1.0  # a changed demand view is re-signed at most this often (each request changes it)
DemandProvider = Callable[[float], tuple[DemandItem, ...]]  # now -> this node's demand view (demand_wire.py)
# What a plane above counts per peer (`Mesh.peer_stats`): node id -> a number or {name: number}; read when asked
PeerStats = Callable[[], Mapping[str, object]]
GONE_SHOWN_S = 60.0  # a member that died or left stays in the console's view this long (the page fades it out)
MAX_GONE = 1024  # members remembered as recently gone, at most (the oldest forgotten first)


@dataclass
class MeshSettings:
    role: str = "host"  # host | worker | client | standby
    host: str = "0.0.0.0"  # interface the QUIC listener binds
    port: int = 0  # --bind-port; 0 = any
    advertise: tuple[str, ...] = ()  # hosts to put in tokens; default: this machine's addresses
    joins: tuple[InviteToken, ...] = ()
    gossip: GossipConfig = field(default_factory=GossipConfig)


def build_identity(pin: Pin) -> str:
    """What every node of one pipeline split must share: the pinned source (package version + a digest
    of its sha256 and those of our edits that change RPC behaviour), not the backend (CUDA hosts take CPU
    workers) nor the CPU flags or CPU-only edits (RPC compatibility is the protocol, not the ISA: an AMX host
    takes a Zen or ARM worker). Gossiped in each record (`llama_cpp`); placement leaves out nodes on another
    build."""
    edits = "\0".join(f"{e.file}\0{e.find}\0{e.replace}" for e in pin.edits if e.rpc)
    digest = hashlib.sha256(f"{pin.sha256}\0{edits}\0{pin.rpc_hash_threshold}".encode()).hexdigest()[:10]
    return f"{pin.package} {pin.version}+{digest}"


@functools.cache
def llama_cpp_identity() -> str:
    """This node's build identity (`build_identity` of the installed pin)."""
    return build_identity(load_pin())


def local_hosts(bound: str) -> tuple[str, ...]:
    """Addresses other machines may reach this node on (best effort, no network traffic)."""
    if bound not in ("0.0.0.0", "::", ""):
        return (bound,)
    hosts: list[str] = []
    try:
        hosts = [ip for ip in socket.gethostbyname_ex(socket.gethostname())[2] if not ip.startswith("127.")]
    except OSError:
        pass
    return (*hosts, "127.0.0.1")


class Mesh:
    def __init__(
        self,
        identity: Identity,
        config: MeshConfig,
        home: Path,
        state: NodeState,
        settings: MeshSettings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        transport: TransportFactory = MeshTransport,
    ) -> None:
        """`clock` and `transport` are seams: `mesh_mcp.testing` runs many meshes in one process on a fake clock
        and an in-memory network."""
        self.identity, self.config, self.home, self.state, self.settings = identity, config, home, state, settings
        self.clock = clock
        self.api_app: ASGIApp | None = None
        self.gossip: Gossip | None = None
        self.addresses: tuple[str, ...] = ()
        self._tg: TaskGroup | None = None
        self._published_in_flight = 0.0
        self._published_demand = -DEMAND_PUBLISH_S
        # This node's demand view for its record, set by the node (the serving plane's map); none by default.
        self.demand: DemandProvider = lambda now: ()
        self.rtt = RttTable()  # smoothed RTT to peers (ping streams); the nearest published in our record
        # Counters for the node's metrics (metrics/live.py reads them through `peer_table`; no metrics library here):
        # gossip rounds run, and what the planes above count, registered by them under the row key they fill —
        # per peer (`peer_stats`: the blackboard's sync age, the data plane's bytes) or for this node (`own_stats`:
        # rpc-server restarts). Only live members' rows carry them: bounded by membership.
        self.gossip_rounds = 0
        self.peer_stats: dict[str, PeerStats] = {}
        self.own_stats: dict[str, Callable[[], object]] = {}
        # For the console (api/console_view.py): when each member last joined, died or left (this clock), and the
        # last record of those that died or left within GONE_SHOWN_S, with how and when. Both bounded: entries go
        # with the gone member's minute, at most MAX_GONE of them.
        self.member_since: dict[str, float] = {}
        self._departed: dict[str, tuple[NodeRecord, str, float]] = {}
        self.ready = anyio.Event()
        self.joined = anyio.Event()  # a member: created or restarted in its mesh, or a join succeeded
        self.joiner, self.keys, self.liveness = Joiner(self), Keys(self), Liveness(self)
        self.transport = transport(
            self.keys.credentials(config),
            {
                "gossip": self._on_gossip,
                "record": self.joiner.on_record,
                "rotate": self.keys.on_rotate,
                "evicted": self.keys.on_evicted,
                "http": self._on_http,
                "ping": self.liveness.on_ping,
            },
            host=settings.host,
            port=settings.port,
            member_addresses=lambda: (a for r in self.members() for a in r.addresses),  # their hosts: reserved slots
        )

    # --- lifecycle ----------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        port = await self.transport.start()
        try:
            await self._run(port, task_status)
        finally:
            # Leave first (the transport still open), then close: cancellation reaches here only
            # after every task of `_run` has ended.
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(1.5):
                    await self._leave()
                await self.transport.close()

    async def _run(self, port: int, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            hosts = self.settings.advertise or local_hosts(self.settings.host)
            self.addresses = tuple(f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts)
            me = unsigned(
                self.identity.key,
                name=self.state.name[:128],
                addresses=self.addresses[:16],
                role=self.settings.role,
                capacity_bytes=int(self.state.hardware.get("capacity_bytes", 0)),
                software=f"mesh-llm {self.state.version}",
                llama_cpp=llama_cpp_identity(),
                models_served=self._served(),
                models_on_disk=self.state.models_on_disk[:256],
            )
            self.gossip = Gossip(me, self.identity.key, self.settings.gossip, random.Random(), self.clock.time())
            self.gossip.ban(self.config.evicted, self.clock.time())
            self.state.set_info(mesh_id=self.config.mesh_id_hex)
            if not self.settings.joins:
                self.joiner.on_joined()  # this node's own mesh (created or restarted in): no token to wait for
            log.info(
                "mesh %s: listening on UDP %d, reachable at %s",
                self.config.mesh_id_hex[:8],
                port,
                ", ".join(self.addresses),
            )
            if self.settings.joins:
                self.joiner.joining = len(self.settings.joins)
                tg.start_soon(self.joiner.join_all)
            tg.start_soon(self._ticker)
            tg.start_soon(self.joiner.rejoin)
            if self.settings.role != "client":
                tg.start_soon(self.liveness.pinger)
            self.ready.set()
            task_status.started()

    def invite_token(self) -> str:
        """The mesh's invite token, naming where a new node dials in: this node, or — for a client, which takes no
        part in gossip, so a node joining through it would learn no one — the members it knows."""
        addresses = self.addresses
        if self.settings.role == "client":
            members = [a for r in self.members() if r.role != "client" for a in r.addresses[:2]]
            joined_through = [a for token in self.settings.joins for a in token.addresses]
            addresses = tuple(dict.fromkeys(members + joined_through)) or addresses
        return encode(meshfile.to_token(self.config, addresses[:16]))

    async def _leave(self) -> None:
        self._tg = None  # nothing new is spawned from here on
        if self.gossip is None:
            return
        outs = self.gossip.leave(self.clock.time())
        # Clients are not gossip members but pull from us: tell every connected peer too.
        told = {o.peer for o in outs}
        note = message_to_wire(Delta((self.gossip.me,)))
        outs += [Outgoing(peer, note) for peer in self.transport.connections if peer not in told]
        log.info("leaving the mesh: telling %d peer(s)", len(outs))
        async with anyio.create_task_group() as tg:
            for out in outs:
                tg.start_soon(self._deliver, out)
        await anyio.sleep(0.2)  # let the packets leave before the connections close

    def spawn(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run `fn(*args)` in the mesh's task group; False (nothing started) once the mesh stopped or before it
        ran."""
        if self._tg is None:
            return False
        self._tg.start_soon(fn, *args)
        return True

    # --- reaching peers -----------------------------------------------------------------------------

    async def reach(self, node_id: str, within_s: float = SEND_TIMEOUT_S) -> PeerConnection:
        """An authenticated connection to `node_id`: the one open, or a dial of the addresses in its gossiped record
        within `within_s`. `PeerUnreachable` (with why) otherwise — the one error callers catch."""
        record = self.gossip.record(node_id) if self.gossip is not None else None
        try:
            with anyio.fail_after(within_s):
                return await self.transport.connect_any(node_id, record.addresses if record else ())
        except PeerUnreachable:
            raise
        except (OSError, TimeoutError, MeshLLMError) as exc:  # the transport's failures, translated here only
            why = f"no answer within {within_s:g}s" if isinstance(exc, TimeoutError) else str(exc)
            raise PeerUnreachable(f"node {node_id}: {why}") from exc

    async def dial(
        self, node_id: str, stream_type: str, within_s: float = SEND_TIMEOUT_S, **fields: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new stream of `stream_type` (the header `{"t": stream_type, **fields}`) to `node_id`, over the
        connection `reach` finds or dials. `PeerUnreachable` (with why) when it cannot be opened."""
        conn = await self.reach(node_id, within_s)
        try:
            return await conn.open_stream({"t": stream_type, **fields})
        except (ConnectionError, RuntimeError) as exc:  # a transport that reports a closed connection raw
            raise PeerUnreachable(f"node {node_id}: its connection closed ({exc or type(exc).__name__})") from exc

    # --- gossip -------------------------------------------------------------------------------------

    async def _ticker(self) -> None:
        assert self.gossip is not None
        interval = self.settings.gossip.interval_s
        while True:
            now = self.clock.time()
            self._sync_record(now)
            self.send(self.gossip.tick(now))
            self.gossip_rounds += 1
            self.log_events()
            await self.clock.sleep(interval)

    def _served(self) -> tuple[ServedModel, ...]:
        return served_models(self.state, MAX_MODELS)

    def _sync_record(self, now: float) -> None:
        """Re-sign our record when what we serve changed (in-flight and answered-request counts, decode speeds: at
        most once an `IN_FLIGHT_PUBLISH_S`)."""
        assert self.gossip is not None
        on_disk = self.state.models_on_disk[:256]
        if on_disk != self.gossip.me.models_on_disk:
            self.gossip.update_self(now, models_on_disk=on_disk)
        self._sync_demand(now)
        served = self._served()
        # A standby that serves a model (it promoted itself) is a host until it serves nothing again.
        role = "host" if self.settings.role == "standby" and any(m.state != "failed" for m in served) else None
        if self.gossip.me.role != (role or self.settings.role):
            self.gossip.update_self(now, role=role or self.settings.role)
        current = self.gossip.me.models_served
        if served == current:
            # A model downloading or loading is an intent others respect (no standby promotes to serve it) only while
            # it is fresh: re-sign at least every INTENT_REFRESH_S while one is under way.
            loading = any(m.state in ("downloading", "loading") for m in served)
            if loading and now - self.gossip.me.version / 1000 >= INTENT_REFRESH_S:
                self.gossip.update_self(now)
            return
        facts = [(m.name, m.state, m.tools, m.think, m.ctx, m.slots, m.stages) for m in served]
        states_changed = facts != [(m.name, m.state, m.tools, m.think, m.ctx, m.slots, m.stages) for m in current]
        if states_changed or now - self._published_in_flight >= IN_FLIGHT_PUBLISH_S:
            self._published_in_flight = now
            self.gossip.update_self(now, models_served=served, in_flight=sum(m.in_flight for m in served))

    def _sync_demand(self, now: float) -> None:
        """Re-sign our record when the demand view the provider gives changed, at most once a `DEMAND_PUBLISH_S`."""
        assert self.gossip is not None
        if now - self._published_demand < DEMAND_PUBLISH_S:
            return
        try:
            demand = self.demand(now)
            if demand != self.gossip.me.demand:
                self._published_demand = now
                self.gossip.update_self(now, demand=demand)
        except ValueError as exc:  # a view over the wire's limits (a bug upstream): gossip goes on without it
            self._published_demand = now
            log.warning("not publishing this node's demand view: %s", exc)

    def log_events(self) -> None:
        """Log what membership noticed since the last call; act on members that died or left."""
        assert self.gossip is not None
        for ev in self.gossip.drain_events():
            if ev.kind == "updated":
                log.debug("member %s updated its record", ev.node_id)
                continue
            self._remember_change(ev.node_id, ev.kind, ev.record)
            served = ", ".join(m.name for m in ev.record.models_served) or "no models"
            log.info("member %s (%s) %s; serves %s", ev.node_id, ev.record.name, ev.kind, served)
            if ev.kind in ("died", "left"):
                self.liveness.gone(ev.node_id, ev.kind)

    def _remember_change(self, node_id: str, kind: str, record: NodeRecord) -> None:
        now = self.clock.time()
        self.member_since[node_id] = now
        self._departed.pop(node_id, None)
        if kind in ("died", "left"):
            self._departed[node_id] = (record, "dead" if kind == "died" else "left", now)
            if len(self._departed) > MAX_GONE:
                oldest = next(iter(self._departed))
                del self._departed[oldest]
                self.member_since.pop(oldest, None)
        if len(self.member_since) > 4 * MAX_GONE:  # members forgotten without an event (evicted): keep the known
            known = {r.node_id for r in self.members()} | set(self._departed)
            self.member_since = {n: t for n, t in self.member_since.items() if n in known}

    def recently_gone(self) -> list[tuple[NodeRecord, str, float]]:
        """Members that died or left within `GONE_SHOWN_S`: (last record, "dead" | "left", when), oldest first."""
        cutoff = self.clock.time() - GONE_SHOWN_S
        for node_id in [n for n, (_, _, at) in self._departed.items() if at < cutoff]:
            del self._departed[node_id]
            self.member_since.pop(node_id, None)
        return list(self._departed.values())

    def send(self, outs: list[Outgoing]) -> None:
        """Deliver gossip messages, each in its own task."""
        for out in outs:
            self.spawn(self._deliver, out)

    async def _deliver(self, out: Outgoing) -> None:
        try:
            _, writer = await self.dial(out.peer, "gossip", m=out.message)
            close_quietly(writer)
        except PeerUnreachable as exc:
            log.debug("gossip to %s failed: %s", out.peer, exc)

    async def _on_gossip(
        self, conn: PeerConnection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert self.gossip is not None and conn.peer is not None
        message = header.get("m")
        if not isinstance(message, dict):
            raise ProtocolError("gossip stream without a message")
        self.send(self.gossip.receive(conn.peer.node_id, message, self.clock.time()))
        self.log_events()

    def members(self) -> list[NodeRecord]:
        return self.gossip.alive(self.clock.time()) if self.gossip is not None else []

    def peer_table(self) -> list[dict[str, object]]:
        """The members as `/api/status` shows them: who, where, what they serve, RTT measured here and gossiped; and
        what this node counts of each (`_counted`)."""
        rows: list[dict[str, object]] = [
            {
                "node_id": r.node_id,
                "name": r.name,
                "role": r.role,
                "addresses": list(r.addresses),
                "models": [m.name for m in r.models_served],
                "serving": [m.name for m in r.models_served if m.state == "serving"],
                "self": r.node_id == self.identity.node_id,
                "rtt_ms": None if (ms := self.rtt.get(r.node_id)) is None else round(ms, 1),
                "rtt_gossiped": {peer: tenths / 10 for peer, tenths in r.rtt},
                "llama_cpp": r.llama_cpp,
            }
            for r in self.members()
        ]
        self._counted(rows)
        return rows

    def _counted(self, rows: list[dict[str, object]]) -> None:
        """Add to each row what this node counts of that peer: `quic_bytes` {in, out} (the transport's, when it
        counts per peer) and each of `peer_stats`; to its own row `gossip_rounds` and each of `own_stats`."""
        me = self.identity.node_id
        stats: dict[str, Mapping[str, object]] = {k: fn() for k, fn in self.peer_stats.items()}
        per_peer = getattr(self.transport, "peer_traffic", None)  # the QUIC transport's; the in-memory one has none
        if callable(per_peer):
            stats["quic_bytes"] = {n: {"in": i, "out": o} for n, (i, o) in per_peer().items()}
        for row in rows:
            node_id = str(row["node_id"])
            if node_id == me:
                row["gossip_rounds"] = self.gossip_rounds
                row.update({key: fn() for key, fn in self.own_stats.items()})
                continue
            row.update({key: found[node_id] for key, found in stats.items() if node_id in found})

    # --- the API tunnelled to this node -------------------------------------------------------------

    async def _on_http(
        self, conn: PeerConnection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.api_app is None:
            raise ProtocolError("this node serves no API yet")
        await tunnel.serve(self.api_app, conn, header, reader, writer)

    # --- delegated: the secret (keys.py), liveness and RTT (liveness.py) ------------------------------

    def rotate(self, evict: Iterable[str] = (), add_owners: Iterable[str] = ()) -> str:
        """As an owner: rotate the mesh secret, evicting nodes or adding owners (`Keys.rotate`)."""
        return self.keys.rotate(evict, add_owners)

    def adopt(self, config: MeshConfig) -> None:
        """Make a verified rotation this node's (`Keys.adopt`)."""
        self.keys.adopt(config)

    async def ping(self, node_id: str, samples: int = 3) -> float:
        """Median round trip to `node_id` over the mesh, in ms (`Liveness.ping`)."""
        return await self.liveness.ping(node_id, samples)

    def keep_measuring(self, peers: Iterable[str]) -> contextlib.AbstractContextManager[None]:
        """Measure `peers` every few seconds for as long as this is held (`Liveness.keep_measuring`)."""
        return self.liveness.keep_measuring(peers)

    def is_gone(self, node_id: str) -> bool:
        """Whether gossip has declared `node_id` dead or left (`Liveness.is_gone`)."""
        return self.liveness.is_gone(node_id)

    def cancel_when_gone(self, node_id: str) -> contextlib.AbstractContextManager[anyio.CancelScope]:
        """A cancel scope cancelled when membership declares `node_id` gone (`Liveness.cancel_when_gone`)."""
        return self.liveness.cancel_when_gone(node_id)

    def _gone(self, node_id: str, how: str) -> None:
        self.liveness.gone(node_id, how)


def served_models(state: NodeState, limit: int) -> tuple[ServedModel, ...]:
    """This node's models as its record says them, from its live state (at most `limit`; stopped ones left out),
    with the requests their servers answered (`state.served`, the node's metrics). Those counts change with every
    request but reach the record only as `in_flight` does (`_sync_record`: at most once an `IN_FLIGHT_PUBLISH_S`)."""
    answered = state.served()
    return tuple(
        ServedModel(
            m.name[:128],
            m.state,
            m.in_flight,
            m.tools,
            m.size_bytes or 0,
            m.context or 0,
            m.slots or 0,
            split_stages(m.placement),
            tenths(m.measured_tok_s),
            tenths((m.placement or {}).get("predicted_tok_s")),
            expert_shards(m.placement),
            min(answered.get(m.name[:128], (0, 0))[0], MAX_REQUESTS),
            min(answered.get(m.name[:128], (0, 0))[1], MAX_REQUESTS),
            think=m.thinking,
        )
        for m in list(state.models.values())
        if m.state != "stopped"
    )[:limit]

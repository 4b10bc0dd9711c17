"""The mesh at run time: drives the pure gossip with a clock and the QUIC transport, joins
through invite tokens, keeps this node's record in step with what it serves, and is the API's
`Directory` (which other nodes serve what, and a tunnel to reach them).

Streams it serves on authenticated connections:
- `record`: a newly connected peer introduces itself (signed record both ways, and mesh epochs so
  a member that missed a key rotation gets the current secret);
- `gossip`: one gossip message (`{"t": "gossip", "m": ...}`), answered on new streams;
- `rotate`: the mesh secret after `mesh-llm rotate-key`, from a member;
- `http`: an API request tunnelled to this node (see `tunnel.py`);
- `ping`: answered at once with `{"t": "pong"}`. Every non-client node pings a few live members each
  second (`RttTable.due` says which: bounded, connected peers first) and publishes the nearest
  in its record (`rtt`); the record also carries this node's llama.cpp build (`llama_cpp_identity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from starlette.types import ASGIApp

from inference.errors import MeshLLMError, ProtocolError
from mesh_llamacpp import Pin, load_pin

from ..directory import RemoteModel
from ..identity import Identity
from ..state import NodeState
from ..upstream import Response, UpstreamUnavailable
from . import meshfile, tunnel, wire
from .gossip import Delta, Gossip, GossipConfig, Outgoing, message_to_wire
from .meshfile import MeshConfig
from .quic import Connection, Credentials, MeshTransport, close_quietly
from .records import NodeRecord, ServedModel, from_wire, to_wire, unsigned, verify
from .rtt import TICK_S, RttTable
from .tokens import InviteToken, encode
from .wire import encode_json, read_json

log = logging.getLogger("mesh_llm.mesh")

JOIN_RETRY_S = (0.5, 1, 2, 4, 8)
REJOIN_S = 2.0
PEERS_FILE = "peers.json"  # members last known, dialled again after a restart
SEND_TIMEOUT_S = 3.0
IN_FLIGHT_PUBLISH_S = 1.0


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
        self, identity: Identity, config: MeshConfig, home: Path, state: NodeState, settings: MeshSettings
    ) -> None:
        self.identity, self.config, self.home, self.state, self.settings = identity, config, home, state, settings
        self.api_app: ASGIApp | None = None
        self.transport = MeshTransport(
            Credentials(identity, config.mesh_id, config.secret, self._accepted),
            {
                "gossip": self._on_gossip,
                "record": self._on_record,
                "rotate": self._on_rotate,
                "http": self._on_http,
                "ping": self._on_ping,
            },
            host=settings.host,
            port=settings.port,
        )
        self.gossip: Gossip | None = None
        self.addresses: tuple[str, ...] = ()
        self._tg: TaskGroup | None = None
        self._published_in_flight = 0.0
        self._saved_peers: list[str] = []
        self.rtt = RttTable()  # smoothed RTT to peers (ping streams); the nearest published in our record
        self._rtt_keep: Counter[str] = Counter()  # peers a split watches: measured every few seconds
        self.ready = anyio.Event()

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
            self.gossip = Gossip(me, self.identity.key, self.settings.gossip, random.Random(), time.time())
            self.state.set_info(invite_token=self.invite_token(), mesh_id=self.config.mesh_id_hex)
            log.info(
                "mesh %s: listening on UDP %d, reachable at %s",
                self.config.mesh_id_hex[:8],
                port,
                ", ".join(self.addresses),
            )
            for token in self.settings.joins:
                tg.start_soon(self._join, token.addresses)
            tg.start_soon(self._ticker)
            tg.start_soon(self._rejoin)
            if self.settings.role != "client":
                tg.start_soon(self._pinger)
            self.ready.set()
            task_status.started()

    def invite_token(self) -> str:
        return encode(meshfile.to_token(self.config, self.addresses[:16]))

    async def _leave(self) -> None:
        self._tg = None  # nothing new is spawned from here on
        if self.gossip is None:
            return
        outs = self.gossip.leave(time.time())
        # Clients are not gossip members but pull from us: tell every connected peer too.
        told = {o.peer for o in outs}
        note = message_to_wire(Delta((self.gossip.me,)))
        outs += [Outgoing(peer, note) for peer in self.transport.connections if peer not in told]
        log.info("leaving the mesh: telling %d peer(s)", len(outs))
        async with anyio.create_task_group() as tg:
            for out in outs:
                tg.start_soon(self._deliver, out)
        await anyio.sleep(0.2)  # let the packets leave before the connections close

    # --- joining ------------------------------------------------------------------------------------

    async def _rejoin(self) -> None:
        """Alone in the mesh (everyone we knew left or died, or we restarted): dial the invite
        token's addresses and the members we last knew, until someone answers."""
        assert self.gossip is not None
        while True:
            await anyio.sleep(REJOIN_S)
            now = time.time()
            alive = [r for r in self.gossip.alive(now) if r.node_id != self.identity.node_id]
            if alive:
                self._save_peers(alive)
                continue
            known = [a for t in self.settings.joins for a in t.addresses] + self._load_peers()
            for address in dict.fromkeys(a for a in known if a not in self.addresses):
                with contextlib.suppress(OSError, MeshLLMError):
                    conn = await self.transport.connect(address)
                    await self._introduce(conn)
                    log.info("rejoined the mesh through %s", address)
                    break

    def _save_peers(self, alive: list[NodeRecord]) -> None:
        addresses = sorted({a for r in alive if r.role != "client" for a in r.addresses})[:64]
        if addresses != self._saved_peers:
            self._saved_peers = addresses
            with contextlib.suppress(OSError):
                (self.home / PEERS_FILE).write_text(json.dumps(addresses))

    def _load_peers(self) -> list[str]:
        try:
            data = json.loads((self.home / PEERS_FILE).read_text())
        except (OSError, ValueError):
            return []
        return [a for a in data if isinstance(a, str)][:64] if isinstance(data, list) else []

    async def _join(self, addresses: tuple[str, ...]) -> None:
        for attempt, delay in enumerate((*JOIN_RETRY_S, None)):
            try:
                conn = await self.transport.connect_any(None, addresses)
                await self._introduce(conn)
                assert conn.peer is not None
                log.info("joined the mesh through %s (%s)", conn.peer.node_id, conn.remote)
                return
            except MeshLLMError as exc:  # refused: retrying will not help
                log.error("could not join through %s: %s", ", ".join(addresses), exc)
                return
            except OSError as exc:
                if delay is None:
                    log.error("could not join through %s: %s", ", ".join(addresses), exc)
                    return
                log.warning("join attempt %d failed (%s); retrying in %ss", attempt + 1, exc, delay)
                await anyio.sleep(delay)

    async def _introduce(self, conn: Connection) -> None:
        """Exchange signed records (and mesh epochs) on a new connection."""
        assert self.gossip is not None
        reader, writer = await conn.open_stream(
            {"t": "record", "record": to_wire(self.gossip.me), "epoch": self.config.epoch}
        )
        writer.write_eof()
        reply = await read_json(reader)
        self._learn(conn, reply)

    def _learn(self, conn: Connection, msg: dict[str, Any]) -> None:
        assert self.gossip is not None and conn.peer is not None
        record = from_wire(msg.get("record"))
        verify(record)
        if record.node_id != conn.peer.node_id:
            raise ProtocolError("a peer introduced itself with another node's record")
        self._send(self.gossip.add_peer(record, time.time()))
        self._log_events()
        if wire.field(msg, "epoch", int) < self.config.epoch:
            self._spawn(self._push_secret, conn)

    async def _on_record(
        self, conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert self.gossip is not None
        writer.write(encode_json({"record": to_wire(self.gossip.me), "epoch": self.config.epoch}))
        writer.write_eof()
        self._learn(conn, header)

    # --- key rotation -------------------------------------------------------------------------------

    def _accepted(self, node_id: str | None) -> tuple[bytes, ...]:
        """Secrets a peer may prove: the current one; old ones only from known members."""
        known = node_id is not None and self.gossip is not None and self.gossip.record(node_id) is not None
        return self.config.accepted_secrets if known else (self.config.secret,)

    def rotate(self) -> str:
        """New mesh secret (old tokens stop admitting new nodes); members get it over the mesh."""
        self.adopt(meshfile.rotate(self.config))
        members = {r.node_id for r in self.members()} | set(self.transport.connections)  # clients too
        for node_id in members - {self.identity.node_id}:
            self._spawn(self._push_secret_to, node_id)
        return self.invite_token()

    def adopt(self, config: MeshConfig) -> None:
        meshfile.save(self.home, config)
        self.config = config
        self.transport.creds = Credentials(self.identity, config.mesh_id, config.secret, self._accepted)
        self.state.set_info(invite_token=self.invite_token())
        log.info("mesh secret is now epoch %d", config.epoch)

    async def _push_secret_to(self, node_id: str) -> None:
        assert self.gossip is not None
        record = self.gossip.record(node_id)
        try:
            conn = await self.transport.connect_any(node_id, record.addresses if record else ())
            await self._push_secret(conn)
        except (OSError, MeshLLMError) as exc:
            log.warning("could not give the new mesh secret to %s: %s", node_id, exc)

    async def _push_secret(self, conn: Connection) -> None:
        _, writer = await conn.open_stream(
            {"t": "rotate", "epoch": self.config.epoch, "secret": self.config.secret.hex()}
        )
        close_quietly(writer)

    async def _on_rotate(
        self, conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        epoch = wire.field(header, "epoch", int)
        secret = bytes.fromhex(wire.field(header, "secret", str, 64))
        if len(secret) != 32:
            raise ProtocolError("a mesh secret is 32 bytes")
        if epoch > self.config.epoch:
            previous = (self.config.secret, *self.config.previous_secrets)[: meshfile.MAX_PREVIOUS_SECRETS]
            self.adopt(MeshConfig(self.config.mesh_id, secret, epoch, previous))

    # --- gossip -------------------------------------------------------------------------------------

    async def _ticker(self) -> None:
        assert self.gossip is not None
        interval = self.settings.gossip.interval_s
        while True:
            now = time.time()
            self._sync_record(now)
            self._send(self.gossip.tick(now))
            self._log_events()
            await anyio.sleep(interval)

    def _served(self) -> tuple[ServedModel, ...]:
        return tuple(
            ServedModel(m.name[:128], m.state, m.in_flight, m.tools, m.size_bytes or 0, m.context or 0)
            for m in self.state.models.values()
            if m.state != "stopped"
        )[:256]

    async def _pinger(self) -> None:
        """Measure RTT to a few live members each tick; publish the nearest when they changed enough."""
        assert self.gossip is not None
        while True:
            await anyio.sleep(TICK_S)
            now = time.time()
            alive = [r.node_id for r in self.gossip.alive(now) if r.node_id != self.identity.node_id]
            self.rtt.prune(alive)
            batch = self.rtt.due(alive, self.transport.connections, now, keep=self._rtt_keep)
            async with anyio.create_task_group() as tg:
                for node_id in batch:
                    tg.start_soon(self._sample_rtt, node_id)
            if (rtt := self.rtt.report(time.time(), len(alive) + 1)) is not None:
                self.gossip.update_self(time.time(), rtt=rtt)

    @contextlib.contextmanager
    def keep_measuring(self, peers: Iterable[str]) -> Iterator[None]:
        """Measure `peers` every few seconds for as long as this is held (a split's workers)."""
        peers = list(peers)
        self._rtt_keep.update(peers)
        try:
            yield
        finally:
            self._rtt_keep.subtract(peers)
            self._rtt_keep = +self._rtt_keep

    async def _sample_rtt(self, node_id: str) -> None:
        try:
            with anyio.fail_after(SEND_TIMEOUT_S):
                self.rtt.observe(node_id, await self.ping(node_id), time.time())
        except (OSError, TimeoutError, MeshLLMError) as exc:
            log.debug("ping %s failed: %s", node_id, exc)

    async def ping(self, node_id: str, samples: int = 3) -> float:
        """Median round trip to `node_id` over the mesh (application level: a stream each), in ms."""
        record = self.gossip.record(node_id) if self.gossip is not None else None
        conn = await self.transport.connect_any(node_id, record.addresses if record else ())
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            reader, writer = await conn.open_stream({"t": "ping"})
            writer.write_eof()
            reply = await read_json(reader)
            times.append((time.perf_counter() - t0) * 1000)
            close_quietly(writer)
            if reply.get("t") != "pong":
                raise ProtocolError("a ping was not answered with a pong")
        return sorted(times)[len(times) // 2]

    async def _on_ping(
        self, conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(encode_json({"t": "pong"}))
        writer.write_eof()

    def _sync_record(self, now: float) -> None:
        """Re-sign our record when what we serve changed (in-flight counts at most once a second)."""
        assert self.gossip is not None
        on_disk = self.state.models_on_disk[:256]
        if on_disk != self.gossip.me.models_on_disk:
            self.gossip.update_self(now, models_on_disk=on_disk)
        served = self._served()
        current = self.gossip.me.models_served
        if served == current:
            return
        facts = [(m.name, m.state, m.tools, m.ctx) for m in served]
        states_changed = facts != [(m.name, m.state, m.tools, m.ctx) for m in current]
        if states_changed or now - self._published_in_flight >= IN_FLIGHT_PUBLISH_S:
            self._published_in_flight = now
            self.gossip.update_self(now, models_served=served, in_flight=sum(m.in_flight for m in served))

    def _log_events(self) -> None:
        assert self.gossip is not None
        for ev in self.gossip.drain_events():
            if ev.kind == "updated":
                log.debug("member %s updated its record", ev.node_id)
                continue
            served = ", ".join(m.name for m in ev.record.models_served) or "no models"
            log.info("member %s (%s) %s; serves %s", ev.node_id, ev.record.name, ev.kind, served)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._tg is not None:
            self._tg.start_soon(fn, *args)

    def _send(self, outs: list[Outgoing]) -> None:
        for out in outs:
            self._spawn(self._deliver, out)

    async def _deliver(self, out: Outgoing) -> None:
        assert self.gossip is not None
        record = self.gossip.record(out.peer)
        try:
            with anyio.fail_after(SEND_TIMEOUT_S):
                conn = await self.transport.connect_any(out.peer, record.addresses if record else ())
                _, writer = await conn.open_stream({"t": "gossip", "m": out.message})
                close_quietly(writer)
                conn.transmit()
        except (OSError, TimeoutError, MeshLLMError, ConnectionError) as exc:
            log.debug("gossip to %s failed: %s", out.peer, exc)

    async def _on_gossip(
        self, conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert self.gossip is not None and conn.peer is not None
        message = header.get("m")
        if not isinstance(message, dict):
            raise ProtocolError("gossip stream without a message")
        self._send(self.gossip.receive(conn.peer.node_id, message, time.time()))
        self._log_events()

    # --- the API's directory ------------------------------------------------------------------------

    def members(self) -> list[NodeRecord]:
        return self.gossip.alive(time.time()) if self.gossip is not None else []

    def remote_models(self) -> list[RemoteModel]:
        out: list[RemoteModel] = []
        for record in self.members():
            if record.node_id == self.identity.node_id or record.leaving:
                continue
            out.extend(
                RemoteModel(m.name, record.node_id, m.state, m.in_flight, m.tools, m.size_bytes, m.ctx)
                for m in record.models_served
            )
        return out

    async def open(
        self, node_id: str, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        record = self.gossip.record(node_id) if self.gossip is not None else None
        try:
            with anyio.fail_after(SEND_TIMEOUT_S):
                conn = await self.transport.connect_any(node_id, record.addresses if record else ())
        except (OSError, TimeoutError, MeshLLMError) as exc:
            raise UpstreamUnavailable(f"node {node_id}: {exc}") from exc
        return await tunnel.request(conn, method, target, headers, body)

    async def _on_http(
        self, conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.api_app is None:
            raise ProtocolError("this node serves no API yet")
        await tunnel.serve(self.api_app, conn, header, reader, writer)

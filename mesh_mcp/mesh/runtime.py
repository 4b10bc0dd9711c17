"""The mesh at run time: drives the pure gossip with a clock and the QUIC transport, joins
through invite tokens, keeps this node's record in step with what it serves, and is the API's
`Directory` (which other nodes serve what, and a tunnel to reach them).

Streams it serves on authenticated connections:
- `record`: a newly connected peer introduces itself (signed record both ways, mesh epochs so a member
  that missed a key rotation gets the owner-signed statements and the current secret, and the owners, for a
  node whose invite token did not name them);
- `gossip`: one gossip message (`{"t": "gossip", "m": ...}`), answered on new streams;
- `rotate`: owner-signed rotation statements and the new secret (`rotation.py`), over this connection only;
  refused and logged unless every statement checks out;
- `evicted`: the signed statements that removed this node (it stops rejoining and says so);
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

from mesh_llamacpp import Pin, load_pin
from mesh_mcp.api.directory import RemoteModel
from mesh_mcp.api.upstream import Response, UpstreamUnavailable
from mesh_mcp.clock import SYSTEM_CLOCK, Clock
from mesh_mcp.errors import (
    ConfigError,
    HandshakeRefused,
    JoinRefused,
    MeshLLMError,
    PeerUnreachable,
    ProtocolError,
    RotationRefused,
)
from mesh_mcp.mesh.identity import Identity

from ..state import NodeState
from . import meshfile, rotation, tunnel, wire
from .gossip import Delta, Gossip, GossipConfig, Outgoing, message_to_wire
from .meshfile import MeshConfig
from .quic import Connection, Credentials, MeshTransport, TransportFactory, close_quietly
from .records import NodeRecord, ServedModel, from_wire, to_wire, unsigned, verify
from .rtt import TICK_S, RttTable
from .tokens import InviteToken, encode
from .wire import encode_json, read_json

log = logging.getLogger("mesh_llm.mesh")

JOIN_RETRY_S = (0.5, 1, 2, 4, 8)
JOIN_REFUSALS = 3  # refused this many times, a join gives up: the process stops, saying why
NOTICE_TIMEOUT_S = 2.0  # an evicted node gets this long to read why before its connection closes
REJOIN_S = 2.0
PEERS_FILE = "peers.json"  # members last known, dialled again after a restart
SEND_TIMEOUT_S = 3.0
IN_FLIGHT_PUBLISH_S = 1.0
CONFIRM_S = 1.0  # a member declared dead has this long to answer a ping on its open connection before we act


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


def _node_id(text: str, option: str) -> str:
    """A node id given by the operator (16 hex characters, as `/api/status` shows them)."""
    node_id = text.strip().lower() if isinstance(text, str) else ""
    if len(node_id) != 16 or node_id.strip("0123456789abcdef"):
        raise ConfigError(f"{option} takes a node id: 16 hex characters, as in the peers of `/api/status`")
    return node_id


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
        self._evicted = frozenset(config.evicted)
        self.transport = transport(
            self._credentials(config),
            {
                "gossip": self._on_gossip,
                "record": self._on_record,
                "rotate": self._on_rotate,
                "evicted": self._on_evicted,
                "http": self._on_http,
                "ping": self._on_ping,
            },
            host=settings.host,
            port=settings.port,
            member_addresses=lambda: (a for r in self.members() for a in r.addresses),  # their hosts: reserved slots
        )
        self.gossip: Gossip | None = None
        self.addresses: tuple[str, ...] = ()
        self._tg: TaskGroup | None = None
        self._published_in_flight = 0.0
        self._saved_peers: list[str] = []
        self.rtt = RttTable()  # smoothed RTT to peers (ping streams); the nearest published in our record
        self._rtt_keep: Counter[str] = Counter()  # peers a split watches: measured every few seconds
        self._watching: dict[str, set[anyio.CancelScope]] = {}  # node id → scopes to cancel when it is gone
        self.ready = anyio.Event()
        self.joined = anyio.Event()  # a member: created or restarted in its mesh, or a join succeeded
        self._joining = 0  # join tasks still trying
        self._removed = False  # an owner evicted this node: it stops dialling the mesh
        self._rejoin_refusals: dict[str, str] = {}  # address → last refusal code logged (said once)

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
                self._on_joined()  # this node's own mesh (created or restarted in): no token to wait for
            log.info(
                "mesh %s: listening on UDP %d, reachable at %s",
                self.config.mesh_id_hex[:8],
                port,
                ", ".join(self.addresses),
            )
            if self.settings.joins:
                self._joining = len(self.settings.joins)
                tg.start_soon(self._join_all)
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

    # --- joining ------------------------------------------------------------------------------------

    async def _rejoin(self) -> None:
        """Alone in the mesh (everyone we knew left or died, or we restarted): dial the invite
        token's addresses and the members we last knew, until someone answers."""
        assert self.gossip is not None
        while True:
            await self.clock.sleep(REJOIN_S)
            now = self.clock.time()
            alive = [r for r in self.gossip.alive(now) if r.node_id != self.identity.node_id]
            if alive:
                self._save_peers(alive)
                continue
            if self._joining or self._removed:
                continue  # the join says how it went; an evicted node has nobody to dial
            known = [a for t in self.settings.joins for a in t.addresses] + self._load_peers()
            for address in dict.fromkeys(a for a in known if a not in self.addresses):
                try:
                    conn = await self.transport.connect(address)
                    await self._introduce(conn)
                except HandshakeRefused as exc:
                    self._rejoin_refused(address, exc)
                    if self._removed:
                        break
                    continue
                except (OSError, MeshLLMError):
                    continue
                self._rejoin_refusals.clear()
                self._on_joined()
                log.info("rejoined the mesh through %s", address)
                break

    def _rejoin_refused(self, address: str, exc: HandshakeRefused) -> None:
        """A member refused us while we dialled it to rejoin: say so once per address and reason."""
        if exc.code == "evicted":
            self._removed = True
            log.error("%s (told by %s); this node stops dialling the mesh", exc, address)
        elif self._rejoin_refusals.get(address) != exc.code:
            log.warning("could not rejoin the mesh through %s: %s", address, exc)
        self._rejoin_refusals[address] = exc.code

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

    async def _join_all(self) -> None:
        """Join through every token at once. If none got in and one was refused, stop the node (JoinRefused,
        the first refusal in words); if they were only unreachable, `_rejoin` keeps trying."""
        refusals: list[tuple[tuple[str, ...], HandshakeRefused]] = []

        async def one(addresses: tuple[str, ...]) -> None:
            try:
                refused = await self._join(addresses)
            finally:
                self._joining -= 1
            if refused is not None:
                refusals.append((addresses, refused))

        async with anyio.create_task_group() as tg:
            for token in self.settings.joins:
                tg.start_soon(one, token.addresses)
        if refusals and not self.joined.is_set():
            addresses, refused = refusals[0]
            raise JoinRefused(f"could not join the mesh through {', '.join(addresses)}: {refused}")

    async def _join(self, addresses: tuple[str, ...]) -> HandshakeRefused | None:
        """Dial the token's addresses until one lets us in (retrying unreachable ones a few times); a node
        refused `JOIN_REFUSALS` times gives up: the refusal is returned."""
        refused = 0
        for attempt, delay in enumerate((*JOIN_RETRY_S, None)):
            try:
                conn = await self.transport.connect_any(None, addresses)
                await self._introduce(conn)
                assert conn.peer is not None
                self._on_joined()
                log.info("joined the mesh through %s (%s)", conn.peer.node_id, conn.remote)
                return None
            except HandshakeRefused as exc:
                refused += 1
                if refused >= JOIN_REFUSALS or delay is None:
                    return exc
                log.warning("join attempt %d refused: %s; trying again in %ss", attempt + 1, exc, delay)
            except MeshLLMError as exc:  # a peer that speaks garbage: retrying will not help
                log.error("could not join through %s: %s", ", ".join(addresses), exc)
                return None
            except OSError as exc:
                if delay is None:
                    log.error("could not join through %s: %s", ", ".join(addresses), exc)
                    return None
                log.warning("join attempt %d failed (%s); retrying in %ss", attempt + 1, exc, delay)
            await self.clock.sleep(delay)
        return None

    def _on_joined(self) -> None:
        """This node is a member: its mesh.toml is written now (never for a join that was refused), and its
        invite token may be shown (the node waits for `joined`, prints it, then puts it in its status)."""
        if self.joined.is_set():
            return
        if self.settings.joins:
            meshfile.save(self.home, self.config)
        self.joined.set()

    def _introduction(self) -> dict[str, Any]:
        assert self.gossip is not None
        owners = [o.hex() for o in self.config.owners]
        return {"record": to_wire(self.gossip.me), "epoch": self.config.epoch, "owners": owners}

    async def _introduce(self, conn: Connection) -> None:
        """Exchange signed records (and mesh epochs, and owners) on a new connection."""
        reader, writer = await conn.open_stream({"t": "record", **self._introduction()})
        writer.write_eof()
        reply = await read_json(reader)
        self._learn(conn, reply)

    def _learn(self, conn: Connection, msg: dict[str, Any]) -> None:
        assert self.gossip is not None and conn.peer is not None
        record = from_wire(msg.get("record"))
        verify(record)
        if record.node_id != conn.peer.node_id:
            raise ProtocolError("a peer introduced itself with another node's record")
        self._send(self.gossip.add_peer(record, self.clock.time()))
        self._log_events()
        epoch = wire.field(msg, "epoch", int)
        if not self.config.owners:
            self._learn_owners(conn.peer.node_id, msg.get("owners"))
        if epoch < self.config.epoch:
            self._spawn(self._relay, conn, epoch)

    def _learn_owners(self, peer: str, owners: object) -> None:
        """A node that joined through a token naming no owners (protocol 1) takes them from the first member
        that tells it (trust on first use), so later rotations can be checked."""
        if not isinstance(owners, list) or not 1 <= len(owners) <= rotation.MAX_OWNERS:
            return
        try:
            keys = tuple(bytes.fromhex(o) for o in owners if isinstance(o, str) and len(o) == 64)
            config = meshfile.learn_owners(self.config, keys)
        except (ValueError, MeshLLMError):
            return
        if config == self.config:
            return
        self.config = config
        if self.joined.is_set():
            meshfile.save(self.home, config)
        log.info("mesh owners learned from %s: %s", peer, ", ".join(config.owner_ids))

    async def _on_record(
        self, conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(encode_json(self._introduction()))
        writer.write_eof()
        self._learn(conn, header)

    # --- key rotation -------------------------------------------------------------------------------

    def _credentials(self, config: MeshConfig) -> Credentials:
        return Credentials(
            self.identity,
            config.mesh_id,
            config.secret,
            self._accepted,
            epoch=config.epoch,
            previous=config.previous_secrets,
            evicted=frozenset(config.evicted),
        )

    def _accepted(self, node_id: str | None) -> tuple[bytes, ...]:
        """Secrets a peer may prove: the current one; old ones only from known members; none from evicted nodes
        (they are known no more, whatever record of theirs gossip still holds)."""
        if node_id is not None and node_id in self._evicted:
            return ()
        known = node_id is not None and self.gossip is not None and self.gossip.record(node_id) is not None
        return self.config.accepted_secrets if known else (self.config.secret,)

    def rotate(self, evict: Iterable[str] = (), add_owners: Iterable[str] = ()) -> str:
        """As an owner: a new mesh secret at the next epoch, signed (old tokens stop admitting new nodes); each
        member gets it over its own connection, evicted nodes never, and they are disconnected. ConfigError in
        words for a non-owner, a malformed or unknown node id. Returns the new invite token."""
        evicted = tuple(_node_id(n, "--evict") for n in evict)
        keys = tuple(self._public_key(_node_id(n, "--add-owner")) for n in add_owners)
        config, _ = meshfile.owner_rotate(self.config, self.identity.key, evict=evicted, add_owners=keys)
        self.adopt(config)
        members = {r.node_id for r in self.members()} | set(self.transport.connections)  # clients too
        for node_id in members - {self.identity.node_id} - set(config.evicted):
            self._spawn(self._push_secret_to, node_id)
        return self.invite_token()

    def _public_key(self, node_id: str) -> bytes:
        record = self.gossip.record(node_id) if self.gossip is not None else None
        if record is None or record.role == "client":
            raise ConfigError(
                f"node {node_id} is not a member this node knows, so its key is unknown: an owner must be a "
                "member (not a client) that is in the mesh now; see the peers in `/api/status`"
            )
        return record.public_key

    def adopt(self, config: MeshConfig) -> None:
        """Make `config` (a verified rotation) this node's: saved, proven with, and evictions acted on."""
        newly = [n for n in config.evicted if n not in self._evicted]
        meshfile.save(self.home, config)
        self.config = config
        self._evicted = frozenset(config.evicted)
        self.transport.creds = self._credentials(config)
        if self.joined.is_set():
            self.state.set_info(invite_token=self.invite_token())
        log.info("mesh secret is now epoch %d", config.epoch)
        if newly and self._tg is not None:
            self._spawn(self._evict, newly)  # tell them first: gossip's ban closes their connections
        else:
            self._ban()

    def _ban(self) -> None:
        if self.gossip is not None:
            self.gossip.ban(self.config.evicted, self.clock.time())
            self._log_events()

    async def _evict(self, node_ids: list[str]) -> None:
        """Tell evicted nodes why (the signed statements: they can check them, nobody can forge them), close
        their connections with a reason, then drop them from membership for good (a bounded few seconds)."""
        chain = [rotation.to_hex(r) for r in self.config.rotations]

        async def tell(node_id: str, conn: Connection) -> None:
            with anyio.move_on_after(NOTICE_TIMEOUT_S), contextlib.suppress(OSError, MeshLLMError, ConnectionError):
                reader, writer = await conn.open_stream({"t": "evicted", "chain": chain})
                writer.write_eof()
                await read_json(reader)
            conn.close(error_code=0x1, reason_phrase="removed from the mesh by an owner")

        try:
            async with anyio.create_task_group() as tg:
                for node_id in node_ids:
                    conns = list(self.transport.connections.get(node_id, ()))
                    if conns:
                        log.warning("node %s was evicted from the mesh: closing its connection(s)", node_id)
                    for conn in conns:
                        tg.start_soon(tell, node_id, conn)
        finally:
            self._ban()

    async def _push_secret_to(self, node_id: str) -> None:
        try:
            with anyio.fail_after(SEND_TIMEOUT_S * 2):
                await self._push_secret(await self.reach(node_id))
        except (OSError, TimeoutError, MeshLLMError, ConnectionError) as exc:
            log.warning("could not give the new mesh secret to %s: %s", node_id, exc)

    async def _relay(self, conn: Connection, epoch: int) -> None:
        """A peer introduced itself at an older epoch: give it the signed statements since and the secret,
        unless it was evicted or is too far behind for the statements kept."""
        assert conn.peer is not None
        if conn.peer.node_id in self._evicted:
            return
        if self.config.chain_since(epoch) is None:
            who, now = conn.peer.node_id, self.config.epoch
            log.info("member %s is at epoch %d, too far behind this mesh's %d to catch up", who, epoch, now)
            return
        with contextlib.suppress(OSError, TimeoutError, MeshLLMError, ConnectionError):
            with anyio.fail_after(SEND_TIMEOUT_S * 2):
                await self._push_secret(conn)

    async def _push_secret(self, conn: Connection) -> None:
        """The kept statements and the current secret, on this peer's own authenticated, encrypted connection
        (never gossiped); the answer says whether it took them."""
        assert conn.peer is not None
        if conn.peer.node_id in self._evicted:
            return
        chain = [rotation.to_hex(r) for r in self.config.rotations]
        if not chain:
            return  # nothing signed to show (a mesh never rotated since owners existed)
        reader, writer = await conn.open_stream({"t": "rotate", "chain": chain, "secret": self.config.secret.hex()})
        writer.write_eof()
        reply = await read_json(reader)
        if reply.get("t") == "rotate-refused":
            log.warning("member %s refused the key rotation: %s", conn.peer.node_id, str(reply.get("reason"))[:200])

    def _parse_chain(self, header: dict[str, Any]) -> tuple[rotation.Rotation, ...]:
        items = wire.field(header, "chain", list, rotation.MAX_CHAIN)
        return tuple(rotation.from_hex(item) for item in items)

    async def _on_rotate(
        self, conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Statements and a secret from a peer: adopted only if every new statement checks out (this mesh,
        epoch exactly one more each, signed by an owner as of the epoch before, the secret matching the last
        one's hash). Anything else is refused and logged with the peer's node id; nothing changes."""
        assert conn.peer is not None
        peer = conn.peer.node_id
        try:
            chain = self._parse_chain(header)
            if chain and self.config.rotations and chain[-1] == self.config.rotations[-1]:
                config = self.config  # this epoch's statement, which we have (two members told us at once)
            else:
                secret = bytes.fromhex(wire.field(header, "secret", str, 64))
                config = meshfile.advance(self.config, chain, secret)
        except (RotationRefused, ValueError, ProtocolError) as exc:
            log.warning("refused a key rotation from node %s: %s", peer, exc)
            writer.write(encode_json({"t": "rotate-refused", "reason": str(exc)[:300]}))
            writer.write_eof()
            return
        writer.write(encode_json({"t": "rotated", "epoch": config.epoch}))
        writer.write_eof()
        if config is self.config:
            return
        if self.identity.node_id in config.evicted:  # a valid statement removing us: never adopt its secret
            self._was_evicted(peer, config.rotations[-1])
            return
        self.adopt(config)
        signer = config.rotations[-1].signer_id
        log.info("key rotation to epoch %d by owner %s, received from %s", config.epoch, signer, peer)

    async def _on_evicted(
        self, conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """An eviction notice: believed only if signed statements newer than our epoch evict this node."""
        assert conn.peer is not None
        try:
            chain = tuple(r for r in self._parse_chain(header) if r.epoch > self.config.epoch)
            rotation.check_chain(chain, mesh_id=self.config.mesh_id, epoch=self.config.epoch, owners=self.config.owners)
            mine = [r for r in chain if self.identity.node_id in r.evicted]
            if not mine:
                raise RotationRefused("the statements do not evict this node")
        except (RotationRefused, ProtocolError) as exc:
            log.warning("refused an eviction notice from node %s: %s", conn.peer.node_id, exc)
            return
        finally:
            writer.write(encode_json({"t": "ok"}))
            writer.write_eof()
        self._was_evicted(conn.peer.node_id, mine[-1])

    def _was_evicted(self, peer: str, statement: rotation.Rotation) -> None:
        if self._removed:
            return
        self._removed = True
        log.error(
            "this node was removed from mesh %s by its owner %s (key rotation to epoch %d, told by %s): members "
            "refuse it from now on; ask an owner of the mesh if that was a mistake",
            self.config.mesh_id_hex[:8],
            statement.signer_id,
            statement.epoch,
            peer,
        )

    # --- gossip -------------------------------------------------------------------------------------

    async def _ticker(self) -> None:
        assert self.gossip is not None
        interval = self.settings.gossip.interval_s
        while True:
            now = self.clock.time()
            self._sync_record(now)
            self._send(self.gossip.tick(now))
            self._log_events()
            await self.clock.sleep(interval)

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
            await self.clock.sleep(TICK_S)
            now = self.clock.time()
            alive = [r.node_id for r in self.gossip.alive(now) if r.node_id != self.identity.node_id]
            self.rtt.prune(alive)
            batch = self.rtt.due(alive, self.transport.connections, now, keep=self._rtt_keep)
            async with anyio.create_task_group() as tg:
                for node_id in batch:
                    tg.start_soon(self._sample_rtt, node_id)
            if (rtt := self.rtt.report(self.clock.time(), len(alive) + 1)) is not None:
                self.gossip.update_self(self.clock.time(), rtt=rtt)

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
                self.rtt.observe(node_id, await self.ping(node_id), self.clock.time())
        except (OSError, TimeoutError, MeshLLMError) as exc:
            log.debug("ping %s failed: %s", node_id, exc)

    async def reach(self, node_id: str, within_s: float = SEND_TIMEOUT_S) -> Connection:
        """An authenticated connection to `node_id`: the one open, or a dial of the addresses in its gossiped record
        within `within_s`. `PeerUnreachable` (with why) otherwise — the one error callers catch."""
        record = self.gossip.record(node_id) if self.gossip is not None else None
        try:
            with anyio.fail_after(within_s):
                return await self.transport.connect_any(node_id, record.addresses if record else ())
        except PeerUnreachable:
            raise
        except (OSError, TimeoutError, MeshLLMError) as exc:
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
        except (ConnectionError, RuntimeError) as exc:  # the connection closed under us
            raise PeerUnreachable(f"node {node_id}: its connection closed ({exc or type(exc).__name__})") from exc

    async def ping(self, node_id: str, samples: int = 3) -> float:
        """Median round trip to `node_id` over the mesh (application level: a stream each), in ms."""
        conn = await self.reach(node_id)
        times = sorted([await _ping_once(conn) for _ in range(samples)])
        return times[len(times) // 2]

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
            if ev.kind in ("died", "left"):
                self._gone(ev.node_id, ev.kind)

    def _gone(self, node_id: str, how: str) -> None:
        """Act on a member declared dead (or gone) at once, instead of waiting out QUIC's idle timeout: close its
        connections, so every stream on them fails now (in-flight requests end with an error, leases it held
        end), and cancel whatever waits on it (`cancel_when_gone`: dials, leases). A member that left said so; one
        declared dead while we hold a connection to it must first fail to answer a ping on it within
        `CONFIRM_S` (`_confirm_gone`): on a loaded machine gossip can be late while the node and its streams are
        fine, and cutting them would turn a slow heartbeat into failed requests."""
        if how == "died" and self.transport.connection(node_id) is not None and self._tg is not None:
            self._spawn(self._confirm_gone, node_id)
            return
        self._act_gone(node_id, how)

    async def _confirm_gone(self, node_id: str) -> None:
        """While membership holds `node_id` dead: act once it stops answering pings on its connection (checked
        every `CONFIRM_S`); stop watching if it revives."""
        told = False
        while self.is_gone(node_id):
            conn = self.transport.connection(node_id)
            if conn is None or not await self._answers(conn):
                self._act_gone(node_id, "died")
                return
            if not told:
                told = True
                log.warning(
                    "member %s was declared dead but answers on its connection (a busy machine?): its streams go on",
                    node_id,
                )
            await self.clock.sleep(CONFIRM_S)

    async def _answers(self, conn: Connection) -> bool:
        """Whether the peer answers a ping on this connection within `CONFIRM_S`."""
        try:
            with anyio.fail_after(CONFIRM_S):
                await _ping_once(conn)
            return True
        except (TimeoutError, ConnectionError, RuntimeError, MeshLLMError, asyncio.IncompleteReadError):
            return False

    def _act_gone(self, node_id: str, how: str) -> None:
        conns = list(self.transport.connections.get(node_id, ()))
        for conn in conns:
            conn.abort(f"member {how}")
        scopes = self._watching.get(node_id, set())
        for scope in scopes:
            scope.cancel()
        if conns or scopes:
            log.info(
                "member %s %s: closed %d connection(s), ended %d wait(s) on it", node_id, how, len(conns), len(scopes)
            )

    def is_gone(self, node_id: str) -> bool:
        """Whether gossip has declared `node_id` dead or left (a node it never knew is not gone)."""
        gossip = self.gossip
        return (
            gossip is not None
            and gossip.record(node_id) is not None
            and not gossip.is_alive(node_id, self.clock.time())
        )

    @contextlib.contextmanager
    def cancel_when_gone(self, node_id: str) -> Iterator[anyio.CancelScope]:
        """A cancel scope that is cancelled when membership declares `node_id` dead or gone (at once if it is
        already): what waits on a peer — a dial, a lease it holds — ends within the detection time.
        `scope.cancel_called` tells the caller why it ended."""
        with anyio.CancelScope() as scope:
            self._watching.setdefault(node_id, set()).add(scope)
            try:
                if self.is_gone(node_id):
                    scope.cancel()
                yield scope
            finally:
                scopes = self._watching.get(node_id)
                if scopes is not None:
                    scopes.discard(scope)
                    if not scopes:
                        del self._watching[node_id]

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._tg is not None:
            self._tg.start_soon(fn, *args)

    def _send(self, outs: list[Outgoing]) -> None:
        for out in outs:
            self._spawn(self._deliver, out)

    async def _deliver(self, out: Outgoing) -> None:
        try:
            with anyio.fail_after(SEND_TIMEOUT_S):
                conn = await self.reach(out.peer)
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
        self._send(self.gossip.receive(conn.peer.node_id, message, self.clock.time()))
        self._log_events()

    # --- the API's directory ------------------------------------------------------------------------

    def members(self) -> list[NodeRecord]:
        return self.gossip.alive(self.clock.time()) if self.gossip is not None else []

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
        """A request to `node_id` through the tunnel, answered once its head arrives. UpstreamUnavailable (the
        proxy tries the next server) at once for a node membership holds dead, and as soon as it is declared dead
        while we dial it or wait for the head."""
        if self.is_gone(node_id):
            raise UpstreamUnavailable(f"node {node_id} is not reachable: the mesh declared it dead or gone")
        with self.cancel_when_gone(node_id):
            try:
                conn = await self.reach(node_id)
            except PeerUnreachable as exc:
                raise UpstreamUnavailable(str(exc)) from exc
            return await tunnel.request(conn, method, target, headers, body)
        raise UpstreamUnavailable(f"node {node_id} was declared dead before it answered")

    async def _on_http(
        self, conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self.api_app is None:
            raise ProtocolError("this node serves no API yet")
        await tunnel.serve(self.api_app, conn, header, reader, writer)


async def _ping_once(conn: Connection) -> float:
    """One `ping` stream on `conn`: the round trip in ms (`ProtocolError` unless a pong comes back)."""
    t0 = time.perf_counter()
    reader, writer = await conn.open_stream({"t": "ping"})
    writer.write_eof()
    try:
        reply = await read_json(reader)
    finally:
        close_quietly(writer)
    if reply.get("t") != "pong":
        raise ProtocolError("a ping was not answered with a pong")
    return (time.perf_counter() - t0) * 1000

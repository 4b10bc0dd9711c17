"""An in-memory mesh network: many nodes' transports in one process, with per-link latency, loss, partitions and
killed nodes, satisfying `mesh_mcp.mesh.transport.Transport` (`Mesh(..., transport=network.transport)`).

A connection opens only where `handshake.py`'s exchange succeeds between the two nodes' credentials (run as is,
without TLS): a wrong or old secret, another mesh or an evicted node is refused with the same `HandshakeRefused`
(and code) the QUIC transport raises. Streams are real `asyncio.StreamReader`/`StreamWriter` pairs fed by a small
write transport: each write reaches the peer after its link's latency on the network's clock (in order), is lost
with its link's probability (the stream then fails both ways), and is dropped while a partition or a kill
separates the two nodes. Dials across a partition fail at once with an OSError (`Mesh.reach` makes it
`PeerUnreachable`); a connection that cannot deliver ends after `idle_timeout_s`, as a QUIC one does.

One responsibility, a little over 400 lines: the network, its connections and their streams are one wire model
(a stream end needs its connection's state and the network's conditions at every write), kept together.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mesh_mcp.clock import SYSTEM_CLOCK, Clock
from mesh_mcp.errors import AuthError, HandshakeRefused, MeshLLMError
from mesh_mcp.mesh import handshake as hs
from mesh_mcp.mesh.admission import source_ip
from mesh_mcp.mesh.credentials import Credentials
from mesh_mcp.mesh.quic import HANDSHAKE_TIMEOUT_S, IDLE_TIMEOUT_S
from mesh_mcp.mesh.tokens import split_address
from mesh_mcp.mesh.transport import PeerConnection, StreamHandler, Traffic, dial_any, serve_stream
from mesh_mcp.mesh.wire import encode_json

log = logging.getLogger("mesh_llm.memnet")

FIRST_PORT = 40000


@dataclass(frozen=True)
class Link:
    latency_s: float = 0.0  # one way, per write
    loss: float = 0.0  # probability that a write is lost (its stream fails)


class MemoryNetwork:
    """The wire between in-memory transports: who listens where, link conditions, partitions and kills."""

    def __init__(
        self,
        clock: Clock = SYSTEM_CLOCK,
        *,
        latency_s: float = 0.0,
        loss: float = 0.0,
        seed: int = 0,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.clock, self.idle_timeout_s = clock, idle_timeout_s
        self.default = Link(latency_s, loss)
        self.random = random.Random(seed)
        self._links: dict[frozenset[str], Link] = {}
        self._cuts: set[frozenset[str]] = set()
        self._killed: set[str] = set()
        self._listeners: dict[int, MemoryTransport] = {}
        self._ports = itertools.count(FIRST_PORT)
        self._open: set[MemoryConnection] = set()  # the dialling ends of open connections
        self._tasks: set[asyncio.Task[None]] = set()

    def transport(
        self,
        creds: Credentials,
        handlers: dict[str, StreamHandler],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        member_addresses: Callable[[], Iterable[str]] = tuple,
        **_: Any,
    ) -> MemoryTransport:
        """A transport on this network (the `TransportFactory` a `Mesh` takes)."""
        return MemoryTransport(self, creds, handlers, host=host, port=port, member_addresses=member_addresses)

    # --- conditions -----------------------------------------------------------------------------------

    def link(self, a: str, b: str) -> Link:
        return self._links.get(frozenset((a, b)), self.default)

    def set_link(self, a: str, b: str, *, latency_s: float | None = None, loss: float | None = None) -> None:
        """Conditions between nodes `a` and `b` (node ids), both ways."""
        now = self.link(a, b)
        self._links[frozenset((a, b))] = Link(
            now.latency_s if latency_s is None else latency_s, now.loss if loss is None else loss
        )

    def reachable(self, a: str, b: str) -> bool:
        return frozenset((a, b)) not in self._cuts and a not in self._killed and b not in self._killed

    def partition(self, side_a: Iterable[str], side_b: Iterable[str]) -> None:
        """Nodes of `side_a` and `side_b` stop hearing each other (until `heal`)."""
        side_b = list(side_b)
        self._cuts.update(frozenset((a, b)) for a in side_a for b in side_b if a != b)
        self._expire_cut()

    def heal(self) -> None:
        """Every partition ends (killed nodes stay dead)."""
        self._cuts.clear()

    def kill(self, node_id: str) -> None:
        """The node goes silent at once, as a machine that lost power: nothing it sends arrives, nothing reaches it,
        its peers' connections to it end by idle timeout."""
        self._killed.add(node_id)
        self._expire_cut()

    def _expire_cut(self) -> None:
        for conn in list(self._open):
            if conn.other is not None and not self.reachable(conn.node_id, conn.other.node_id):
                self.spawn(self._idle_timeout(conn))

    async def _idle_timeout(self, conn: MemoryConnection) -> None:
        await self.clock.sleep(self.idle_timeout_s)
        other = conn.other
        if other is not None and not self.reachable(conn.node_id, other.node_id):
            conn.terminate("idle timeout")
            other.terminate("idle timeout")

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- listening and dialling -----------------------------------------------------------------------

    def _listen(self, transport: MemoryTransport, port: int) -> int:
        if port == 0:
            port = next(p for p in self._ports if p not in self._listeners)
        if port in self._listeners:
            raise OSError(f"port {port} is in use on the memory network")
        self._listeners[port] = transport
        return port

    def _unlisten(self, transport: MemoryTransport) -> None:
        if self._listeners.get(transport.port) is transport:
            del self._listeners[transport.port]

    async def _dial(self, client: MemoryTransport, address: str) -> MemoryConnection:
        try:
            port = split_address(address)[1]
        except MeshLLMError as exc:
            raise OSError(f"cannot reach {address}: {exc}") from exc
        server = self._listeners.get(port)
        if server is None:
            raise OSError(f"cannot reach {address}: nothing listens there")
        a, b = client.node_id, server.node_id
        if (latency := self.link(a, b).latency_s) > 0:
            await self.clock.sleep(2 * latency)  # TLS and the mesh handshake: about two round trips
        if not self.reachable(a, b) or self._listeners.get(port) is not server:
            raise OSError(f"no answer from {address} within {HANDSHAKE_TIMEOUT_S:.0f}s")
        client_peer, server_peer = authenticate(client.creds, server.creds)
        mine, theirs = MemoryConnection(client, address, 0), MemoryConnection(server, client.address, 1)
        mine.other, theirs.other = theirs, mine
        server.register(theirs, client_peer)
        client.register(mine, server_peer)
        self._open.add(mine)
        return mine

    # --- carrying bytes -------------------------------------------------------------------------------

    def carry(self, src: MemoryConnection, end: _End, item: bytes | None) -> None:
        """A write (None: the end of the stream) from `src` towards the stream end `end`."""
        dst = end.conn
        link = self.link(src.node_id, dst.node_id)
        if not self.reachable(src.node_id, dst.node_id):
            return
        src.transport_owner.traffic.add_out(len(item or b""))
        if link.loss and self.random.random() < link.loss:
            end.fail(ConnectionResetError("lost on the memory network"))
            if end.twin is not None:
                end.twin.fail(ConnectionResetError("lost on the memory network"))
            return
        if link.latency_s <= 0 and not end.inbox:
            self._deliver(src, end, item)
            return
        end.inbox.append((self.clock.monotonic() + link.latency_s, item))
        if not end.pumping:
            end.pumping = True
            self.spawn(self._pump(src, end))

    async def _pump(self, src: MemoryConnection, end: _End) -> None:
        try:
            while end.inbox:
                due, item = end.inbox[0]
                if (wait := due - self.clock.monotonic()) > 0:
                    await self.clock.sleep(wait)
                end.inbox.popleft()
                if self.reachable(src.node_id, end.conn.node_id):
                    self._deliver(src, end, item)
        finally:
            end.pumping = False

    def _deliver(self, src: MemoryConnection, end: _End, item: bytes | None) -> None:
        if end.conn.closed or end.eof:
            return
        end.conn.transport_owner.traffic.add_in(len(item or b""))
        end.conn.accept(end)
        if item is None:
            end.eof = True
            end.reader.feed_eof()
        else:
            end.reader.feed_data(item)


def authenticate(client: Credentials, server: Credentials) -> tuple[hs.Peer, hs.Peer]:
    """`handshake.py`'s exchange between two nodes' credentials, as the QUIC transport runs it (without TLS):
    (the client as the server knows it, the server as the client knows it). A refusal raises on the client's
    side as there: `HandshakeRefused` with the server's code (the server logs why), or `AuthError`."""
    me_c, me_s = client.identity, server.identity
    nonce_c, nonce_s = hs.nonce(), hs.nonce()
    client_peer: hs.Peer | None = None
    try:
        hs.check_hello(hs.hello(client.mesh_id, nonce_c), server.mesh_id)
        reply = hs.challenge(nonce_s)
    except AuthError as exc:
        reply = _refusal(exc, server)
    hs.check_challenge(reply)
    t = hs.transcript(client.mesh_id, nonce_c, nonce_s, me_s.public_bytes, me_c.public_bytes)
    auth = hs.proof("auth", me_c.key, me_c.public_bytes, client.secret, t)
    try:
        t_server = hs.transcript(server.mesh_id, nonce_c, nonce_s, me_s.public_bytes, hs.parse_public_key(auth))
        claimed = auth.get("node_id") if isinstance(auth.get("node_id"), str) else None
        accepted = server.accepted(claimed)  # type: ignore[arg-type]
        client_peer = hs.check_auth(auth, t_server, accepted=accepted, previous=server.previous, evicted=server.evicted)
        welcome = hs.proof("welcome", me_s.key, me_s.public_bytes, server.secret, t_server)
    except AuthError as exc:
        welcome = _refusal(exc, server)
    server_peer = hs.check_proof("welcome", welcome, client.accepted(None) or (client.secret,), t)
    if server_peer.node_id in client.evicted:
        raise AuthError(f"node {server_peer.node_id} was removed from this mesh; not connecting to it")
    assert client_peer is not None
    return client_peer, server_peer


def _refusal(exc: AuthError, server: Credentials) -> dict[str, object]:
    log.info("node %s refused a connection: %s", server.identity.node_id, exc)
    code = exc.code if isinstance(exc, HandshakeRefused) else "bad-secret"
    return hs.refused("authentication failed", code, server.epoch)


class _WriteTransport(asyncio.Transport):
    """The sending half of one stream end: writes go to the network, towards the twin end."""

    def __init__(self, end: _End) -> None:
        super().__init__()
        self._end = end
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._end.stream_id if name == "stream_id" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        end = self._end
        if not self._closing and not end.conn.closed and end.twin is not None:
            end.conn.network.carry(end.conn, end.twin, bytes(data))

    def write_eof(self) -> None:
        end = self._end
        if self._closing:
            return
        self._closing = True
        if not end.conn.closed and end.twin is not None:
            end.conn.network.carry(end.conn, end.twin, None)

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.write_eof()

    def abort(self) -> None:
        self._closing = True

    def is_closing(self) -> bool:
        end = self._end
        return self._closing or end.conn.closed or not end.served  # nobody holds an unserved end's writer


class _End:
    """One connection's end of one stream: its reader, its writer, and what is on the way to it."""

    def __init__(self, conn: MemoryConnection, stream_id: int) -> None:
        self.conn, self.stream_id = conn, stream_id
        self.reader = asyncio.StreamReader()
        self.transport = _WriteTransport(self)
        protocol = asyncio.StreamReaderProtocol(self.reader)
        self.writer = asyncio.StreamWriter(self.transport, protocol, self.reader, asyncio.get_running_loop())
        self.twin: _End | None = None
        self.inbox: deque[tuple[float, bytes | None]] = deque()
        self.pumping = False
        self.eof = False
        self.served = False  # the opener's end, or an accepted one whose handler started

    def fail(self, exc: Exception) -> None:
        self.transport.abort()
        self.reader.set_exception(exc)
        self.conn.stream_closed(self.stream_id).set()


class MemoryConnection:
    """One end of an authenticated in-memory connection (a `PeerConnection`)."""

    def __init__(self, owner: MemoryTransport, remote: str, parity: int) -> None:
        self.transport_owner, self.network = owner, owner.network
        self.node_id = owner.node_id
        self.remote = remote
        self.peer: hs.Peer | None = None
        self.other: MemoryConnection | None = None
        self.closed = False
        self.closed_event = asyncio.Event()
        self.close_reason = ""
        self._ids = itertools.count(parity, 4)  # QUIC's numbering: bidirectional, client even, server odd
        self._ends: weakref.WeakValueDictionary[int, _End] = weakref.WeakValueDictionary()  # streams in use
        self._stream_closed: dict[int, asyncio.Event] = {}

    async def open_stream(self, header: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.closed or self.other is None:
            raise ConnectionResetError(f"connection closed: {self.close_reason or 'not open'}")
        stream_id = next(self._ids)
        mine, theirs = _End(self, stream_id), _End(self.other, stream_id)
        mine.twin, theirs.twin, mine.served = theirs, mine, True
        self._ends[stream_id], self.other._ends[stream_id] = mine, theirs
        mine.writer.write(encode_json(header))
        return mine.reader, mine.writer

    def accept(self, end: _End) -> None:
        """The first bytes of a stream the peer opened arrived: serve it (as QUIC does on first data)."""
        if end.served:
            return
        end.served = True
        self.network.spawn(self._serve(end))

    async def _serve(self, end: _End) -> None:
        try:
            await serve_stream(self, self.transport_owner.handlers, end.reader, end.writer)
        finally:
            self._stream_closed.pop(end.stream_id, None)

    def stream_closed(self, stream_id: int) -> asyncio.Event:
        return self._stream_closed.setdefault(stream_id, asyncio.Event())

    def reset(self, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        if not isinstance(transport, _WriteTransport):
            return
        end = transport._end
        end.transport.abort()
        twin = end.twin
        if twin is not None and not twin.conn.closed and self.network.reachable(self.node_id, twin.conn.node_id):
            twin.fail(ConnectionResetError("stream reset by peer"))

    def transmit(self) -> None:
        """Nothing is queued: writes are carried as they are made."""

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        """End the connection; the peer hears `reason_phrase` if the network carries it (else its idle timeout)."""
        self.terminate(reason_phrase)
        other = self.other
        if other is not None and not other.closed:
            if self.network.reachable(self.node_id, other.node_id):
                other.terminate(reason_phrase)
            else:
                self.network.spawn(self.network._idle_timeout(other))

    def abort(self, reason: str) -> None:
        self.close(reason_phrase=reason)

    def terminate(self, reason: str) -> None:
        """This end is over: every stream fails, the transport forgets it."""
        if self.closed:
            return
        self.closed, self.close_reason = True, self.close_reason or reason
        for stream_id, end in list(self._ends.items()):
            end.fail(ConnectionResetError(f"connection closed: {reason}"))
            self.stream_closed(stream_id).set()
        self.closed_event.set()
        self.network._open.discard(self)
        self.transport_owner.forget(self)


class MemoryTransport:
    """One node's transport on a `MemoryNetwork` (a `Transport`)."""

    def __init__(
        self,
        network: MemoryNetwork,
        creds: Credentials,
        handlers: dict[str, StreamHandler],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        member_addresses: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.network, self.creds, self.handlers = network, creds, handlers
        self.host, self.port = host, port
        self.member_addresses = member_addresses
        self.node_id = creds.identity.node_id
        self.connections: dict[str, list[MemoryConnection]] = {}
        self.traffic = Traffic()
        self.listening = False

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> int:
        self.port = self.network._listen(self, self.port)
        self.listening = True
        return self.port

    async def close(self) -> None:
        for conns in list(self.connections.values()):
            for conn in list(conns):
                conn.close(reason_phrase="node shutting down")
        if self.listening:
            self.network._unlisten(self)
            self.listening = False

    def register(self, conn: MemoryConnection, peer: hs.Peer) -> None:
        conn.peer = peer
        self.connections.setdefault(peer.node_id, []).append(conn)

    def forget(self, conn: MemoryConnection) -> None:
        if conn.peer is None:
            return
        conns = self.connections.get(conn.peer.node_id, [])
        if conn in conns:
            conns.remove(conn)
            if not conns:
                del self.connections[conn.peer.node_id]

    def connection(self, node_id: str) -> MemoryConnection | None:
        conns = self.connections.get(node_id)
        return conns[-1] if conns else None

    async def connect(self, address: str) -> MemoryConnection:
        if not self.listening:
            raise OSError("this node's transport is closed")
        return await self.network._dial(self, address)

    async def connect_any(self, node_id: str | None, addresses: tuple[str, ...]) -> PeerConnection:
        return await dial_any(self, node_id, addresses)

    def known_sources(self) -> frozenset[str]:
        hosts = {split_address(c.remote)[0] for conns in self.connections.values() for c in conns}
        for address in self.member_addresses():
            try:
                hosts.add(source_ip(split_address(address)[0]))
            except MeshLLMError:
                continue
        return frozenset(hosts)

"""The QUIC transport between nodes (aioquic): one authenticated connection per peer pair.

Every node listens on UDP (all interfaces; `--bind-port` pins the port). Its TLS certificate is
self-signed by its Ed25519 node key, so the certificate *is* its identity; the handshake in
`handshake.py` then proves the mesh secret both ways and binds both keys. Until a connection has
authenticated, no other stream is served on it. After that either side opens streams on it: each
stream starts with a JSON header frame whose `t` picks a handler (`gossip`, `http`, ...).

A malformed frame or a failed handshake closes that stream or connection with a logged reason,
never the node. Before authenticating, a connection is limited (`admission.py`): per source address, in
all, with slots reserved for known members' addresses, and closed `AUTH_DEADLINE_S` after it was created;
under pressure a new one must first prove its address (a QUIC Retry). Refusals are logged rate-limited.

Size: one responsibility earns this module's length (about 600 lines): the adapter over aioquic — its connection,
its listener's pre-authentication defences (admission, Retry, refusal packets) and dialling all reach into
aioquic's internals, and are kept in the one place that does. What the planes above need of it is the
`transport.Transport` seam (streams are dispatched by `transport.serve_stream`, dials by `transport.dial_any`, as
the in-memory twin does); the credentials and certificate are `credentials.py`'s; reaching a member by node id
is `Mesh.reach`/`Mesh.dial`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import TRANSPORT_CLOSE_FRAME_CAPACITY, QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicPacketType, pull_quic_header
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.retry import QuicRetryTokenHandler
from anyio.abc import TaskStatus

from mesh_mcp.errors import AuthError, ConfigError, HandshakeRefused, MeshLLMError, PeerUnreachable, ProtocolError

from . import handshake as hs
from .admission import Admission, Limits, RefusalLog, source_ip
from .credentials import Credentials, make_certificate, raw_public_key
from .tokens import split_address
from .transport import PeerConnection, StreamHandler, Traffic, dial_any, serve_stream
from .wire import close_quietly, encode_json, read_json

log = logging.getLogger("mesh_llm.quic")

ALPN = "mesh-llm/1"
HANDSHAKE_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 20.0
# Connections that have not authenticated yet (anyone can complete TLS with us). A dialling node sends its
# proof right after TLS, so 5 s from the server-side connection's creation covers a loaded machine; a mesh
# start dials a few peers at once, far below these counts. Each pending connection costs ~150 KB (aioquic's
# state and buffers): the caps bound a flood to ~15 MB.
AUTH_DEADLINE_S = 5.0
PENDING_LIMITS = Limits(per_source=8, shared=64, reserved=32, deadline_s=AUTH_DEADLINE_S)
RETRY_ABOVE = 4  # pending connections beyond which a new one must first prove its address (a QUIC Retry)
SWEEP_S = 0.25  # how often overdue connections are looked for (the deadline's precision)
KNOWN_TTL_S = 1.0  # the known members' addresses are recomputed at most this often
MAX_PEER_TOTALS = 1024  # peers whose ended connections' bytes are remembered (live.py exports 1000 peers)


@asynccontextmanager
async def _dial(
    host: str, port: int, config: QuicConfiguration, factory: Callable[..., Connection], local_host: str
) -> AsyncIterator[Connection]:
    """aioquic's `connect`, but the socket binds the mesh interface (`--mesh-host`) when one is
    set, so outgoing traffic leaves from the same address the node listens and advertises on."""
    loop = asyncio.get_running_loop()
    if local_host in ("0.0.0.0", "::", ""):
        family = socket.AF_INET6
        bind: tuple[Any, ...] = ("::", 0, 0, 0)
        info = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        addr: tuple[Any, ...] = info[0][4]
        if len(addr) == 2:
            addr = ("::ffff:" + addr[0], addr[1], 0, 0)
    else:
        family = socket.AF_INET6 if ":" in local_host else socket.AF_INET
        bind = (local_host, 0, 0, 0) if family == socket.AF_INET6 else (local_host, 0)
        addr = (await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM))[0][4]
    config.server_name = host
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and local_host in ("0.0.0.0", "::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(bind)
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: factory(QuicConnection(configuration=config)), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    conn = protocol
    assert isinstance(conn, Connection)
    try:
        conn.connect(addr, transmit=True)
        yield conn
    finally:
        conn.close()
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await conn.wait_closed()
        transport.close()


class Connection(QuicConnectionProtocol):
    """One QUIC connection to a peer, authenticated or on its way to be."""

    transport_owner: MeshTransport
    is_client_side: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["stream_handler"] = self._on_stream
        super().__init__(*args, **kwargs)
        self.peer: hs.Peer | None = None
        self.authenticated = asyncio.Event()
        self.closed_event = asyncio.Event()
        self._stream_closed: dict[int, asyncio.Event] = {}  # streams served here whose handler asked or was told
        self._serving: set[int] = set()  # ids of the streams the peer opened whose handler has not ended
        self._tasks: set[asyncio.Task[None]] = set()
        self._handshake_started = False
        self.remote: str = ""
        self._writers: weakref.WeakSet[asyncio.StreamWriter] = weakref.WeakSet()
        self.exit_stack: AsyncExitStack | None = None  # client side: closes the UDP socket
        self.source = ""  # server side: the address it came from (admission counts it until it authenticates)
        self.admission_key: bytes | None = None  # server side, while pending: its slot in `transport_owner.admission`
        self.close_reason = ""  # why the connection ended, as the peer or we said it
        self.refused = False  # server side: counted as refused before it authenticated (once)
        self.bytes_in = 0  # UDP datagram bytes of this connection (also counted on its transport's `traffic`)
        self.bytes_out = 0

    # --- bytes on the wire: every UDP datagram of this connection, counted here and on its transport's `traffic` --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_CountingTransport(transport, self))  # type: ignore[arg-type]

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.bytes_in += len(data)
        owner = getattr(self, "transport_owner", None)
        if owner is not None:
            owner.traffic.add_in(len(data))
        super().datagram_received(data, addr)

    def _create_stream(self, stream_id: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = super()._create_stream(stream_id)
        self._writers.add(writer)
        return reader, writer

    # --- events -------------------------------------------------------------------------------------

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamReset):
            reader = self._stream_readers.pop(event.stream_id, None)  # nothing more comes on it
            if reader is not None:
                reader.set_exception(ConnectionResetError("stream reset by peer"))
            self._mark_closed(event.stream_id)
        elif isinstance(event, events.StopSendingReceived):
            self._mark_closed(event.stream_id)  # the requester stopped reading: it went away
        elif isinstance(event, events.ConnectionTerminated):
            self.close_reason = self.close_reason or event.reason_phrase
            for writer in self._writers:
                writer.transport._closing = True  # type: ignore[attr-defined]  # nothing left to flush
            for reader in self._stream_readers.values():
                reader.set_exception(ConnectionResetError(f"connection closed: {event.reason_phrase}"))
            self._stream_readers.clear()
            for closed in self._stream_closed.values():
                closed.set()
            self.closed_event.set()
            owner = getattr(self, "transport_owner", None)
            if owner is not None:
                owner._forget(self)
            return
        super().quic_event_received(event)
        if isinstance(event, events.StreamDataReceived) and event.end_stream:
            # aioquic keeps a stream's reader for the connection's life (`_stream_readers`, never emptied): one per
            # gossip round, ping and request, for as long as two members stay connected — measured by the 30-minute
            # soak (bench/p18_soak.py) as the long-lived nodes' memory growth. Its last byte is here (QUIC delivers
            # nothing after the FIN): whoever reads it holds the reader; the connection no longer needs to.
            self._stream_readers.pop(event.stream_id, None)

    def stream_closed(self, stream_id: int) -> asyncio.Event:
        """Set when the peer resets the stream or the connection dies (not on a clean EOF). Asked of a stream this
        node serves (the event is dropped when its handler ends); on a connection already over, a set event."""
        if self.closed_event.is_set():
            done = asyncio.Event()
            done.set()
            return done
        return self._stream_closed.setdefault(stream_id, asyncio.Event())

    def streams_held(self) -> int:
        """What this connection keeps per stream (readers, served streams, their closed events): only the streams
        still in use, however many came and went (tests/test_quic.py)."""
        return len(self._stream_readers) + len(self._serving) + len(self._stream_closed)

    def _mark_closed(self, stream_id: int) -> None:
        """The peer reset or stopped `stream_id`: tell its handler — one that asked (`stream_closed`) or one about to
        (a stream being served). A stream this node opened has no handler here: nothing is kept for it."""
        closed = self._stream_closed.get(stream_id)
        if closed is None and stream_id in self._serving:
            closed = self._stream_closed[stream_id] = asyncio.Event()
        if closed is not None:
            closed.set()

    def reset(self, writer: asyncio.StreamWriter) -> None:
        """Abandon a stream both ways: RESET_STREAM for what we send, STOP_SENDING for what we read (after our FIN
        a reset alone tells the peer nothing; STOP_SENDING is what makes it stop producing)."""
        stream_id = writer.get_extra_info("stream_id")
        for abandon in (self._quic.reset_stream, self._quic.stop_stream):
            try:
                abandon(stream_id, 0)
            except Exception:
                pass  # already finished, reset or forgotten that way
        try:
            self.transmit()
        except Exception:
            pass

    def abort(self, reason: str) -> None:
        """Close now and fail every stream at once, not after QUIC's closing period: a peer declared dead
        answers nothing, so there is nothing to wait for."""
        self.close(error_code=0, reason_phrase=reason)
        self.quic_event_received(events.ConnectionTerminated(error_code=0, frame_type=None, reason_phrase=reason))

    def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._serving.add(writer.get_extra_info("stream_id"))
        task = asyncio.get_running_loop().create_task(self._serve_stream(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.authenticated.is_set() or await self._authenticate(reader, writer):
                await serve_stream(self, self.transport_owner.handlers, reader, writer)
        finally:
            close_quietly(writer)
            stream_id = writer.get_extra_info("stream_id")
            self._serving.discard(stream_id)
            self._stream_closed.pop(stream_id, None)  # one per served stream, not forever

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """A stream on a connection not yet authenticated: the server's first is the handshake (served here, then
        False); a client's waits, bounded, for the welcome (then True: serve it). A failure refuses the connection
        (counted and summarised, not one line each) and answers False."""
        owner = self.transport_owner
        try:
            if self.is_client_side:
                # Streams the server opens right after its welcome may arrive before it: wait, bounded.
                await asyncio.wait_for(self.authenticated.wait(), HANDSHAKE_TIMEOUT_S)
                return True
            if self._handshake_started:
                raise AuthError("opened a second stream before authenticating")
            self._handshake_started = True
            await asyncio.wait_for(owner._server_handshake(self, reader, writer), HANDSHAKE_TIMEOUT_S)
        except (AuthError, TimeoutError, ProtocolError, ConnectionError, asyncio.IncompleteReadError) as exc:
            owner._refused(self, exc)
            self.close(error_code=0x1, reason_phrase="refused")
        except Exception:
            log.exception("the handshake failed")
            self.reset(writer)
        return False

    # --- use ----------------------------------------------------------------------------------------

    async def open_stream(self, header: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new stream, its header frame written. `PeerUnreachable` when this connection has closed under us."""
        try:
            reader, writer = await self.create_stream()
            writer.write(encode_json(header))
        except (ConnectionError, RuntimeError) as exc:  # aioquic: RuntimeError on a closing connection
            who = self.peer.node_id if self.peer is not None else self.remote or "?"
            raise PeerUnreachable(f"node {who}: its connection closed ({exc or type(exc).__name__})") from exc
        return reader, writer


class _CountingTransport:
    """A datagram transport that counts what its connection sends (everything else is delegated)."""

    def __init__(self, inner: asyncio.BaseTransport, conn: Connection) -> None:
        self._inner, self._conn = inner, conn

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self._conn.bytes_out += len(data)
        owner = getattr(self._conn, "transport_owner", None)
        if owner is not None:
            owner.traffic.add_out(len(data))
        self._inner.sendto(data, addr)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _peer_ip(conn: Connection) -> str:
    paths = conn._quic._network_paths
    return source_ip(str(paths[0].addr[0])) if paths else ""


class _Server(QuicServer):
    """aioquic's server with admission: a new connection is counted against its source address before
    aioquic allocates anything for it, refused with CONNECTION_REFUSED and a reason past the limits, and,
    while more than `RETRY_ABOVE` are pending, must first prove its address with a Retry round trip (so
    a spoofed source neither creates state nor spends another address's slots)."""

    def __init__(self, owner: MeshTransport, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owner = owner
        self._tokens = QuicRetryTokenHandler()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not isinstance(data, bytes) or not data or not data[0] & 0x80:  # short header: an existing connection
            return super().datagram_received(data, addr)
        config = self._configuration
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=config.connection_id_length)
        except ValueError:
            return None
        if (
            header.packet_type != QuicPacketType.INITIAL
            or len(data) < SMALLEST_MAX_DATAGRAM_SIZE
            or header.destination_cid in self._protocols
            or header.version not in config.supported_versions
        ):
            return super().datagram_received(data, addr)
        # A new connection.
        owner = self.owner
        if header.token:
            self._retry = self._tokens  # aioquic checks it: the address is real
        elif owner.admission.pending >= RETRY_ABOVE:
            self._retry = self._tokens  # aioquic answers with a Retry and keeps nothing
            return super().datagram_received(data, addr)
        else:
            self._retry = None  # type: ignore[assignment]  # aioquic: None means no Retry
        key, source = header.destination_cid, source_ip(str(addr[0]))
        reason = owner._admit(key, source)
        if reason is not None:
            assert self._transport is not None and header.version is not None
            self._transport.sendto(_refusal(header.version, header.destination_cid, header.source_cid, reason), addr)
            return None
        super().datagram_received(data, addr)
        protocol = self._protocols.get(key)
        if isinstance(protocol, Connection):
            owner._admitted(protocol, key, source)
        else:  # aioquic refused it (a bad token)
            owner.admission.release(key)
        return None


def _refusal(version: int, source_cid: bytes, destination_cid: bytes, reason: str) -> bytes:
    """A server Initial packet that closes a connection before it exists: CONNECTION_REFUSED with `reason`
    (as aioquic's INVALID_TOKEN close; smaller than the client's Initial, so it amplifies nothing)."""
    phrase = reason.encode()[:256]
    crypto = CryptoPair()
    crypto.setup_initial(cid=source_cid, is_client=False, version=version)
    builder = QuicPacketBuilder(
        host_cid=source_cid,
        is_client=False,
        max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
        peer_cid=destination_cid,
        version=version,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    buf = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=TRANSPORT_CLOSE_FRAME_CAPACITY + len(phrase))
    buf.push_uint_var(QuicErrorCode.CONNECTION_REFUSED)
    buf.push_uint_var(QuicFrameType.PADDING)
    buf.push_uint_var(len(phrase))
    buf.push_bytes(phrase)
    datagrams, _ = builder.flush()
    return datagrams[0]


class MeshTransport:
    def __init__(
        self,
        creds: Credentials,
        handlers: dict[str, StreamHandler],
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        on_peer: Callable[[Connection], None] = lambda c: None,
        on_lost: Callable[[Connection], None] = lambda c: None,
        member_addresses: Callable[[], Iterable[str]] = tuple,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.creds = creds
        self.handlers = handlers
        self.host, self.port = host, port
        self.on_peer, self.on_lost = on_peer, on_lost
        key = creds.identity.key
        self._cert = make_certificate(key, creds.identity.node_id)
        self.connections: dict[str, list[Connection]] = {}
        self.traffic = Traffic()
        # Bytes of peers' connections that ended, by node id (`peer_traffic`): at most MAX_PEER_TOTALS peers, the
        # least recently closed forgotten first.
        self._ended_bytes: dict[str, tuple[int, int]] = {}
        self._server: QuicServer | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        self._dialing: dict[str, asyncio.Future[Connection]] = {}
        # Before authentication (admission.py): `member_addresses` gives the `host:port`s of gossiped members,
        # whose hosts (with connected peers') take the reserved slots.
        self.member_addresses, self.clock = member_addresses, clock
        self.admission: Admission[bytes] = Admission(PENDING_LIMITS)
        self.refusals = RefusalLog("")
        self._pending: dict[bytes, Connection] = {}
        self._known: frozenset[str] = frozenset()
        self._known_at = float("-inf")
        self._sweeper: asyncio.Task[None] | None = None

    def _config(self, is_client: bool) -> QuicConfiguration:
        cfg = QuicConfiguration(is_client=is_client, alpn_protocols=[ALPN], idle_timeout=IDLE_TIMEOUT_S)
        cfg.certificate = self._cert
        cfg.private_key = self.creds.identity.key
        if is_client:
            cfg.verify_mode = ssl.CERT_NONE  # the handshake checks the key against the node id instead
        return cfg

    def _make_protocol(self, is_client: bool) -> Callable[..., Connection]:
        def factory(*args: Any, **kwargs: Any) -> Connection:
            conn = Connection(*args, **kwargs)
            conn.transport_owner = self
            conn.is_client_side = is_client
            return conn

        return factory

    async def start(self) -> int:
        """Listen; returns the UDP port. Pair with `close()` (or use `run`)."""
        loop = asyncio.get_running_loop()
        config, factory = self._config(False), self._make_protocol(False)
        try:
            _, server = await loop.create_datagram_endpoint(
                lambda: _Server(self, configuration=config, create_protocol=factory), local_addr=(self.host, self.port)
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen for the mesh on UDP {self.host}:{self.port}: {exc.strerror}") from exc
        self._server = server
        assert server._transport is not None
        self.port = server._transport.get_extra_info("sockname")[1]
        self._sweeper = loop.create_task(self._sweep())
        return self.port

    async def run(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started(await self.start())
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()

    async def close(self) -> None:
        for conns in list(self.connections.values()):
            for conn in conns:
                conn.close(error_code=0, reason_phrase="node shutting down")
                if conn.exit_stack is not None:
                    with anyio.move_on_after(1):
                        await conn.exit_stack.aclose()
        for task in list(self._cleanups):
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            self._server.close()
            self._server = None

    def _forget(self, conn: Connection) -> None:
        self._release(conn)
        if conn.exit_stack is not None:  # a dialled connection ended: release its socket
            task = asyncio.get_running_loop().create_task(conn.exit_stack.aclose())
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
            conn.exit_stack = None
        if conn.peer is None:
            return
        conns = self.connections.get(conn.peer.node_id, [])
        if conn in conns:
            self._ended(conn.peer.node_id, conn.bytes_in, conn.bytes_out)
            conns.remove(conn)
            if not conns:
                self.connections.pop(conn.peer.node_id, None)
            self.on_lost(conn)

    def _ended(self, node_id: str, bytes_in: int, bytes_out: int) -> None:
        was_in, was_out = self._ended_bytes.pop(node_id, (0, 0))
        self._ended_bytes[node_id] = (was_in + bytes_in, was_out + bytes_out)  # now the most recent
        while len(self._ended_bytes) > MAX_PEER_TOTALS:
            del self._ended_bytes[next(iter(self._ended_bytes))]

    def peer_traffic(self) -> dict[str, tuple[int, int]]:
        """(bytes in, bytes out) of UDP datagrams by authenticated peer: its open connections plus those that ended
        (remembered for the last `MAX_PEER_TOTALS` peers whose connection ended: one forgotten starts again at 0).
        Bounded by the connection table plus that many."""
        out = dict(self._ended_bytes)
        for node_id, conns in list(self.connections.items()):
            was_in, was_out = out.get(node_id, (0, 0))
            out[node_id] = (was_in + sum(c.bytes_in for c in conns), was_out + sum(c.bytes_out for c in conns))
        return out

    # --- before authentication: admission, deadline, refusals (limits in admission.py) ----------------

    def known_sources(self) -> frozenset[str]:
        """Addresses of known members: the hosts of gossiped member records and of peers connected now
        (recomputed at most every `KNOWN_TTL_S`). Connections from them take the reserved slots."""
        now = self.clock()
        if now - self._known_at >= KNOWN_TTL_S:
            hosts = {c.source or _peer_ip(c) for conns in self.connections.values() for c in conns}
            for address in self.member_addresses():
                try:
                    hosts.add(source_ip(split_address(address)[0]))
                except MeshLLMError:
                    continue
            hosts.discard("")
            self._known, self._known_at = frozenset(hosts), now
        return self._known

    def _admit(self, key: bytes, source: str) -> str | None:
        """Count a new server-side connection from `source` as pending; why not, if refused (logged)."""
        now = self.clock()
        reason = self.admission.admit(key, source, known=source in self.known_sources(), now=now)
        if reason is not None and (line := self.refusals.refused(source, reason, now, f"peer {source}")):
            log.warning(line)
        return reason

    def _admitted(self, conn: Connection, key: bytes, source: str) -> None:
        conn.source, conn.admission_key = source, key
        self._pending[key] = conn

    def _release(self, conn: Connection) -> None:
        if conn.admission_key is not None:
            self.admission.release(conn.admission_key)
            self._pending.pop(conn.admission_key, None)
            conn.admission_key = None

    @property
    def pending(self) -> int:
        """Server-side connections that have not authenticated yet."""
        return self.admission.pending

    def _refused(self, conn: Connection, exc: BaseException) -> None:
        """A connection failed its handshake (or a peer we dialled failed ours): logged, rate-limited."""
        self._release(conn)
        if conn.refused:
            return  # counted already (overdue, or another of its streams)
        conn.refused = True
        source = conn.source or _peer_ip(conn)
        reason = str(exc) or type(exc).__name__
        if line := self.refusals.refused(source, reason, self.clock(), f"peer {conn.remote or source}"):
            log.warning(line)

    async def _sweep(self) -> None:
        """Close connections that did not authenticate within `AUTH_DEADLINE_S` of their creation, and
        write the refusals' summary when one is due."""
        while True:
            await asyncio.sleep(SWEEP_S)
            now = self.clock()
            for key, source in self.admission.overdue(now):
                conn = self._pending.pop(key, None)
                if conn is None:
                    continue
                conn.admission_key, conn.refused = None, True
                reason = f"did not authenticate within {AUTH_DEADLINE_S:.0f} s"
                conn.close(error_code=QuicErrorCode.CONNECTION_REFUSED, reason_phrase=reason)
                if line := self.refusals.refused(source, reason, now, f"peer {source}"):
                    log.warning(line)
            if line := self.refusals.due(now):
                log.warning(line)

    def _register(self, conn: Connection) -> None:
        assert conn.peer is not None
        self._release(conn)  # authenticated: no longer limited
        self.connections.setdefault(conn.peer.node_id, []).append(conn)
        conn.authenticated.set()
        self.on_peer(conn)

    def connection(self, node_id: str) -> Connection | None:
        conns = self.connections.get(node_id)
        return conns[-1] if conns else None

    async def connect(self, address: str) -> Connection:
        """Dial `host:port`, authenticate both ways, return the connection (errors: AuthError, OSError)."""
        host, port = split_address(address)
        stack = AsyncExitStack()
        cm = _dial(host, port, self._config(True), self._make_protocol(True), self.host)
        conn = await stack.enter_async_context(cm)
        conn.remote = address
        conn.exit_stack = stack
        try:
            with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
                await conn.wait_connected()
                await self._client_handshake(conn)
        except BaseException as exc:
            if (waiter := conn._connected_waiter) is not None:
                # aioquic fails this future on close; read it so asyncio does not log it as lost.
                waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
            conn.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await stack.aclose()
            if isinstance(exc, TimeoutError):
                raise OSError(f"no answer from {address} within {HANDSHAKE_TIMEOUT_S:.0f}s") from exc
            if isinstance(exc, ConnectionError):
                why = f"the node refused: {conn.close_reason}" if conn.close_reason else exc or "connection failed"
                raise OSError(f"cannot reach {address}: {why}") from exc
            raise
        return conn

    async def connect_any(self, node_id: str | None, addresses: tuple[str, ...]) -> PeerConnection:
        """An authenticated connection to a node: reuse one, or dial its addresses in order."""
        return await dial_any(self, node_id, addresses)

    # --- handshakes ---------------------------------------------------------------------------------

    async def _client_handshake(self, conn: Connection) -> None:
        reader, writer = await conn.create_stream()
        try:
            await self._client_proofs(conn, reader, writer)
        finally:
            close_quietly(writer)

    async def _client_proofs(
        self, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        creds = self.creds
        me = creds.identity
        nonce_c = hs.nonce()
        writer.write(encode_json(hs.hello(creds.mesh_id, nonce_c)))
        nonce_s = hs.check_challenge(await read_json(reader))
        peer_cert = conn._quic.tls._peer_certificate
        if peer_cert is None:
            raise AuthError("peer presented no certificate")
        server_pub = raw_public_key(peer_cert.public_key())
        t = hs.transcript(creds.mesh_id, nonce_c, nonce_s, server_pub, me.public_bytes)
        writer.write(encode_json(hs.proof("auth", me.key, me.public_bytes, creds.secret, t)))
        welcome = await read_json(reader)
        peer = hs.check_proof("welcome", welcome, creds.accepted(None) or (creds.secret,), t)
        if peer.public_key != server_pub:
            raise AuthError("peer's handshake key differs from its TLS certificate")
        if peer.node_id in creds.evicted:
            raise AuthError(f"node {peer.node_id} was removed from this mesh; not connecting to it")
        conn.peer = peer
        self._register(conn)

    async def _server_handshake(
        self, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        creds = self.creds
        me = creds.identity
        conn.remote = str(conn._quic._network_paths[0].addr if conn._quic._network_paths else "?")
        try:
            nonce_c = hs.check_hello(await read_json(reader), creds.mesh_id)
            nonce_s = hs.nonce()
            writer.write(encode_json(hs.challenge(nonce_s)))
            auth = await read_json(reader)
            client_pub = hs.parse_public_key(auth)
            t = hs.transcript(creds.mesh_id, nonce_c, nonce_s, me.public_bytes, client_pub)
            claimed = auth.get("node_id") if isinstance(auth.get("node_id"), str) else None
            peer = hs.check_auth(
                auth, t, accepted=creds.accepted(claimed), previous=creds.previous, evicted=creds.evicted
            )
        except AuthError as exc:
            code = exc.code if isinstance(exc, HandshakeRefused) else "bad-secret"
            writer.write(encode_json(hs.refused("authentication failed", code, creds.epoch)))
            writer.write_eof()
            await asyncio.sleep(0.05)  # let the refusal leave before the close
            raise AuthError(str(exc)) from exc
        writer.write(encode_json(hs.proof("welcome", me.key, me.public_bytes, creds.secret, t)))
        writer.write_eof()
        conn.peer = peer
        self._register(conn)
        log.info("peer %s authenticated from %s", peer.node_id, conn.remote)

"""The QUIC transport between nodes (aioquic): one authenticated connection per peer pair.

Every node listens on UDP (all interfaces; `--bind-port` pins the port). Its TLS certificate is
self-signed by its Ed25519 node key, so the certificate *is* its identity; the handshake in
`handshake.py` then proves the mesh secret both ways and binds both keys. Until a connection has
authenticated, no other stream is served on it. After that either side opens streams on it: each
stream starts with a JSON header frame whose `t` picks a handler (`gossip`, `http`, ...).

A malformed frame or a failed handshake closes that stream or connection with a logged reason,
never the node.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.asyncio.server import QuicServer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from anyio.abc import TaskStatus
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from inference.errors import AuthError, ConfigError, ProtocolError

from ..identity import Identity
from . import handshake as hs
from .tokens import split_address
from .wire import encode_json, read_json

log = logging.getLogger("mesh_llm.quic")

ALPN = "mesh-llm/1"
HANDSHAKE_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 20.0

StreamHandler = Callable[["Connection", dict[str, Any], asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True)
class Credentials:
    identity: Identity
    mesh_id: bytes
    secret: bytes  # the current secret: what this node proves with
    accepted: Callable[[str | None], tuple[bytes, ...]]  # secrets accepted from a node id (None: unknown)


def make_certificate(key: Ed25519PrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, None)
    )


def _raw(public: Any) -> bytes:
    if not isinstance(public, Ed25519PublicKey):
        raise AuthError("peer certificate is not an Ed25519 node key")
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


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


def close_quietly(writer: asyncio.StreamWriter) -> None:
    """Half-close our side of a stream if it is still open (never raises)."""
    try:
        writer.close()
    except Exception:
        writer.transport._closing = True  # type: ignore[attr-defined]


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
        self._stream_closed: dict[int, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._handshake_started = False
        self.remote: str = ""
        self._writers: weakref.WeakSet[asyncio.StreamWriter] = weakref.WeakSet()
        self.exit_stack: AsyncExitStack | None = None  # client side: closes the UDP socket

    # --- bytes on the wire: every UDP datagram of this connection, counted on its transport's `traffic` ---------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_CountingTransport(transport, self))  # type: ignore[arg-type]

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
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
            reader = self._stream_readers.get(event.stream_id)
            if reader is not None:
                reader.set_exception(ConnectionResetError("stream reset by peer"))
            self.stream_closed(event.stream_id).set()
        elif isinstance(event, events.ConnectionTerminated):
            for writer in self._writers:
                writer.transport._closing = True  # type: ignore[attr-defined]  # nothing left to flush
            for stream_id, reader in self._stream_readers.items():
                reader.set_exception(ConnectionResetError(f"connection closed: {event.reason_phrase}"))
                self.stream_closed(stream_id).set()
            self.closed_event.set()
            owner = getattr(self, "transport_owner", None)
            if owner is not None:
                owner._forget(self)
            return
        super().quic_event_received(event)

    def stream_closed(self, stream_id: int) -> asyncio.Event:
        """Set when the peer resets the stream or the connection dies (not on a clean EOF)."""
        return self._stream_closed.setdefault(stream_id, asyncio.Event())

    def reset(self, writer: asyncio.StreamWriter) -> None:
        stream_id = writer.get_extra_info("stream_id")
        try:
            self._quic.reset_stream(stream_id, 0)
            self.transmit()
        except Exception:
            pass

    def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve_stream(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        owner = self.transport_owner
        try:
            if not self.authenticated.is_set():
                if self.is_client_side or self._handshake_started:
                    # Streams before authentication wait for it, bounded.
                    await asyncio.wait_for(self.authenticated.wait(), HANDSHAKE_TIMEOUT_S)
                else:
                    self._handshake_started = True
                    await asyncio.wait_for(owner._server_handshake(self, reader, writer), HANDSHAKE_TIMEOUT_S)
                    return
            header = await read_json(reader)
            handler = owner.handlers.get(str(header.get("t")))
            if handler is None:
                raise ProtocolError(f"unknown stream type {header.get('t')!r}")
            await handler(self, header, reader, writer)
        except (AuthError, TimeoutError) as exc:
            log.warning("refused peer %s: %s", self.remote, exc)
            self.close(error_code=0x1, reason_phrase="refused")
        except (ProtocolError, ConnectionError, asyncio.IncompleteReadError) as exc:
            who = self.peer.node_id if self.peer else self.remote
            log.warning("dropped a stream from %s: %s", who, exc)
            self.reset(writer)
        except Exception:
            log.exception("stream handler failed")
            self.reset(writer)
        finally:
            close_quietly(writer)

    # --- use ----------------------------------------------------------------------------------------

    async def open_stream(self, header: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self.create_stream()
        writer.write(encode_json(header))
        return reader, writer


@dataclass
class Traffic:
    """Bytes of UDP datagrams (QUIC: control plane, gossip, tunnelled API requests) a transport sent and received."""

    bytes_in: int = 0
    bytes_out: int = 0
    datagrams_in: int = 0
    datagrams_out: int = 0

    def add_in(self, n: int) -> None:
        self.bytes_in += n
        self.datagrams_in += 1

    def add_out(self, n: int) -> None:
        self.bytes_out += n
        self.datagrams_out += 1


class _CountingTransport:
    """A datagram transport that counts what its connection sends (everything else is delegated)."""

    def __init__(self, inner: asyncio.BaseTransport, conn: Connection) -> None:
        self._inner, self._conn = inner, conn

    def sendto(self, data: bytes, addr: Any = None) -> None:
        owner = getattr(self._conn, "transport_owner", None)
        if owner is not None:
            owner.traffic.add_out(len(data))
        self._inner.sendto(data, addr)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


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
    ) -> None:
        self.creds = creds
        self.handlers = handlers
        self.host, self.port = host, port
        self.on_peer, self.on_lost = on_peer, on_lost
        key = creds.identity.key
        self._cert = make_certificate(key, creds.identity.node_id)
        self.connections: dict[str, list[Connection]] = {}
        self.traffic = Traffic()
        self._server: QuicServer | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        self._dialing: dict[str, asyncio.Future[Connection]] = {}

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
        try:
            self._server = await serve(
                self.host, self.port, configuration=self._config(False), create_protocol=self._make_protocol(False)
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen for the mesh on UDP {self.host}:{self.port}: {exc.strerror}") from exc
        assert self._server._transport is not None
        self.port = self._server._transport.get_extra_info("sockname")[1]
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
        if self._server is not None:
            self._server.close()
            self._server = None

    def _forget(self, conn: Connection) -> None:
        if conn.exit_stack is not None:  # a dialled connection ended: release its socket
            task = asyncio.get_running_loop().create_task(conn.exit_stack.aclose())
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
            conn.exit_stack = None
        if conn.peer is None:
            return
        conns = self.connections.get(conn.peer.node_id, [])
        if conn in conns:
            conns.remove(conn)
            if not conns:
                self.connections.pop(conn.peer.node_id, None)
            self.on_lost(conn)

    def _register(self, conn: Connection) -> None:
        assert conn.peer is not None
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
                raise OSError(f"cannot reach {address}: {exc or 'connection failed'}") from exc
            raise
        return conn

    async def connect_any(self, node_id: str | None, addresses: tuple[str, ...]) -> Connection:
        """An authenticated connection to a node: reuse one, or dial its addresses in order."""
        if node_id is not None and (conn := self.connection(node_id)) is not None:
            return conn
        errors = []
        for address in addresses:
            try:
                conn = await self.connect(address)
            except OSError as exc:
                errors.append(str(exc))
                continue
            if node_id is not None and conn.peer is not None and conn.peer.node_id != node_id:
                conn.close(reason_phrase="unexpected node")
                errors.append(f"{address} is node {conn.peer.node_id}, not {node_id}")
                continue
            return conn
        raise OSError("; ".join(errors) or "no address to dial")

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
        server_pub = _raw(peer_cert.public_key())
        t = hs.transcript(creds.mesh_id, nonce_c, nonce_s, server_pub, me.public_bytes)
        writer.write(encode_json(hs.proof("auth", me.key, me.public_bytes, creds.secret, t)))
        welcome = await read_json(reader)
        peer = hs.check_proof("welcome", welcome, creds.accepted(None) or (creds.secret,), t)
        if peer.public_key != server_pub:
            raise AuthError("peer's handshake key differs from its TLS certificate")
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
            peer = hs.check_proof("auth", auth, creds.accepted(claimed), t)
        except AuthError as exc:
            writer.write(encode_json(hs.refused("authentication failed")))
            writer.write_eof()
            await asyncio.sleep(0.05)  # let the refusal leave before the close
            raise AuthError(str(exc)) from exc
        writer.write(encode_json(hs.proof("welcome", me.key, me.public_bytes, creds.secret, t)))
        writer.write_eof()
        conn.peer = peer
        self._register(conn)
        log.info("peer %s authenticated from %s", peer.node_id, conn.remote)

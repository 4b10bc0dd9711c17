"""The RPC data plane: llama.cpp RPC carried between nodes over authenticated, encrypted TCP.

llama.cpp RPC has no authentication and no encryption, so ggml-rpc-server and llama-server only
ever talk to 127.0.0.1. A pipeline split puts a relay at each end:

    host:   llama-server ──TCP──► Relay (127.0.0.1:P) ══ TLS 1.3 over TCP ══► DataPlaneServer ──TCP──► ggml-rpc-server
                                   one per remote target         the worker's mesh interface     127.0.0.1:targets[name]

Each tunnel is one TCP connection (TCP_NODELAY everywhere: RPC is small-message ping-pong):

1. TLS 1.3. The worker's certificate is self-signed by its Ed25519 node key (as on QUIC); the
   host presents none. No session tickets, so after the handshake the TLS state only moves when
   data does.
2. Mutual authentication inside TLS with the mesh handshake (`handshake.py`): HELLO → CHALLENGE
   → AUTH → WELCOME, both sides proving the mesh secret (HMAC) and their node key (Ed25519) over
   a transcript of both nonces and both public keys, prefixed `rpc|` so a proof made here is not
   one made for the QUIC plane. The worker's key in the transcript is the one the host saw in the
   TLS certificate, so the host's proof only holds on a TLS session the real worker terminates: a
   man in the middle gains nothing. A peer that fails (no TLS, wrong secret or mesh, garbage,
   too slow) is refused and logged before anything is connected to rpc-server.
3. The host names a target; the worker looks it up in `targets` (name → local rpc-server port,
   filled when it starts rpc-servers), refuses unknown names, connects to 127.0.0.1:port, answers
   ok.
4. Splice both ways until either side closes or fails; then both sockets close, so rpc-server
   sees its client go (and frees its memory) and llama-server sees its worker go.

Why threads with blocking sockets and `ssl.SSLObject` over memory BIOs: measured with
`bench/p2_dataplane.py` (loopback, 2-core VM; bench/RESULTS.md, P2). Per tunnel and side two
threads copy, one per direction, each blocked in `recv` until bytes arrive. Round trip added to a
GET_TENSOR-like ping (40-byte request, 2304/8192-byte answer) by both relays, and throughput of
1 GiB in 1 MiB writes, on a quiet machine (under load: the same order, up to +60 µs and -50 %):

    asyncio streams + ssl          +318/+284 µs    331 MB/s
    asyncio protocols + ssl        +232/+240 µs    453 MB/s
    one thread, poll(), SSLSocket  +150/+167 µs    577 MB/s   (+205/+216 µs under load)
    two threads, one SSLSocket     +144/+159 µs    530 MB/s   (unsafe, see below)
    two threads, SSLObject + BIO   +159/+170 µs    722 MB/s   (this module)
    two threads, no TLS             +76/+86 µs    1103 MB/s
    the same relay in C, no TLS     +50/+65 µs    1634 MB/s   (the floor: 4 more TCP hops, 4 wakeups)

Asyncio pays its event loop on each of the four relay hops of a round trip. Two threads on one
`ssl.SSLSocket` are as fast, but OpenSSL forbids using an SSL object from two threads at once
and CPython does not lock it (cpython#151508: a crash), so the TLS state lives in an `SSLObject`
over memory BIOs: socket I/O outside the lock, only the in-memory encrypt/decrypt inside it. The
reading thread never sends (what TLS would send in answer waits in the BIO for the writing
thread), so a full send buffer can never block the reader. Nothing runs on the event loop but
accepting and closing. Opening a tunnel (TCP, TLS, handshake, target) takes 5.5 ms on loopback;
llama-server opens about 12 while it loads.

The GIL is shared with the rest of the process: a Python thread that computes without pause
(scrubbing, a busy event loop) makes each relay hop wait up to `sys.getswitchinterval()` (5 ms),
measured +20–26 ms per round trip. Host a data plane whose round trips matter in a process of its
own (the classes need only an `Identity` and credentials).

Services: instead of a target, an authenticated peer may name a request `type` registered in
`services` (name → a blocking function of the request and a `Stream`). It runs on that connection's
thread; the `Stream` carries frames and raw bytes inside TLS, one thread at a time, each socket
operation bounded by `IO_TIMEOUT_S` of silence. `connect()` is the client: dial, TLS, handshake,
send the request, and hand back the `Stream` to read the answer from. `tensor_fetch.py` serves a
model's tensors to workers that lack the file this way.

Counters (`ByteCounters`): bytes of RPC requests (`to_rpc_server`, host → worker: all the
weights at load without a cache) and responses (`from_rpc_server`), per relay and per target.

The relay's local port accepts any local process, as llama.cpp's own RPC on 127.0.0.1 does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh_mcp.errors import AuthError, ConfigError, ProtocolError
from mesh_mcp.mesh import handshake as hs
from mesh_mcp.mesh.admission import Admission, Limits, RefusalLog, source_ip
from mesh_mcp.mesh.identity import Identity
from mesh_mcp.mesh.quic import Credentials, _raw, make_certificate
from mesh_mcp.mesh.tokens import split_address
from mesh_mcp.mesh.wire import decode_json, encode_json
from mesh_mcp.mesh.wire import field as msg_field

log = logging.getLogger("mesh_llm.dataplane")

ALPN = "mesh-llm-rpc/1"
HANDSHAKE_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0
FRAME_LIMIT = 64 << 10  # control frames before the splice
CHUNK = 256 << 10  # bytes per recv while splicing
# Connections still authenticating (admission.py), each a thread and a socket: a host opens about 12 while
# llama-server loads, one at a time, so these counts are far above any member's need and bound a flood to
# ~64 threads. A refused connection is reset at once.
PER_SOURCE = 8  # from one stranger's address
SHARED = 32  # from strangers together
RESERVED = 32  # further slots for known members' addresses only
SWEEP_S = 0.25  # how often connections past HANDSHAKE_TIMEOUT_S are looked for and closed
IO_TIMEOUT_S = 30.0  # silence that ends a service's stream (a stalled transfer)

CredentialsProvider = Callable[[], Credentials]


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _transcript(mesh_id: bytes, nonce_c: bytes, nonce_s: bytes, server_pub: bytes, client_pub: bytes) -> bytes:
    return b"rpc|" + hs.transcript(mesh_id, nonce_c, nonce_s, server_pub, client_pub)


# --- counters ---------------------------------------------------------------------------------------


class _Meter:
    """One tunnel's bytes; each field is written by one thread only (no lock on the hot path)."""

    __slots__ = ("from_rpc_server", "to_rpc_server")

    def __init__(self) -> None:
        self.to_rpc_server = 0
        self.from_rpc_server = 0


class ByteCounters:
    """Plaintext RPC bytes through a relay or to a target: closed tunnels plus open ones, live."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[_Meter] = set()
        self._closed = _Meter()
        self.tunnels = 0  # tunnels opened

    @property
    def to_rpc_server(self) -> int:
        """Requests, llama-server → rpc-server: the weights at load (without a cache), inputs per token."""
        with self._lock:
            return self._closed.to_rpc_server + sum(m.to_rpc_server for m in self._open)

    @property
    def from_rpc_server(self) -> int:
        """Responses, rpc-server → llama-server."""
        with self._lock:
            return self._closed.from_rpc_server + sum(m.from_rpc_server for m in self._open)

    def __repr__(self) -> str:
        return f"ByteCounters(to_rpc_server={self.to_rpc_server}, from_rpc_server={self.from_rpc_server})"

    def _opened(self) -> _Meter:
        meter = _Meter()
        with self._lock:
            self._open.add(meter)
            self.tunnels += 1
        return meter

    def _closed_meter(self, meter: _Meter) -> None:
        with self._lock:
            self._open.discard(meter)
            self._closed.to_rpc_server += meter.to_rpc_server
            self._closed.from_rpc_server += meter.from_rpc_server


# --- TLS over a blocking socket, usable by one reading and one writing thread ---------------------------


class _Tls:
    """An `ssl.SSLObject` over memory BIOs on a blocking socket.

    Before the splice one thread uses it (handshake, control frames). While splicing, one thread
    calls `recv_into` and another `send`; `_lock` serialises the in-memory TLS work only, never
    socket I/O. `recv_into` never sends: bytes TLS queues while reading wait for the next `send`.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        self._lock = threading.Lock()
        self._buf = memoryview(bytearray(CHUNK))
        self._plain = bytearray()  # plaintext read ahead by the control-frame reader
        self._more = False
        self._deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S  # for everything before the splice

    def handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._feed():
                    raise ProtocolError("peer closed the connection during the TLS handshake") from None
        self._flush()
        if self._obj.selected_alpn_protocol() != ALPN:
            raise ProtocolError("peer does not speak the mesh-llm RPC data plane (ALPN)")

    def peer_public_key(self) -> bytes:
        der = self._obj.getpeercert(binary_form=True)
        if not der:
            raise AuthError("peer presented no certificate")
        return _raw(x509.load_der_x509_certificate(der).public_key())

    def _flush(self) -> None:
        if self._out.pending:
            self.sock.sendall(self._out.read())

    def _feed(self) -> bool:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete handshake within {HANDSHAKE_TIMEOUT_S:.0f}s")
        self.sock.settimeout(left)
        n = self.sock.recv_into(self._buf)
        if n:
            self._in.write(self._buf[:n])
        return bool(n)

    # --- control frames (one thread) ---

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send(encode_json(obj))

    def _read_plain(self, size: int) -> bytes:
        while len(self._plain) < size:
            try:
                self._plain += cast(bytes, self._obj.read(CHUNK))
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                raise ProtocolError("peer closed the connection during the handshake") from None
            if not self._feed():
                raise ProtocolError("peer closed the connection during the handshake")
        data = bytes(self._plain[:size])
        del self._plain[:size]
        return data

    def read_json(self) -> dict[str, Any]:
        size = int.from_bytes(self._read_plain(4), "big")
        if size > FRAME_LIMIT:
            raise ProtocolError(f"control frame of {size} bytes exceeds {FRAME_LIMIT}")
        return decode_json(self._read_plain(size))

    def take_read_ahead(self) -> bytes:
        data, self._plain = bytes(self._plain), bytearray()
        return data

    # --- splicing (one reading thread, one writing thread) ---

    def send(self, data: bytes | memoryview) -> None:
        with self._lock:
            self._obj.write(data)  # memory BIO: always writes everything
            out = self._out.read()
        self.sock.sendall(out)

    def recv_into(self, raw: memoryview, out: memoryview) -> int:
        """Block until plaintext arrives; decrypt into `out`. 0 at the end of the stream."""
        obj, incoming, lock, size = self._obj, self._in, self._lock, len(out)
        while True:
            got = 0
            if incoming.pending or self._more:
                with lock:
                    # Read while whole records may be there; skip the read that would only raise
                    # SSLWantReadError (the exception costs more than the check).
                    while got < size and (incoming.pending or obj.pending()):
                        try:
                            got += cast(int, obj.read(size - got, out[got:]))
                        except ssl.SSLWantReadError:
                            break
                        except ssl.SSLZeroReturnError:  # close_notify
                            return got
                    self._more = got == size  # `out` is full: more may be decrypted already
            if got:
                return got
            n = self.sock.recv_into(raw)
            if not n:
                return 0
            with lock:
                incoming.write(raw[:n])


# --- one tunnel: sockets and threads, closed together -----------------------------------------------


class _Tunnel:
    def __init__(self, owner: _Listener, local: socket.socket | None, net: socket.socket | None) -> None:
        self.owner = owner
        self.sockets = [s for s in (local, net) if s is not None]
        self.threads: list[threading.Thread] = []
        self.aborted = False
        self.refused = False  # counted as refused (once)

    def add_socket(self, sock: socket.socket) -> None:
        with self.owner._lock:
            self.sockets.append(sock)
            if self.aborted:
                _shutdown(sock)

    def abort(self) -> None:
        """Wake every thread of this tunnel (blocked recv/send return) so it ends."""
        with self.owner._lock:
            self.aborted = True
            for s in self.sockets:
                _shutdown(s)

    def close_sockets(self) -> None:
        for s in self.sockets:
            s.close()

    def splice(self, local: socket.socket, tls: _Tls, counters: ByteCounters, *, host_side: bool) -> None:
        """Copy both ways until either side ends; one direction here, the other on a new thread."""
        for s in (local, tls.sock):
            s.settimeout(None)
        meter = counters._opened()
        other = threading.Thread(
            target=self._net_to_local,
            args=(local, tls, meter, host_side),
            name=threading.current_thread().name + "-in",
            daemon=True,
        )
        self.threads.append(other)
        try:
            other.start()
            self._local_to_net(local, tls, meter, host_side)
        finally:
            self.abort()
            other.join()
            counters._closed_meter(meter)

    def _local_to_net(self, local: socket.socket, tls: _Tls, meter: _Meter, host_side: bool) -> None:
        buf = memoryview(bytearray(CHUNK))
        try:
            if host_side:
                while n := local.recv_into(buf):
                    tls.send(buf[:n])
                    meter.to_rpc_server += n
            else:
                while n := local.recv_into(buf):
                    tls.send(buf[:n])
                    meter.from_rpc_server += n
        except OSError as exc:  # ssl.SSLError included
            self._ended(exc)
        finally:
            self.abort()

    def _net_to_local(self, local: socket.socket, tls: _Tls, meter: _Meter, host_side: bool) -> None:
        raw, out = memoryview(bytearray(CHUNK)), memoryview(bytearray(CHUNK))
        try:
            early = tls.take_read_ahead()
            local.sendall(early)
            n = len(early)
            while True:
                if host_side:
                    meter.from_rpc_server += n
                else:
                    meter.to_rpc_server += n
                n = tls.recv_into(raw, out)
                if not n:
                    break
                local.sendall(out[:n])
        except OSError as exc:
            self._ended(exc)
        finally:
            self.abort()

    def _ended(self, exc: Exception) -> None:
        if not self.aborted:
            log.debug("data-plane tunnel ended: %s", exc)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# --- request/answer services: one authenticated connection, one thread ---------------------------------


class Stream:
    """An authenticated data-plane connection used by one thread at a time for a request and its
    answer (a `Service` on the server, `connect()` on the client), instead of a spliced tunnel:
    frames (`u32 big-endian length | JSON`) and raw bytes, both inside TLS.

    Every socket operation is bounded by `timeout` seconds of silence. `abort()` (any thread) ends it:
    a blocked read or write raises OSError."""

    def __init__(self, tls: _Tls, peer: hs.Peer, tunnel: _Tunnel | None = None, timeout: float = IO_TIMEOUT_S) -> None:
        self.peer = peer
        self._tls, self._tunnel = tls, tunnel
        self._raw = memoryview(bytearray(CHUNK))
        self.aborted = False
        tls.sock.settimeout(timeout)
        tls._more = True  # look into the TLS object before the socket: the frame reader may have read ahead

    def send(self, data: bytes | memoryview) -> None:
        self._tls.send(data)

    def send_json(self, obj: dict[str, Any]) -> None:
        self._tls.send(encode_json(obj))

    def read_into(self, out: memoryview) -> int:
        """Up to len(out) bytes into `out`; 0 at the end of the stream."""
        plain = self._tls._plain
        if plain:
            n = min(len(out), len(plain))
            out[:n] = plain[:n]
            del plain[:n]
            return n
        return self._tls.recv_into(self._raw, out)

    def read_exactly(self, size: int) -> bytes:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = self.read_into(view[got:])
            if not n:
                raise ProtocolError(f"the peer closed the connection {size - got} bytes short of a message")
            got += n
        return bytes(buf)

    def read_json(self, limit: int = FRAME_LIMIT) -> dict[str, Any]:
        size = int.from_bytes(self.read_exactly(4), "big")
        if size > limit:
            raise ProtocolError(f"frame of {size} bytes exceeds {limit}")
        return decode_json(self.read_exactly(size))

    def wait_closed(self) -> None:
        """Read until the peer closes (the end of a request: it has everything it asked for)."""
        buf = memoryview(bytearray(4096))
        while self.read_into(buf):
            pass

    def abort(self) -> None:
        self.aborted = True
        if self._tunnel is not None:
            self._tunnel.abort()
        else:
            _shutdown(self._tls.sock)

    def close(self) -> None:
        self._tls.sock.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Service = Callable[[dict[str, Any], Stream], None]  # (the request, its authenticated stream); blocking


def connect(
    identity: Identity,
    credentials: CredentialsProvider,
    remote: str,
    request: dict[str, Any],
    *,
    expect_node_id: str | None = None,
    bind_host: str | None = None,
    timeout: float = IO_TIMEOUT_S,
) -> Stream:
    """Open an authenticated connection to the data plane at `remote` and send `request` (its `type`
    names a service there). Blocking; the caller reads the answer and closes the stream.

    Raises OSError when `remote` cannot be reached, AuthError/ProtocolError when the handshake fails."""
    host, port = split_address(remote)
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        if bind_host not in (None, "", "0.0.0.0", "::"):
            sock.bind((bind_host, 0))
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        sock.connect(addr)
        _nodelay(sock)
        tls = _Tls(sock, _client_context(), server_side=False)
        tls.handshake()
        peer = _authenticate_server(tls, identity, credentials(), remote, expect_node_id)
        tls.send_json(request)
        return Stream(tls, peer, timeout=timeout)
    except ssl.SSLError as exc:
        sock.close()
        raise ProtocolError(f"TLS with {remote} failed: {exc}") from exc
    except BaseException:
        sock.close()
        raise


# --- the shared listener machinery --------------------------------------------------------------------


class _Listener:
    """Accepts on the event loop; serves each connection on its own thread; closes everything.

    With `admission` (the worker's listener, open to the network), a connection waits to authenticate
    only if admitted for its source address, and is closed `HANDSHAKE_TIMEOUT_S` after it was accepted
    unless it authenticated; refusals are logged rate-limited. Without (the host's relay on 127.0.0.1,
    whose clients are local), every connection is served at once."""

    def __init__(
        self,
        admission: Admission[_Tunnel] | None = None,
        known_sources: Callable[[], Collection[str]] = frozenset,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._tunnels: set[_Tunnel] = set()
        self._threads: set[threading.Thread] = set()
        self._admission, self._known_sources, self._clock = admission, known_sources, clock
        self._refusals = RefusalLog("data plane: ")
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self._closing = False
        self.port = 0
        self.refused = 0  # connections refused (admission, handshake, deadline, unknown target)

    @property
    def pending(self) -> int:
        """Connections accepted that have not authenticated yet."""
        with self._lock:
            return self._admission.pending if self._admission is not None else 0

    def _listen(self, host: str, port: int) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen for the RPC data plane on TCP {host}:{port}: {exc.strerror}") from exc
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        if self._admission is not None:
            self._sweep_task = asyncio.get_running_loop().create_task(self._sweep())
        return self.port

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and the like: back off, keep serving
                log.warning("data plane: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            tunnel = _Tunnel(self, conn, None)
            if self._admission is not None:
                source = source_ip(str(addr[0]))
                known = source in self._known_sources()
                with self._lock:
                    reason = self._admission.admit(tunnel, source, known=known, now=self._clock())
                if reason is not None:
                    with contextlib.suppress(OSError):  # reset: nothing of it lingers here
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                    self._refuse(tunnel, source, reason)
                    continue
            conn.setblocking(True)
            _nodelay(conn)
            with self._lock:
                self._tunnels.add(tunnel)
                thread = threading.Thread(
                    target=self._run_tunnel, args=(tunnel, conn, addr), name=f"dataplane-{self.port}", daemon=True
                )
                self._threads.add(thread)
            thread.start()

    def _run_tunnel(self, tunnel: _Tunnel, conn: socket.socket, addr: Any) -> None:
        try:
            self._serve(tunnel, conn, addr)
        except Exception:
            log.exception("data plane: tunnel failed")
        finally:
            tunnel.abort()
            tunnel.close_sockets()
            with self._lock:
                if self._admission is not None:
                    self._admission.release(tunnel)
                self._tunnels.discard(tunnel)
                self._threads.discard(threading.current_thread())

    def _serve(self, tunnel: _Tunnel, conn: socket.socket, addr: Any) -> None:
        raise NotImplementedError

    def _done_pending(self, tunnel: _Tunnel) -> None:
        """`tunnel` authenticated: no longer limited, no longer under the deadline."""
        if self._admission is not None:
            with self._lock:
                self._admission.release(tunnel)

    def _refuse(self, tunnel: _Tunnel | None, source: str, reason: object, who: str | None = None) -> None:
        """Count a refused connection and log it, rate-limited (`RefusalLog`); once per tunnel."""
        with self._lock:
            if tunnel is not None:
                if tunnel.refused:
                    return
                tunnel.refused = True
            self.refused += 1
            line = self._refusals.refused(source, str(reason) or type(reason).__name__, self._clock(), who)
        if line:
            log.warning("%s", line)

    async def _sweep(self) -> None:
        """Close connections still unauthenticated `HANDSHAKE_TIMEOUT_S` after they were accepted (their
        thread sees its socket shut and ends), and log the refusals' summary when one is due."""
        assert self._admission is not None
        while True:
            await asyncio.sleep(SWEEP_S)
            now = self._clock()
            with self._lock:
                late = self._admission.overdue(now)
            for tunnel, source in late:
                self._refuse(tunnel, source, f"did not authenticate within {HANDSHAKE_TIMEOUT_S:g} s")
                tunnel.abort()
            with self._lock:
                line = self._refusals.due(now)
            if line:
                log.warning("%s", line)

    async def close(self) -> None:
        """Stop accepting, end every tunnel (both of its sockets close) and join its threads."""
        self._closing = True
        for task in (self._accept_task, self._sweep_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._accept_task = self._sweep_task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            tunnels = list(self._tunnels)
        for tunnel in tunnels:
            tunnel.abort()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while True:
            with self._lock:
                threads = [t for t in self._threads if t.is_alive()]
            if not threads:
                break
            if time.monotonic() > deadline:
                log.warning("data plane: %d tunnel threads still running after close", len(threads))
                break
            await asyncio.sleep(0.002)
        for thread in threads:
            thread.join(0)


def _server_context(identity: Identity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.num_tickets = 0
    ctx.set_alpn_protocols([ALPN])
    cert = make_certificate(identity.key, identity.node_id)
    key_pem = identity.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with tempfile.TemporaryDirectory(prefix="mesh-llm-tls-") as d:  # 0700; ssl loads only from files
        cert_path, key_path = Path(d) / "cert.pem", Path(d) / "key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the mesh handshake checks the certificate's key instead
    ctx.set_alpn_protocols([ALPN])
    return ctx


# --- worker side ----------------------------------------------------------------------------------------


class DataPlaneServer(_Listener):
    """The worker's end: TLS on `host:port` (the mesh interface); authenticated hosts reach the
    local rpc-server registered under the name they ask for.

    `targets` (name → 127.0.0.1 port) may change at any time; `counters[name]` counts per target;
    `refused` counts connections refused (logged rate-limited). Unauthenticated connections are limited
    per source address, and `known_sources()` (addresses of known members) take reserved slots."""

    def __init__(
        self,
        identity: Identity,
        credentials: CredentialsProvider,
        host: str = "0.0.0.0",
        port: int = 0,
        *,
        targets: dict[str, int] | None = None,
        known_sources: Callable[[], Collection[str]] = frozenset,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        limits = Limits(per_source=PER_SOURCE, shared=SHARED, reserved=RESERVED, deadline_s=HANDSHAKE_TIMEOUT_S)
        super().__init__(Admission(limits), known_sources, clock)
        self.identity = identity
        self.credentials = credentials
        self.host = host
        self.requested_port = port
        self.targets: dict[str, int] = targets if targets is not None else {}
        self.services: dict[str, Service] = {}
        self.counters: dict[str, ByteCounters] = {}
        self._ctx = _server_context(identity)

    async def start(self) -> int:
        """Listen; returns the TCP port. Pair with `close()`."""
        return self._listen(self.host, self.requested_port)

    async def __aenter__(self) -> DataPlaneServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def counter(self, target: str) -> ByteCounters:
        with self._lock:
            return self.counters.setdefault(target, ByteCounters())

    def _serve(self, tunnel: _Tunnel, conn: socket.socket, addr: Any) -> None:
        who = f"{addr[0]}:{addr[1]}"
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        tls = _Tls(conn, self._ctx, server_side=True)
        try:
            tls.handshake()
            peer = self._authenticate(tls)
            who = f"node {peer.node_id} at {who}"
            request = tls.read_json()
            kind = request.get("type")
            service = self.services.get(kind) if isinstance(kind, str) and kind != "target" else None
            if service is None:
                if kind != "target":
                    tls.send_json(hs.refused(f"no service {kind!r} on this node"))
                    raise ProtocolError(f"asked for unknown service {kind!r}")
                name = msg_field(request, "target", str, 256)
                port = self.targets.get(name)
                if port is None:
                    tls.send_json(hs.refused(f"no target {name!r} on this node"))
                    raise AuthError(f"asked for unknown target {name!r}")
        except (AuthError, ProtocolError, ssl.SSLError, OSError) as exc:
            reason: object = exc if str(exc) else type(exc).__name__
            if isinstance(exc, TimeoutError):  # the socket's own timeout ("timed out") is the same deadline
                reason = f"did not authenticate within {HANDSHAKE_TIMEOUT_S:g} s"
            self._refuse(tunnel, source_ip(str(addr[0])), reason, who)
            return
        if service is not None:
            self._done_pending(tunnel)
            self._run_service(service, request, Stream(tls, peer, tunnel), who)
            return
        try:
            local = socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT_S)
        except OSError as exc:
            log.warning("data plane: target %r (127.0.0.1:%d) for %s is down: %s", name, port, who, exc)
            with contextlib.suppress(OSError):
                tls.send_json(hs.refused(f"target {name!r} is not running"))
            return
        tunnel.add_socket(local)
        _nodelay(local)
        tls.send_json({"type": "ok"})
        self._done_pending(tunnel)
        counters = self.counter(name)
        log.debug("data plane: %s → target %r", who, name)
        tunnel.splice(local, tls, counters, host_side=False)

    def _run_service(self, service: Service, request: dict[str, Any], stream: Stream, who: str) -> None:
        log.debug("data plane: %s asks for %r", who, request.get("type"))
        try:
            service(request, stream)
        except (ProtocolError, ssl.SSLError, OSError) as exc:
            if not stream.aborted:
                log.info("data plane: %r for %s ended: %s", request.get("type"), who, exc or type(exc).__name__)

    def _authenticate(self, tls: _Tls) -> hs.Peer:
        creds, me = self.credentials(), self.identity
        try:
            nonce_c = hs.check_hello(tls.read_json(), creds.mesh_id)
            nonce_s = hs.nonce()
            tls.send_json(hs.challenge(nonce_s))
            auth = tls.read_json()
            client_pub = hs.parse_public_key(auth)
            t = _transcript(creds.mesh_id, nonce_c, nonce_s, me.public_bytes, client_pub)
            claimed = auth.get("node_id") if isinstance(auth.get("node_id"), str) else None
            peer = hs.check_proof("auth", auth, creds.accepted(claimed), t)
        except AuthError:
            with contextlib.suppress(OSError):
                tls.send_json(hs.refused("authentication failed"))
            raise
        tls.send_json(hs.proof("welcome", me.key, me.public_bytes, creds.secret, t))
        return peer


# --- host side ------------------------------------------------------------------------------------------


class Relay(_Listener):
    """The host's end for one remote target: llama-server connects to `127.0.0.1:port` (`--rpc`);
    each connection becomes an authenticated tunnel to `target` on the worker at `remote`.

    `expect_node_id`, when set, refuses any other node at that address. `bind_host` makes the
    outgoing connection leave from the mesh interface. A tunnel that cannot be opened closes
    llama-server's connection (llama-server then aborts, as it would for a dead rpc-server)."""

    def __init__(
        self,
        identity: Identity,
        credentials: CredentialsProvider,
        remote: str,
        target: str,
        *,
        expect_node_id: str | None = None,
        bind_host: str | None = None,
        local_port: int = 0,
    ) -> None:
        super().__init__()
        self.identity = identity
        self.credentials = credentials
        self.remote = remote
        self.remote_host, self.remote_port = split_address(remote)
        self.target = target
        self.expect_node_id = expect_node_id
        self.bind_host = bind_host
        self.requested_port = local_port
        self.counters = ByteCounters()
        self.peer: hs.Peer | None = None  # the worker, once a tunnel has authenticated
        self.failures = 0
        self._ctx = _client_context()

    async def start(self) -> int:
        """Listen on 127.0.0.1; returns the port to give llama-server (`--rpc 127.0.0.1:PORT`)."""
        return self._listen("127.0.0.1", self.requested_port)

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _serve(self, tunnel: _Tunnel, conn: socket.socket, addr: Any) -> None:
        try:
            net = self._dial(tunnel)
        except OSError as exc:
            self._fail(f"cannot reach {self.remote}: {exc}")
            return
        _nodelay(net)
        tls = _Tls(net, self._ctx, server_side=False)
        try:
            tls.handshake()
            self.peer = self._authenticate(tls)
            tls.send_json({"type": "target", "target": self.target})
            answer = tls.read_json()
            if answer.get("type") == "refused":
                raise AuthError(f"the worker refused: {answer.get('reason', '')}")
            if answer.get("type") != "ok":
                raise ProtocolError("expected ok")
        except (AuthError, ProtocolError, ssl.SSLError, OSError) as exc:
            self._fail(f"no tunnel to {self.target!r} at {self.remote}: {exc or type(exc).__name__}")
            return
        tunnel.splice(conn, tls, self.counters, host_side=True)

    def _dial(self, tunnel: _Tunnel) -> socket.socket:
        """Connect to the worker with a socket the tunnel already owns, so `close()` interrupts a
        connect that hangs (Linux: shutdown() of a connecting socket ends the connect)."""
        family, kind, proto, _, addr = socket.getaddrinfo(self.remote_host, self.remote_port, type=socket.SOCK_STREAM)[
            0
        ]
        net = socket.socket(family, kind, proto)
        tunnel.add_socket(net)
        if self.bind_host not in (None, "", "0.0.0.0", "::"):
            net.bind((self.bind_host, 0))
        net.settimeout(HANDSHAKE_TIMEOUT_S)
        net.connect(addr)
        return net

    def _fail(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
        log.warning("data plane: %s", reason)

    def _authenticate(self, tls: _Tls) -> hs.Peer:
        return _authenticate_server(tls, self.identity, self.credentials(), self.remote, self.expect_node_id)


def _authenticate_server(
    tls: _Tls, me: Identity, creds: Credentials, remote: str, expect_node_id: str | None
) -> hs.Peer:
    """The connecting side of the mesh handshake: prove ourselves, check the server's proof and key."""
    nonce_c = hs.nonce()
    tls.send_json(hs.hello(creds.mesh_id, nonce_c))
    nonce_s = hs.check_challenge(tls.read_json())
    server_pub = tls.peer_public_key()
    t = _transcript(creds.mesh_id, nonce_c, nonce_s, server_pub, me.public_bytes)
    tls.send_json(hs.proof("auth", me.key, me.public_bytes, creds.secret, t))
    peer = hs.check_proof("welcome", tls.read_json(), creds.accepted(None) or (creds.secret,), t)
    if peer.public_key != server_pub:
        raise AuthError("worker's handshake key differs from its TLS certificate")
    if expect_node_id is not None and peer.node_id != expect_node_id:
        raise AuthError(f"{remote} is node {peer.node_id}, not {expect_node_id}")
    return peer


@contextlib.asynccontextmanager
async def open_relay(
    identity: Identity, credentials: CredentialsProvider, remote: str, target: str, **options: Any
) -> AsyncIterator[Relay]:
    """A started `Relay` (its local port is `relay.port`), closed on exit."""
    relay = Relay(identity, credentials, remote, target, **options)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()

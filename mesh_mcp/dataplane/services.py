"""What an authenticated data-plane connection may ask for, and the client that asks.

The first frame after the mesh handshake is the request. `{"type": "target", "target": NAME}` asks for
rpc-server forwarding: the worker looks NAME up in its `targets` (name → local rpc-server port, filled when it
starts rpc-servers), refuses unknown names, connects to 127.0.0.1:port, answers ok, and the connection becomes
a spliced tunnel (`splice.py`). A request with `"native": RANDOM` (and an ok with the worker's own) makes it a
native tunnel instead (`native.py`: AES-256-GCM records spliced in C, keyed from both random values).
Any other `type` names a service registered in `services` (name → a blocking function of the request and a
`Stream`); it runs on that connection's thread. The `Stream` carries frames and
raw bytes inside TLS, one thread at a time, each socket operation bounded by `IO_TIMEOUT_S` of silence.
Unknown services and targets are refused.

`connect()` is the client: dial, TLS, handshake, send the request, and hand back the `Stream` to read the
answer from. `tensor_fetch.py` serves a model's tensors to workers that lack the file this way.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh_mcp.dataplane import limits, native
from mesh_mcp.dataplane.splice import ByteCounters, Tunnel, shutdown
from mesh_mcp.dataplane.tls import CredentialsProvider, Tls, authenticate_server, client_context, nodelay
from mesh_mcp.errors import AuthError, ProtocolError
from mesh_mcp.mesh import handshake as hs
from mesh_mcp.mesh.identity import Identity
from mesh_mcp.mesh.tokens import split_address
from mesh_mcp.mesh.wire import decode_json, encode_json
from mesh_mcp.mesh.wire import field as msg_field

log = logging.getLogger("mesh_llm.dataplane")


class Stream:
    """An authenticated data-plane connection used by one thread at a time for a request and its
    answer (a `Service` on the server, `connect()` on the client), instead of a spliced tunnel:
    frames (`u32 big-endian length | JSON`) and raw bytes, both inside TLS.

    Every socket operation is bounded by `timeout` seconds of silence. `abort()` (any thread) ends it:
    a blocked read or write raises OSError."""

    def __init__(
        self, tls: Tls, peer: hs.Peer, tunnel: Tunnel | None = None, timeout: float = limits.IO_TIMEOUT_S
    ) -> None:
        self.peer = peer
        self._tls, self._tunnel = tls, tunnel
        self._raw = memoryview(bytearray(limits.CHUNK))
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

    def read_json(self, limit: int = limits.FRAME_LIMIT) -> dict[str, Any]:
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
            shutdown(self._tls.sock)

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
    timeout: float = limits.IO_TIMEOUT_S,
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
        sock.settimeout(limits.HANDSHAKE_TIMEOUT_S)
        sock.connect(addr)
        nodelay(sock)
        tls = Tls(sock, client_context(), server_side=False)
        tls.handshake()
        peer = authenticate_server(tls, identity, credentials(), remote, expect_node_id)
        tls.send_json(request)
        return Stream(tls, peer, timeout=timeout)
    except ssl.SSLError as exc:
        sock.close()
        raise ProtocolError(f"TLS with {remote} failed: {exc}") from exc
    except BaseException:
        sock.close()
        raise


# --- the worker's side: what a request may name ---------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A request for rpc-server forwarding: the local rpc-server registered as `name` listens on `port`."""

    name: str
    port: int


def route(tls: Tls, request: dict[str, Any], services: dict[str, Service], targets: dict[str, int]) -> Service | Target:
    """The service or target `request` names. An unknown one is refused (the peer is told) with
    ProtocolError (a service) or AuthError (a target)."""
    kind = request.get("type")
    service = services.get(kind) if isinstance(kind, str) and kind != "target" else None
    if service is not None:
        return service
    if kind != "target":
        tls.send_json(hs.refused(f"no service {kind!r} on this node"))
        raise ProtocolError(f"asked for unknown service {kind!r}")
    name = msg_field(request, "target", str, 256)
    port = targets.get(name)
    if port is None:
        tls.send_json(hs.refused(f"no target {name!r} on this node"))
        raise AuthError(f"asked for unknown target {name!r}")
    return Target(name, port)


def forward(
    tunnel: Tunnel,
    tls: Tls,
    target: Target,
    who: str,
    counter: Callable[[str], ByteCounters],
    admitted: Callable[[], None],
    offered: object = None,
) -> None:
    """rpc-server forwarding: connect to `target`, answer ok, call `admitted()` (the connection is no longer
    pending), splice until either side ends. A target that is down is refused (the peer is told).

    `offered`: the request's `native` (the host's random bytes): when this node can too, the answer carries its
    own and both ends splice in C (`native.py`); otherwise in Python, inside TLS."""
    name, port = target.name, target.port
    try:
        local = socket.create_connection(("127.0.0.1", port), timeout=limits.HANDSHAKE_TIMEOUT_S)
    except OSError as exc:
        log.warning("data plane: target %r (127.0.0.1:%d) for %s is down: %s", name, port, who, exc)
        with contextlib.suppress(OSError):
            tls.send_json(hs.refused(f"target {name!r} is not running"))
        return
    tunnel.add_socket(local)
    nodelay(local)
    mine = native.offer() if isinstance(offered, str) and tls.quiet() else None
    keys = None
    if mine is not None:
        try:
            keys = native.keys(str(offered), mine, host_side=False)
        except ProtocolError as exc:
            log.info("data plane: %s offered a malformed native splice (%s); splicing in TLS", who, exc)
            mine = None
    tls.send_json({"type": "ok", **({"native": mine} if mine is not None else {})})
    admitted()
    counters = counter(name)
    log.debug("data plane: %s → target %r%s", who, name, " (native)" if keys else "")
    if keys is not None:
        tunnel.splice_native(local, tls.sock, keys, counters, host_side=False)
    else:
        tunnel.splice(local, tls, counters, host_side=False)


def run_service(service: Service, request: dict[str, Any], stream: Stream, who: str) -> None:
    """Run a registered service on this thread; its end by a peer's or the network's failure is logged."""
    log.debug("data plane: %s asks for %r", who, request.get("type"))
    try:
        service(request, stream)
    except (ProtocolError, ssl.SSLError, OSError) as exc:
        if not stream.aborted:
            log.info("data plane: %r for %s ended: %s", request.get("type"), who, exc or type(exc).__name__)

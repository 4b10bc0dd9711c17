"""The data plane's listeners: accepting on the event loop, one thread per connection, admission of
unauthenticated connections, and closing everything; and the worker's listener, `DataPlaneServer`.

A worker's data plane listens on its mesh interface. Each connection is served on its own thread: TLS and
the mesh handshake (`tls.py`), then the request (`services.py`): rpc-server forwarding (a spliced tunnel,
`splice.py`) or a registered service. Unauthenticated connections are limited per source address
(`mesh/admission.py`), and closed `HANDSHAKE_TIMEOUT_S` after they were accepted unless they authenticated;
refusals are logged rate-limited. Admission reads the injected `Clock`; the waits that bound socket I/O stay
on real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from mesh_mcp.clock import SYSTEM_CLOCK, Clock
from mesh_mcp.dataplane import limits
from mesh_mcp.dataplane.services import Service, Stream, Target, forward, route, run_service
from mesh_mcp.dataplane.splice import ByteCounters, Tunnel
from mesh_mcp.dataplane.tls import CredentialsProvider, Tls, authenticate_client, nodelay, server_context
from mesh_mcp.errors import AuthError, ConfigError, ProtocolError
from mesh_mcp.mesh.admission import Admission, Limits, RefusalLog, source_ip
from mesh_mcp.mesh.identity import Identity

log = logging.getLogger("mesh_llm.dataplane")


class Listener:
    """Accepts on the event loop; serves each connection on its own thread; closes everything.

    With `admission` (the worker's listener, open to the network), a connection waits to authenticate
    only if admitted for its source address, and is closed `HANDSHAKE_TIMEOUT_S` after it was accepted
    unless it authenticated; refusals are logged rate-limited. Without (the host's relay on 127.0.0.1,
    whose clients are local), every connection is served at once."""

    def __init__(
        self,
        admission: Admission[Tunnel] | None = None,
        known_sources: Callable[[], Collection[str]] = frozenset,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._lock = threading.Lock()
        self._tunnels: set[Tunnel] = set()
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
            tunnel = Tunnel(self._lock, conn, None)
            if self._admission is not None:
                source = source_ip(str(addr[0]))
                known = source in self._known_sources()
                with self._lock:
                    reason = self._admission.admit(tunnel, source, known=known, now=self._clock.monotonic())
                if reason is not None:
                    with contextlib.suppress(OSError):  # reset: nothing of it lingers here
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                    self._refuse(tunnel, source, reason)
                    continue
            conn.setblocking(True)
            nodelay(conn)
            with self._lock:
                self._tunnels.add(tunnel)
                thread = threading.Thread(
                    target=self._run_tunnel, args=(tunnel, conn, addr), name=f"dataplane-{self.port}", daemon=True
                )
                self._threads.add(thread)
            thread.start()

    def _run_tunnel(self, tunnel: Tunnel, conn: socket.socket, addr: Any) -> None:
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

    def _serve(self, tunnel: Tunnel, conn: socket.socket, addr: Any) -> None:
        raise NotImplementedError

    def _done_pending(self, tunnel: Tunnel) -> None:
        """`tunnel` authenticated: no longer limited, no longer under the deadline."""
        if self._admission is not None:
            with self._lock:
                self._admission.release(tunnel)

    def _refuse(self, tunnel: Tunnel | None, source: str, reason: object, who: str | None = None) -> None:
        """Count a refused connection and log it, rate-limited (`RefusalLog`); once per tunnel."""
        with self._lock:
            if tunnel is not None:
                if tunnel.refused:
                    return
                tunnel.refused = True
            self.refused += 1
            line = self._refusals.refused(source, str(reason) or type(reason).__name__, self._clock.monotonic(), who)
        if line:
            log.warning("%s", line)

    async def _sweep(self) -> None:
        """Close connections still unauthenticated `HANDSHAKE_TIMEOUT_S` after they were accepted (their
        thread sees its socket shut and ends), and log the refusals' summary when one is due."""
        assert self._admission is not None
        while True:
            await self._clock.sleep(limits.SWEEP_S)
            now = self._clock.monotonic()
            with self._lock:
                late = self._admission.overdue(now)
            for tunnel, source in late:
                self._refuse(tunnel, source, f"did not authenticate within {limits.HANDSHAKE_TIMEOUT_S:g} s")
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
        deadline = time.monotonic() + limits.CLOSE_TIMEOUT_S
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


class DataPlaneServer(Listener):
    """The worker's end: TLS on `host:port` (the mesh interface); authenticated hosts reach the
    local rpc-server registered under the name they ask for.

    `targets` (name → 127.0.0.1 port) may change at any time; `counters[name]` counts per target, `users[name]`
    is the node whose tunnels reached it first (a split's host; `peer_bytes` sums the counters by it); another
    node's tunnels to the same target (the previous stage handing its output over) count as `NAME<-NODE`;
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
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        limits_ = Limits(
            per_source=limits.PER_SOURCE,
            shared=limits.SHARED,
            reserved=limits.RESERVED,
            deadline_s=limits.HANDSHAKE_TIMEOUT_S,
        )
        super().__init__(Admission(limits_), known_sources, clock)
        self.identity = identity
        self.credentials = credentials
        self.host = host
        self.requested_port = port
        self.targets: dict[str, int] = targets if targets is not None else {}
        self.services: dict[str, Service] = {}
        self.counters: dict[str, ByteCounters] = {}
        self.users: dict[str, str] = {}  # target -> node id of the host whose tunnels reached it (same keys)
        self._ctx = server_context(identity)

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

    def peer_bytes(self) -> dict[str, tuple[int, int]]:
        """Plaintext RPC bytes (to rpc-server: in, from it: out) by the node that sent them, over every target."""
        with self._lock:
            used = [(self.users.get(target), c) for target, c in self.counters.items()]
        out: dict[str, tuple[int, int]] = {}
        for node_id, c in used:
            if node_id is not None:
                was_in, was_out = out.get(node_id, (0, 0))
                out[node_id] = (was_in + c.to_rpc_server, was_out + c.from_rpc_server)
        return out

    def _serve(self, tunnel: Tunnel, conn: socket.socket, addr: Any) -> None:
        who = f"{addr[0]}:{addr[1]}"
        conn.settimeout(limits.HANDSHAKE_TIMEOUT_S)
        tls = Tls(conn, self._ctx, server_side=True)
        try:
            tls.handshake()
            peer = authenticate_client(tls, self.identity, self.credentials())
            who = f"node {peer.node_id} at {who}"
            request = tls.read_json()
            wanted = route(tls, request, self.services, self.targets)
        except (AuthError, ProtocolError, ssl.SSLError, OSError) as exc:
            reason: object = exc if str(exc) else type(exc).__name__
            if isinstance(exc, TimeoutError):  # the socket's own timeout ("timed out") is the same deadline
                reason = f"did not authenticate within {limits.HANDSHAKE_TIMEOUT_S:g} s"
            self._refuse(tunnel, source_ip(str(addr[0])), reason, who)
            return
        if isinstance(wanted, Target):
            with self._lock:  # a second node reaching a target (a split's previous stage) is counted apart
                key = wanted.name
                if self.users.setdefault(key, peer.node_id) != peer.node_id:
                    key = f"{wanted.name}<-{peer.node_id}"
                    self.users[key] = peer.node_id
            forward(
                tunnel,
                tls,
                wanted,
                who,
                lambda _name: self.counter(key),
                lambda: self._done_pending(tunnel),
                request.get("native"),
            )
            return
        self._done_pending(tunnel)
        run_service(wanted, request, Stream(tls, peer, tunnel), who)

"""Serving an ASGI app with uvicorn inside our task group, with bounded connections.

uvicorn's own signal handling is switched off (the node owns SIGINT/SIGTERM). `serve_http` signals
readiness once the socket is bound, raises a clear error when the port is taken, and on
cancellation shuts the server down gracefully (listeners closed, open streams given a moment).

Bounds (a slow or idle client cannot hold the server's sockets): uvicorn has no request-head timeout
(200 connections that sent headers a byte at a time stayed open, fds 16 → 216), so `_BoundedH11` closes
a connection whose request head is not complete `header_timeout_s` after the connection opened or after
its first byte (for a kept-alive connection; idle kept-alive connections are closed by uvicorn's
`timeout_keep_alive`), and one that goes silent for `body_idle_s` in the middle of a body. Request heads
are capped at `MAX_HEAD_BYTES` (h11 answers 400 past it), the connections of one server at
`max_connections` (uvicorn answers 503 past it), and those from one address other than this machine's at
`per_source` (answered 503 and closed at once: one stranger cannot take every slot of a `--listen-all` node).
Bodies are bounded by `httpguard`.
`MESH_LLM_HTTP_HEADER_TIMEOUT_S` overrides the head timeout (tests use a short one).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Generator

import anyio
import h11
import uvicorn
from anyio.abc import TaskStatus
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from mesh_mcp.api.guard import is_loopback_ip
from mesh_mcp.errors import ConfigError

log = logging.getLogger("mesh_llm.http")

GRACEFUL_S = 3
HEADER_TIMEOUT_S = 10.0  # a request head is a few hundred bytes: 10 s is generous on any link
KEEP_ALIVE_S = 15  # an idle kept-alive connection (SDK pools reuse them within seconds)
BODY_IDLE_S = 30.0  # silence allowed in the middle of a request body (a slow upload still sends every second)
MAX_HEAD_BYTES = 16 << 10  # request line + headers (h11's default; SDK requests send ~1 KiB)
MAX_CONNECTIONS = 512  # per server; past it uvicorn answers 503 (the default fd limit is 1024)
PER_SOURCE = 64  # open connections from one remote address (an SDK's pool keeps ≤ 20; loopback is not counted)
HEADER_TIMEOUT_ENV = "MESH_LLM_HTTP_HEADER_TIMEOUT_S"
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: 46\r\n\r\nthe request headers did not arrive in time\r\n\r\n"
)
_BUSY_BODY = b"too many open connections from your address; retry shortly\r\n"
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"retry-after: 5\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _BoundedH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request head and a limit on silence mid-body (see the
    module docstring)."""

    header_timeout_s = HEADER_TIMEOUT_S
    body_idle_s = BODY_IDLE_S
    per_source = PER_SOURCE
    exempt: Callable[[str], bool] = staticmethod(is_loopback_ip)
    open_by_source: Counter[str]  # one per server (`_protocol` makes the class)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_seen_at = 0.0
        self._source: str | None = None
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not self.exempt(source):
            if self.open_by_source[source] >= self.per_source:
                transport.write(_BUSY_RESPONSE)
                transport.close()
                return
            self.open_by_source[source] += 1
            self._source = source
        self._arm_head_timer()  # a new connection must send a whole request head in time

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE:
            self._arm_head_timer()  # no-op when armed: dripping bytes does not push the deadline back
        else:
            self._cancel_head_timer()  # the head is complete (or the connection failed)
        if state is h11.SEND_BODY:
            self._body_seen_at = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.body_idle_s, self._body_check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._source is not None:
            self.open_by_source[self._source] -= 1
            if self.open_by_source[self._source] <= 0:
                del self.open_by_source[self._source]
            self._source = None
        self._cancel_head_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().connection_lost(exc)

    def _body_check(self) -> None:
        """A client that stops sending mid-body is closed after `body_idle_s` of silence, unless the silence
        is ours (reading paused while the app works through what it has)."""
        self._body_timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        quiet = self.loop.time() - self._body_seen_at
        if quiet >= self.body_idle_s and not self.flow.read_paused:
            self.transport.close()
            return
        self._body_timer = self.loop.call_later(max(self.body_idle_s - quiet, 0.1), self._body_check)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()


def _protocol(
    header_timeout_s: float, body_idle_s: float, per_source: int, exempt: Callable[[str], bool]
) -> type[H11Protocol]:
    attrs = {
        "header_timeout_s": header_timeout_s,
        "body_idle_s": body_idle_s,
        "per_source": per_source,
        "exempt": staticmethod(exempt),
        "open_by_source": Counter(),
    }
    return type("BoundedH11", (_BoundedH11,), attrs)


def _env_header_timeout() -> float:
    raw = os.environ.get(HEADER_TIMEOUT_ENV)
    if not raw:
        return HEADER_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        log.warning("%s=%r is not seconds in (0, 3600]; using %g", HEADER_TIMEOUT_ENV, raw, HEADER_TIMEOUT_S)
        return HEADER_TIMEOUT_S
    return value


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use (another mesh-llm?); pick another port"
            ) from exc
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve_http(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    header_timeout_s: float | None = None,
    body_idle_s: float = BODY_IDLE_S,
    keep_alive_s: int = KEEP_ALIVE_S,
    max_connections: int = MAX_CONNECTIONS,
    per_source: int = PER_SOURCE,
    exempt: Callable[[str], bool] = is_loopback_ip,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until cancelled; `task_status.started(port)` once listening. `header_timeout_s` defaults to
    `HEADER_TIMEOUT_S`, or `MESH_LLM_HTTP_HEADER_TIMEOUT_S` when set. `exempt(address)`: sources not held to
    `per_source` (this machine's)."""
    sock = bind_socket(host, port)
    actual_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http=_protocol(
            header_timeout_s if header_timeout_s is not None else _env_header_timeout(), body_idle_s, per_source, exempt
        ),
        ws="none",
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_S,
        timeout_keep_alive=keep_alive_s,
        limit_concurrency=max_connections,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
    server = _Server(config)

    finished = anyio.Event()

    async def run() -> None:
        try:
            with anyio.CancelScope(shield=True):  # shut down by should_exit, not by cancellation
                await server.serve(sockets=[sock])
        finally:
            finished.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            while not server.started:
                if finished.is_set():
                    raise ConfigError(f"the HTTP server on {host}:{port} failed to start")
                await anyio.sleep(0.005)
            task_status.started(actual_port)
            try:
                await anyio.sleep_forever()
            finally:
                server.should_exit = True
    finally:
        sock.close()

"""Serving an ASGI app with uvicorn inside our task group.

uvicorn's own signal handling is switched off (the node owns SIGINT/SIGTERM). `serve_http` signals
readiness once the socket is bound, raises a clear error when the port is taken, and on
cancellation shuts the server down gracefully (listeners closed, open streams given a moment).
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Generator

import anyio
import uvicorn
from anyio.abc import TaskStatus
from starlette.types import ASGIApp

from inference.errors import ConfigError

GRACEFUL_S = 3


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
    app: ASGIApp, host: str, port: int, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve `app` until cancelled; `task_status.started(port)` once listening."""
    sock = bind_socket(host, port)
    actual_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_S,
        timeout_keep_alive=30,
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

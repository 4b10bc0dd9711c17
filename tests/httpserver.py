"""A local HTTP file server for download tests: Range support, redirects and scripted faults.

`FileServer` serves in-memory files from a threaded `http.server` on 127.0.0.1 (port 0) and records
every request. Faults are queued per path and consumed one per request, so a test can say "cut the
first response after 1000 bytes, then behave". Use it as a context manager; leaving it shuts the
server down and joins its thread.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


@dataclass(frozen=True)
class Fault:
    cut_after: int | None = None  # send headers for the full body, then only this many body bytes, then close
    status: int | None = None  # answer with this status and a short body instead of the file
    html: bool = False  # answer 200 with an HTML page instead of the file
    ignore_range: bool = False  # answer 200 with the whole file even when a Range was asked for


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class _State:
    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    faults: dict[str, deque[Fault]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # silence the default stderr logging
        pass

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        with state.lock:
            state.requests.append(Request("GET", path, {k.lower(): v for k, v in self.headers.items()}))
            queue = state.faults.get(path)
            fault = queue.popleft() if queue else Fault()
            target = state.redirects.get(path)
            body = state.files.get(path)
        if target is not None:
            self._send(302, b"", extra={"Location": target})
            return
        if fault.status is not None:
            self._send(fault.status, f"error {fault.status}\n".encode())
            return
        if fault.html:
            page = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
            self._send(200, page, extra={"Content-Type": "text/html; charset=utf-8"})
            return
        if body is None:
            self._send(404, b"Entry not found")
            return
        start = 0
        status = 200
        extra: dict[str, str] = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        asked = self.headers.get("Range")
        if asked and not fault.ignore_range:
            start = int(asked.removeprefix("bytes=").split("-", 1)[0])
            if start >= len(body):
                self._send(416, b"", extra={"Content-Range": f"bytes */{len(body)}"})
                return
            status = 206
            extra["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        payload = body[start:]
        if fault.cut_after is not None:
            self._send(status, payload, extra=extra, cut_after=fault.cut_after)
        else:
            self._send(status, payload, extra=extra)

    def _send(
        self, status: int, body: bytes, *, extra: dict[str, str] | None = None, cut_after: int | None = None
    ) -> None:
        self.send_response(status)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        if cut_after is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if cut_after is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:cut_after])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up mid-body (a test's wrong-size download, say) is expected; others are not.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class FileServer:
    """In-memory files over HTTP on 127.0.0.1; `url` is its base URL."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = _State()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def state(self) -> _State:
        return self._server.state

    def add(self, path: str, body: bytes) -> str:
        with self.state.lock:
            self.state.files[path] = body
        return self.url + path

    def redirect(self, path: str, target: str) -> str:
        with self.state.lock:
            self.state.redirects[path] = target
        return self.url + path

    def fault(self, path: str, *faults: Fault) -> None:
        with self.state.lock:
            self.state.faults.setdefault(path, deque()).extend(faults)

    def requests(self, path: str | None = None) -> list[Request]:
        with self.state.lock:
            return [r for r in self.state.requests if path is None or r.path == path]

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

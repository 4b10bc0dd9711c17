"""A minimal HTTP/1.1 client for the one hop from the proxy to a local llama-server.

The proxy relays every streamed token, so the per-chunk cost of this hop decides how much of a
CPU core the proxy takes from llama-server (on a 2-core machine, the same cores). A general HTTP
client (httpx2 → httpcore2 → h11) cost about 0.6 ms of CPU per relayed chunk here; this reader
parses the status line and headers once and then reads chunked framing with `readline` +
`readexactly`, handing each chunk on untouched. Keep-alive connections are pooled per upstream.

`Response` (`mesh_mcp/response.py`) is also the shape the mesh tunnel produces, so the proxy relays either the same
way. A request given up at any point (cancelled before the head, or its body not read to the end) closes its
connection: llama-server stops decoding when its client's socket closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from mesh_mcp.errors import UpstreamBroken, UpstreamUnavailable
from mesh_mcp.response import Response

MAX_HEADER_BYTES = 64 << 10


class Pool:
    """Idle keep-alive connections per (host, port)."""

    def __init__(self, max_idle: int = 16) -> None:
        self._idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self.max_idle = max_idle

    def take(self, key: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        conns = self._idle.get(key, [])
        while conns:
            reader, writer = conns.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
            writer.close()
        return None

    def give(self, key: tuple[str, int], conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        conns = self._idle.setdefault(key, [])
        if len(conns) < self.max_idle:
            conns.append(conn)
        else:
            conn[1].close()

    def close(self) -> None:
        for conns in self._idle.values():
            for _, writer in conns:
                writer.close()
        self._idle.clear()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, list[tuple[bytes, bytes]]]:
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("connection closed before a response")
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ConnectionResetError(f"not an HTTP response: {line[:60]!r}")
    status = int(parts[1])
    headers: list[tuple[bytes, bytes]] = []
    size = len(line)
    while True:
        line = await reader.readline()
        size += len(line)
        if size > MAX_HEADER_BYTES:
            raise ConnectionResetError("response headers too large")
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return status, headers


async def request(
    pool: Pool, host: str, port: int, method: str, target: str, body: bytes, headers: list[tuple[bytes, bytes]]
) -> Response:
    """Send one request; return once the response head has arrived. Raises UpstreamUnavailable."""
    key = (host, port)
    head = [f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n".encode()]
    head += [k + b": " + v + b"\r\n" for k, v in headers]
    data = b"".join(head) + b"\r\n" + body
    # A pooled connection may have been closed by the server meanwhile: then retry on a fresh one.
    for attempt in range(2):
        conn = pool.take(key) if attempt == 0 else None
        try:
            if conn is None:
                conn = await asyncio.open_connection(host, port)
            reader, writer = conn
            writer.write(data)
            await writer.drain()
            status, resp_headers = await _read_head(reader)
            break
        except (OSError, ValueError) as exc:
            if conn is not None:
                conn[1].close()
            if attempt == 1 or not isinstance(exc, ConnectionError | ValueError):
                raise UpstreamUnavailable(f"{host}:{port}: {exc}") from exc
        except BaseException:
            if conn is not None:  # cancelled (the client hung up) before the head: llama-server sees the close
                conn[1].close()
            raise
    keep_alive = (dict(resp_headers).get(b"connection") or b"").lower() != b"close"
    return Response(status, resp_headers, _body(pool, key, reader, writer, resp_headers, keep_alive), [writer])


async def _body(
    pool: Pool,
    key: tuple[str, int],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    headers: list[tuple[bytes, bytes]],
    keep_alive: bool,
) -> AsyncIterator[bytes]:
    h = dict(headers)
    complete = False
    try:
        if h.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                size = int((await reader.readline()).split(b";", 1)[0], 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunk = await reader.readexactly(size)
                await reader.readexactly(2)
                yield chunk
        elif (length := h.get(b"content-length")) is not None:
            left = int(length)
            while left:
                chunk = await reader.read(min(left, 1 << 16))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(chunk)
                yield chunk
        else:
            keep_alive = False
            while chunk := await reader.read(1 << 16):
                yield chunk
        complete = True
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        raise UpstreamBroken(f"upstream response broke off: {exc}") from exc
    finally:
        if complete and keep_alive:
            pool.give(key, (reader, writer))
        else:
            writer.close()

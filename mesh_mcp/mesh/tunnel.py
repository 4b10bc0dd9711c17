"""HTTP over a mesh stream: an API request carried to the node that serves its model.

    requester → server   {"t": "http", "method", "target", "headers"}  then one data frame: the body
    server → requester   {"status", "headers"}  then data frames as the response streams,
                         then an empty frame meaning "complete"

The serving node runs the request through its own API app in-process (marked as already routed,
so it never hops again) and streams each chunk back as it is produced. A stream that ends without
the empty frame was cut off: the requester reports a mid-stream failure.

Cancellation crosses every hop. A requester that gives up (its own client hung up, or it was
cancelled before the head arrived) abandons the stream both ways: RESET_STREAM and STOP_SENDING
(`Connection.reset`; after the request's FIN only STOP_SENDING reaches the server). The server
watches its stream while the app runs: a reset, a STOP_SENDING or the connection dying delivers
`http.disconnect` to the app and cancels the call into it, so the Proxy there cancels its own
upstream — llama-server stops decoding, or the next hop's stream is abandoned the same way.

The server adds `Server-Timing: serve;dur=MS` to the head it sends back: its own time from the request's body to
that head, so the requester can tell the tunnel's share of its wait (`metrics/timing.py`'s `hop`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.types import ASGIApp, Message

from mesh_mcp.errors import PeerUnreachable, ProtocolError, UpstreamBroken, UpstreamUnavailable
from mesh_mcp.response import Response

from .transport import PeerConnection
from .wire import CONTROL_LIMIT, DATA_LIMIT, decode_json, encode, encode_json, field, read_frame

log = logging.getLogger("mesh_llm.mesh")

HOP_HEADER = b"x-mesh-llm-routed"
SERVER_TIMING = b"server-timing"
_MAX_HEADERS = 64
_BAD_HEADER_BYTES = re.compile(rb"[\r\n\x00]")


def _headers(value: Any) -> list[tuple[bytes, bytes]]:
    if not isinstance(value, list) or len(value) > _MAX_HEADERS:
        raise ProtocolError("headers must be a short list")
    out = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise ProtocolError("each header is a [name, value] pair of strings")
        try:
            name, text = item[0].lower().encode("latin-1"), item[1].encode("latin-1")
        except UnicodeEncodeError as exc:
            raise ProtocolError("header names and values must be latin-1 text") from exc
        if not name or _BAD_HEADER_BYTES.search(name + text):
            raise ProtocolError("a header name is empty, or a header holds CR, LF or NUL")
        out.append((name, text))
    return out


async def request(
    conn: PeerConnection, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> Response:
    """Send a request to the peer; return once its response head arrives (UpstreamUnavailable before).
    Cancelled before that (the client hung up during prompt processing), the stream is abandoned: the server
    stops too."""
    try:
        reader, writer = await conn.open_stream(
            {
                "t": "http",
                "method": method,
                "target": target,
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers],
            }
        )
    except PeerUnreachable as exc:  # the connection closed under us
        raise UpstreamUnavailable(str(exc)) from exc
    try:
        writer.write(encode(body))
        writer.write_eof()
        head_frame = await read_frame(reader, CONTROL_LIMIT)
        if head_frame is None:
            raise UpstreamUnavailable("the peer closed the stream without answering")
        head = decode_json(head_frame)
        status = field(head, "status", int)
        if not 100 <= status <= 599:
            raise ProtocolError(f"HTTP status {status} is not one")
        resp_headers = _headers(head.get("headers"))
    except (ConnectionError, ProtocolError, RuntimeError, asyncio.IncompleteReadError) as exc:
        conn.reset(writer)
        raise UpstreamUnavailable(f"peer {conn.peer.node_id if conn.peer else '?'}: {exc}") from exc
    except BaseException:
        conn.reset(writer)  # cancelled, or UpstreamUnavailable: the server must not keep working for nobody
        raise
    return Response(status, resp_headers, _body(conn, reader, writer))


async def _body(
    conn: PeerConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> AsyncIterator[bytes]:
    complete = False
    try:
        while True:
            frame = await read_frame(reader, DATA_LIMIT)
            if frame is None:
                raise UpstreamBroken("the serving node's stream ended early")
            if not frame:
                complete = True
                return
            yield frame
    except (ConnectionError, ProtocolError, asyncio.IncompleteReadError) as exc:
        raise UpstreamBroken(f"the serving node failed mid-response: {exc}") from exc
    finally:
        if not complete:
            conn.reset(writer)  # tell the server to stop generating


async def serve(
    app: ASGIApp,
    conn: PeerConnection,
    header: dict[str, Any],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Run one tunnelled request through the local API app, streaming the response back."""
    method = field(header, "method", str, 16)
    target = field(header, "target", str, 8192)
    headers = [h for h in _headers(header.get("headers")) if h[0] != HOP_HEADER] + [(HOP_HEADER, b"1")]
    body = await read_frame(reader, DATA_LIMIT)
    if body is None:
        raise ProtocolError("http request without a body frame")
    path, _, query = target.partition("?")
    try:
        raw_path, query_string = path.encode(), query.encode()
    except UnicodeEncodeError as exc:
        raise ProtocolError("the request target is not valid Unicode") from exc
    if not path.startswith("/"):
        raise ProtocolError("the request target must start with /")
    started = time.perf_counter()
    stream_id = writer.get_extra_info("stream_id")
    closed = conn.stream_closed(stream_id)
    peer = conn.peer.node_id if conn.peer else "?"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": raw_path,
        "query_string": query_string,
        "root_path": "",
        "headers": headers,
        "client": (f"mesh:{peer}", 0),
        "server": ("mesh", 0),
    }
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await closed.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if closed.is_set():
            raise ConnectionResetError("requester went away")
        if message["type"] == "http.response.start":
            serve = f"serve;dur={1e3 * (time.perf_counter() - started):.1f}".encode()
            sent = [*message.get("headers", []), (SERVER_TIMING, serve)]
            hdrs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in sent]
            writer.write(encode_json({"status": message["status"], "headers": hdrs}))
        elif message["type"] == "http.response.body":
            if chunk := message.get("body", b""):
                writer.write(encode(chunk))
            if not message.get("more_body", False):
                writer.write(encode(b""))
                writer.write_eof()

    failed: Exception | None = None
    async with anyio.create_task_group() as tg:
        # The app hears `http.disconnect` from `receive`; whatever it is doing, the call is cancelled too.
        tg.start_soon(_cancel_when_set, closed, tg.cancel_scope)
        try:
            await app(scope, receive, send)
        except Exception as exc:  # raised as itself below, not wrapped in the task group's ExceptionGroup
            failed = exc
        tg.cancel_scope.cancel()
    if failed is not None:
        raise failed
    if closed.is_set():
        log.debug("%s %s from %s: the requester went away; cancelled", method, path, peer)


async def _cancel_when_set(event: asyncio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()

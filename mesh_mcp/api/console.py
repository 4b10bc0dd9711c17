"""The console server on :3131: `GET /api/status` (JSON), `GET /api/events` (SSE of state changes),
the blackboard (`GET /api/blackboard` searches or lists the feed, `POST /api/blackboard` posts),
node controls for this machine only, the page (`GET /`) and its files (`GET /static/{file}`: only the package's
own `static/` scripts and styles, read once at start, with their content types), and `POST /api/chat`: an OpenAI
chat-completions body forwarded in-process to this node's own API app (so it is routed like any `/v1` request, to a
model of this node or of a peer) and its answer, streamed or not, passed straight back. `GET /metrics`: the node's
metrics in Prometheus' text format (`mesh_mcp.metrics`); like the blackboard, a remote viewer needs the API key.
The status and its events also carry `requests` (`requests_field`): this node's own request counts per model, the
numbers `mesh-llm top` and the page's models table show (errors are known only where a request entered).

Served behind `middleware.HttpGuard` (Host, Origin, keys, body limit); request bodies are parsed with
`jsonlimits` (a 10 000-deep body is a 400 with a sentence). The invite token is in `/api/status` only
for a request the guard found local, never in `/api/events`. Both carry `mesh` (`console_view.py`): members,
models and links. The chat is under the console's guard (Host, Origin, key; the API's body limit), never CORS-open.

The app's one error boundary (`_answer_error`): handlers raise `errors.HttpError` or the project's own errors
(a refused post, a control that failed), answered in the console's plain shape with the status each one means;
Starlette's own 404 (no such route) and 405 (a route that takes other methods, with `Allow`) are answered in the
same JSON shape (`_answer_http`), never as plain text.

Compatibility aliases (the reference implementation's console API, so its scripts and dashboards run unchanged):
`POST /api/blackboard/post` (`{"text", "from"?}` → the post, with its `id`), `GET /api/blackboard/feed?limit=&from=
&since=` and `GET /api/blackboard/search?q=&limit=&since=` (bare JSON arrays; `since` is unix seconds there). They are
thin adapters over the same `Board` calls, guards and limits as `/api/blackboard`; each post they return also carries
the reference's `from`, `peer_id` and `timestamp` (`compat_post`). The status carries the reference's `llama_ready`
(`llama_ready`) and, for a local request only (exactly where `invite_token` is), `token`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any, Protocol

import anyio
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from blackboard.board import MAX_RESULTS, Board
from blackboard.post import TTL_S, Post
from mesh_mcp.api.errors import HttpError, error_response
from mesh_mcp.api.middleware import is_local
from mesh_mcp.errors import BlackboardDiskFull, BlackboardError, MeshLLMError, PostTooLarge, RateLimited
from mesh_mcp.jsonlimits import JsonRejected, parse
from mesh_mcp.metrics import CONTENT_TYPE as METRICS_TYPE
from mesh_mcp.metrics import metrics_of, scrape
from mesh_mcp.state import SERVING, NodeState

KEEPALIVE_S = 15
WATCH_S = 2.0  # how often an open /api/events stream looks for changes gossip made (a member died, an RTT moved)
CHAT_PATH = "/v1/chat/completions"  # where the console's chat goes in this node's API
# The page's own files: a flat name with one of these suffixes, found in the package's static/ folder at start.
STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.(js|css|svg|png|ico)$")
# What the page may load and run: its own files only (no inline script, so model output put into the page cannot run).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
CHAT_USAGE = 'give an OpenAI chat-completions body: {"model": NAME, "messages": [{"role", "content"}, ...], ...}'


REQUEST_KEYS = ("ok", "client_error", "upstream_error", "cancelled", "in_flight", "tokens_out")


def requests_field(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, int]]:
    """The status's `requests`: `NodeMetrics.summary()` (per model label, requests that entered this node) as whole
    numbers, every key of `REQUEST_KEYS` present (0 when none). Bounded by the metrics' own cap on model labels."""
    return {model: {key: int(row.get(key, 0)) for key in REQUEST_KEYS} for model, row in sorted(summary.items())}


def llama_ready(snap: dict[str, Any]) -> bool:
    """The reference's `llama_ready`: this node can answer a chat now, because a model it runs is serving or a member
    of its mesh serves one (the reference sets it for a local llama-server or a remote host alike)."""
    if any(m.get("state") == SERVING for m in snap.get("models", [])):
        return True
    return any(row.get("servers") for row in (snap.get("mesh") or {}).get("models", []))


def status_of(node: NodeState, snap: dict[str, Any] | None = None) -> dict[str, Any]:
    """A status snapshot (`snap`, or a fresh one) with this node's request counts (`requests`) and `llama_ready`."""
    snap = node.snapshot() if snap is None else snap
    return {**snap, "requests": requests_field(metrics_of(node).summary()), "llama_ready": llama_ready(snap)}


class Controls(Protocol):
    """What the console may ask of the running node (loopback clients only)."""

    def drop(self, requested: str) -> str: ...

    def rotate_key(self, evict: Sequence[str] = (), add_owners: Sequence[str] = ()) -> str: ...


CONTROLS = ("drop", "rotate-key")  # POST /api/{control}; any other POST /api/NAME is a 404 "no such control"
ROTATE_KEY_USAGE = 'give {"evict"?: [NODE_ID, ...], "add_owner"?: [NODE_ID, ...]} (node ids: 16 hex characters)'


def _rotate_key(controls: Controls, raw: bytes) -> Response:
    """`POST /api/rotate-key` (an owner only): body empty or `{"evict": [...], "add_owner": [...]}`."""
    body = parse(raw) if raw.strip() else {}
    if not isinstance(body, dict) or set(body) - {"evict", "add_owner"}:
        raise HttpError(400, ROTATE_KEY_USAGE)
    lists = {key: body.get(key, []) for key in ("evict", "add_owner")}
    for value in lists.values():
        if not isinstance(value, list) or len(value) > 32 or not all(isinstance(n, str) for n in value):
            raise HttpError(400, ROTATE_KEY_USAGE)
    token = controls.rotate_key(lists["evict"], lists["add_owner"])
    return JSONResponse({"invite_token": token, "evicted": lists["evict"], "owners_added": lists["add_owner"]})


# The status of each refusal of the blackboard; any other of the project's errors (a control that failed) is 409.
_STATUS: tuple[tuple[type[MeshLLMError], int], ...] = (
    (RateLimited, 429),
    (BlackboardDiskFull, 507),
    (PostTooLarge, 413),
    (BlackboardError, 400),
)


async def _answer_error(request: Request, exc: Exception) -> Response:
    """The console's one error boundary: an `HttpError` or one of the project's errors, in the plain shape."""
    if isinstance(exc, HttpError):
        return exc.response("plain")
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 409)
    retry = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, RateLimited) else None
    return error_response("plain", status, str(exc), headers=retry)


async def _answer_http(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no route: 404; a route that takes other methods: 405 with `Allow`) as JSON."""
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
    headers = dict(exc.headers or {}) if isinstance(exc, StarletteHTTPException) else None
    path = request.url.path[:200]
    if status == 404:  # a POST to /api/NAME asks for a control (the controls' route)
        control = request.method == "POST" and re.fullmatch(r"/api/[^/]*", path) is not None
        message = "no such control" if control else f"no such console route: {request.method} {path}"
    elif status == 405:
        message = f"{path} does not take {request.method}; it takes {(headers or {}).get('Allow', 'other methods')}"
    else:
        message = str(getattr(exc, "detail", "")) or "the console cannot answer this request"
    return error_response("plain", status, message, headers=headers)


POST_USAGE = 'give {"text": "...", "author"?: "...", "reply_to"?: "<post id>"}'
COMPAT_DEFAULT_LIMIT = 20  # the reference's default for feed and search


def post_args(body: Any, *, compat: bool = False) -> tuple[str, str | None, str | None]:
    """A post body's text, author and reply_to, or `HttpError` 400. `compat`: the reference's body, whose author is
    `from` (its `peer_id` is ignored: a post's origin is the node that signs it)."""
    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
        raise HttpError(400, POST_USAGE + (' ("from" may name the author)' if compat else ""))
    author, reply_to = body.get("author"), body.get("reply_to")
    if compat and author is None:
        author = body.get("from") or None
    if not all(v is None or isinstance(v, str) for v in (author, reply_to)):
        raise HttpError(400, "author and reply_to are strings")
    return body["text"], author, reply_to


def compat_post(summary: dict[str, Any]) -> dict[str, Any]:
    """A post (`Post.summary()`) as the reference's API also shows it: `from` (the author), `peer_id` (the node it
    came from) and `timestamp` (whole unix seconds) beside the project's own fields."""
    return {**summary, "from": summary["author"], "peer_id": summary["origin"], "timestamp": int(summary["created"])}


def compat_window(since: str | None, limit: str | None, now: float) -> tuple[float | None, int]:
    """The reference's `since` (unix seconds; absent or 0: no filter) as the board's window in hours, and its `limit`
    held to the board's 1..`MAX_RESULTS`; `HttpError` 400 when either is not a number."""
    try:
        since_s = float(since) if since else 0.0
        count = int(limit) if limit else COMPAT_DEFAULT_LIMIT
    except ValueError as exc:
        raise HttpError(400, "since is unix seconds and limit a whole number") from exc
    count = min(max(count, 1), MAX_RESULTS)
    if not since_s > 0 or now - since_s >= TTL_S:  # no filter, or older than any post lives
        return None, count
    return max(now - since_s, 1.0) / 3600, count  # a `since` at or past now: the last second


def blackboard_routes(board: Board | None) -> list[Route]:
    """`GET /api/blackboard?q=&from=&kind=&since=HOURS&limit=` and `POST /api/blackboard`, and the reference's
    `POST /api/blackboard/post`, `GET /api/blackboard/feed` and `GET /api/blackboard/search` over the same calls."""

    def carried() -> Board:
        if board is None:
            raise HttpError(404, "this node does not carry the blackboard; start it with --blackboard")
        return board

    async def posted(request: Request, *, compat: bool) -> Post:
        found_board = carried()
        try:
            body = parse(await request.body())  # at most the guard's console body limit (64 KiB)
        except JsonRejected as exc:
            raise HttpError(400, str(exc)) from exc
        text, author, reply_to = post_args(body, compat=compat)
        source = request.client.host if request.client else None  # the per-client rate limit's key
        return await found_board.post(text, author=author, reply_to=reply_to, source=source)

    async def read(request: Request) -> Response:
        found_board = carried()
        q = request.query_params
        try:
            since = float(q["since"]) if q.get("since") else None
            limit = int(q.get("limit") or 20)
        except ValueError as exc:
            raise HttpError(400, "since is a number of hours and limit a whole number") from exc
        found = await found_board.search(
            q.get("q", ""), author=q.get("from") or None, kind=q.get("kind") or None, since_hours=since, limit=limit
        )
        return JSONResponse({"posts": [p.summary() for p in found]})

    async def write(request: Request) -> Response:
        post = await posted(request, compat=False)
        return JSONResponse({"post": post.summary()}, status_code=201)

    async def compat_write(request: Request) -> Response:
        post = await posted(request, compat=True)
        return JSONResponse(compat_post(post.summary()))  # the reference answers 200 with the post

    async def compat_read(request: Request) -> Response:
        found_board, q = carried(), request.query_params
        since, limit = compat_window(q.get("since"), q.get("limit"), time.time())
        query = q.get("q", "") if request.url.path.endswith("/search") else ""
        found = await found_board.search(
            query, author=q.get("from") or None, kind=q.get("kind") or None, since_hours=since, limit=limit
        )
        return JSONResponse([compat_post(p.summary()) for p in found])

    return [
        Route("/api/blackboard", read, methods=["GET"]),
        Route("/api/blackboard", write, methods=["POST"]),
        Route("/api/blackboard/post", compat_write, methods=["POST"]),
        Route("/api/blackboard/feed", compat_read, methods=["GET"]),
        Route("/api/blackboard/search", compat_read, methods=["GET"]),
    ]


def static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files (name → bytes, content type), read once from the package: nothing else is ever served."""
    folder = resources.files("mesh_mcp").joinpath("static")
    found = {}
    for entry in folder.iterdir():
        match = _STATIC_NAME.match(entry.name)
        if match and entry.is_file():
            found[entry.name] = (entry.read_bytes(), STATIC_TYPES["." + match.group(1)])
    return found


def chat_body(raw: bytes) -> dict[str, Any]:
    """The chat's body, checked as far as the console must (the API checks the rest); `HttpError` 400 otherwise."""
    try:
        body = parse(raw)
    except JsonRejected as exc:
        raise HttpError(400, f"{exc}; {CHAT_USAGE}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise HttpError(400, CHAT_USAGE)
    if not isinstance(body.get("model", ""), str):
        raise HttpError(400, CHAT_USAGE)
    return body


class Forward(Response):
    """The chat's answer: the API app runs on the console's own connection, so its status, headers and stream (SSE
    chunks as they come) reach the browser unchanged, and a browser that stops (closes) reaches the API as the
    disconnect that cancels the request upstream."""

    def __init__(self, api: ASGIApp, body: bytes) -> None:
        super().__init__()
        self.api, self.raw = api, body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = False

        async def once() -> dict[str, Any]:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": self.raw, "more_body": False}
            return dict(await receive())  # after the body: only the browser's disconnect

        # A fresh request to the API: no cookie, key or Origin of the console's request goes along.
        headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
        inner: Scope = {
            "type": "http",
            "asgi": scope.get("asgi", {"version": "3.0"}),
            "http_version": scope.get("http_version", "1.1"),
            "method": "POST",
            "scheme": "http",
            "path": CHAT_PATH,
            "raw_path": CHAT_PATH.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [*headers, (b"content-length", str(len(self.raw)).encode())],
            "client": scope.get("client"),
            "server": scope.get("server"),
            "state": {},
        }
        await self.api(inner, once, send)


def build_console(
    node: NodeState, controls: Controls | None = None, board: Board | None = None, *, api: ASGIApp | None = None
) -> Starlette:
    """The console app; `api` is this node's API app (unguarded: the console's guard checked the chat's request)."""
    page = resources.files("mesh_mcp").joinpath("static/index.html").read_text(encoding="utf-8")
    files = static_files()

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    async def static(request: Request) -> Response:
        found = files.get(request.path_params["file"])
        if found is None:
            raise HttpError(404, "no such file")
        content, media_type = found
        return Response(
            content, media_type=media_type, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
        )

    async def chat(request: Request) -> Response:
        if api is None:
            raise HttpError(503, "this console has no API to chat through")
        body = chat_body(await request.body())  # at most the API's own body limit (guard: CONSOLE_CHAT)
        return Forward(api, json.dumps(body).encode())

    async def status(request: Request) -> Response:
        snap = status_of(node)
        if is_local(request.scope):  # this machine, a loopback Host, no foreign web page: may see the secret
            snap["invite_token"] = node.invite_token
            snap["token"] = node.invite_token or ""  # the reference's name for it (its scripts read a string)
        return JSONResponse(snap)

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[dict[str, Any]]:
            # A model's state changes are pushed as they happen (`updates`); the mesh around the node (members
            # joining, dying, leaving, RTTs, demand) changes in gossip, which publishes nothing: every `WATCH_S` the
            # snapshot is taken again and sent when it differs from the last one sent.
            async with node.subscribe() as updates:
                sent = json.dumps(status_of(node))
                yield {"event": "status", "data": sent}
                quiet = 0.0
                while True:
                    data = None
                    with anyio.move_on_after(WATCH_S):
                        data = json.dumps(status_of(node, await updates.receive()))
                    if data is None:
                        data = json.dumps(status_of(node))
                    if data != sent:
                        sent, quiet = data, 0.0
                        yield {"event": "status", "data": data}
                        continue
                    quiet += WATCH_S
                    if quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        yield {"comment": "keepalive"}

        return EventSourceResponse(stream(), ping=None)

    async def metrics(request: Request) -> Response:
        posts = None if board is None else await board.count()
        return Response(await scrape(node, posts), media_type=METRICS_TYPE, headers={"Cache-Control": "no-store"})

    async def control(request: Request) -> Response:
        action = request.url.path.removeprefix("/api/")  # one of CONTROLS: each has its own route
        if controls is None or not is_local(request.scope):
            refused = "node controls are only open to this machine: ask 127.0.0.1 or localhost, not from a web page"
            raise HttpError(403, refused)
        try:
            body = parse(await request.body()) if action == "drop" else {}
            if action == "drop":
                if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                    raise HttpError(400, 'give {"model": NAME}')
                return JSONResponse({"dropped": controls.drop(body["model"])})
            return _rotate_key(controls, await request.body())
        except ValueError as exc:  # malformed JSON
            raise HttpError(400, f"malformed request: {exc}") from exc

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/status", status),
            Route("/api/events", events),
            Route("/static/{file:str}", static),
            Route("/api/chat", chat, methods=["POST"]),
            Route("/metrics", metrics),
            *blackboard_routes(board),
            *(Route(f"/api/{action}", control, methods=["POST"]) for action in CONTROLS),
        ],
        exception_handlers={MeshLLMError: _answer_error, StarletteHTTPException: _answer_http},
    )

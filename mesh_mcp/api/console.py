"""The console server on :3131: `GET /api/status` (JSON), `GET /api/events` (SSE of state changes),
the blackboard (`GET /api/blackboard` searches or lists the feed, `POST /api/blackboard` posts),
node controls for this machine only, and a small HTML page that shows the status.

Served behind `middleware.HttpGuard` (Host, Origin, keys, body limit); request bodies are parsed with
`jsonlimits` (a 10 000-deep body is a 400 with a sentence). The invite token is in `/api/status` only
for a request the guard found local, never in `/api/events`.

The app's one error boundary (`_answer_error`): handlers raise `errors.HttpError` or the project's own errors
(a refused post, a control that failed), answered in the console's plain shape with the status each one means.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any, Protocol

import anyio
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from blackboard.board import Board
from mesh_mcp.api.errors import HttpError, error_response
from mesh_mcp.api.middleware import is_local
from mesh_mcp.errors import BlackboardDiskFull, BlackboardError, MeshLLMError, PostTooLarge, RateLimited
from mesh_mcp.jsonlimits import JsonRejected, parse
from mesh_mcp.state import NodeState

KEEPALIVE_S = 15


class Controls(Protocol):
    """What the console may ask of the running node (loopback clients only)."""

    def drop(self, requested: str) -> str: ...

    def rotate_key(self, evict: Sequence[str] = (), add_owners: Sequence[str] = ()) -> str: ...


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


def blackboard_routes(board: Board | None) -> list[Route]:
    """`GET /api/blackboard?q=&from=&kind=&since=HOURS&limit=` and `POST /api/blackboard`."""

    def carried() -> Board:
        if board is None:
            raise HttpError(404, "this node does not carry the blackboard; start it with --blackboard")
        return board

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
        found_board = carried()
        try:
            body = parse(await request.body())  # at most the guard's console body limit (64 KiB)
        except JsonRejected as exc:
            raise HttpError(400, str(exc)) from exc
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise HttpError(400, 'give {"text": "...", "author"?: "...", "reply_to"?: "<post id>"}')
        author, reply_to = body.get("author"), body.get("reply_to")
        if not all(v is None or isinstance(v, str) for v in (author, reply_to)):
            raise HttpError(400, "author and reply_to are strings")
        source = request.client.host if request.client else None  # the per-client rate limit's key
        post = await found_board.post(body["text"], author=author, reply_to=reply_to, source=source)
        return JSONResponse({"post": post.summary()}, status_code=201)

    return [Route("/api/blackboard", read, methods=["GET"]), Route("/api/blackboard", write, methods=["POST"])]


def build_console(node: NodeState, controls: Controls | None = None, board: Board | None = None) -> Starlette:
    page = resources.files("mesh_mcp").joinpath("static/index.html").read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def status(request: Request) -> Response:
        snap = node.snapshot()
        if is_local(request.scope):  # this machine, a loopback Host, no foreign web page: may see the secret
            snap["invite_token"] = node.invite_token
        return JSONResponse(snap)

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[dict[str, Any]]:
            async with node.subscribe() as updates:
                yield {"event": "status", "data": json.dumps(node.snapshot())}
                while True:
                    with anyio.move_on_after(KEEPALIVE_S):
                        snap = await updates.receive()
                        yield {"event": "status", "data": json.dumps(snap)}
                        continue
                    yield {"comment": "keepalive"}

        return EventSourceResponse(stream(), ping=None)

    async def control(request: Request) -> Response:
        if request.path_params["action"] not in ("drop", "rotate-key"):
            raise HttpError(404, "no such control")
        if controls is None or not is_local(request.scope):
            refused = "node controls are only open to this machine: ask 127.0.0.1 or localhost, not from a web page"
            raise HttpError(403, refused)
        try:
            body = parse(await request.body()) if request.path_params["action"] == "drop" else {}
            if request.path_params["action"] == "drop":
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
            *blackboard_routes(board),
            Route("/api/{action:str}", control, methods=["POST"]),
        ],
        exception_handlers={MeshLLMError: _answer_error},
    )

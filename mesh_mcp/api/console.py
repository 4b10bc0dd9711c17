"""The console server on :3131: `GET /api/status` (JSON), `GET /api/events` (SSE of state changes),
the blackboard (`GET /api/blackboard` searches or lists the feed, `POST /api/blackboard` posts),
node controls for this machine only, and a small HTML page that shows the status.

Served behind `httpguard.HttpGuard` (Host, Origin, keys, body limit); request bodies are parsed with
`jsonlimits` (a 10 000-deep body is a 400 with a sentence). The invite token is in `/api/status` only
for a request the guard found local, never in `/api/events`.
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
from mesh_mcp.api.errors import error_response
from mesh_mcp.api.guard import is_local
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
        return _error(ROTATE_KEY_USAGE, 400)
    lists = {key: body.get(key, []) for key in ("evict", "add_owner")}
    for value in lists.values():
        if not isinstance(value, list) or len(value) > 32 or not all(isinstance(n, str) for n in value):
            return _error(ROTATE_KEY_USAGE, 400)
    token = controls.rotate_key(lists["evict"], lists["add_owner"])
    return JSONResponse({"invite_token": token, "evicted": lists["evict"], "owners_added": lists["add_owner"]})


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return error_response("plain", status, message, headers=headers)


def blackboard_routes(board: Board | None) -> list[Route]:
    """`GET /api/blackboard?q=&from=&kind=&since=HOURS&limit=` and `POST /api/blackboard`."""

    def missing() -> Response:
        return _error("this node does not carry the blackboard; start it with --blackboard", 404)

    async def read(request: Request) -> Response:
        if board is None:
            return missing()
        q = request.query_params
        try:
            since = float(q["since"]) if q.get("since") else None
            limit = int(q.get("limit") or 20)
        except ValueError:
            return _error("since is a number of hours and limit a whole number", 400)
        try:
            found = await board.search(
                q.get("q", ""), author=q.get("from") or None, kind=q.get("kind") or None, since_hours=since, limit=limit
            )
        except BlackboardError as exc:
            return _error(str(exc), 400)
        return JSONResponse({"posts": [p.summary() for p in found]})

    async def write(request: Request) -> Response:
        if board is None:
            return missing()
        try:
            body = parse(await request.body())  # at most the guard's console body limit (64 KiB)
        except JsonRejected as exc:
            return _error(str(exc), 400)
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return _error('give {"text": "...", "author"?: "...", "reply_to"?: "<post id>"}', 400)
        author, reply_to = body.get("author"), body.get("reply_to")
        if not all(v is None or isinstance(v, str) for v in (author, reply_to)):
            return _error("author and reply_to are strings", 400)
        try:
            source = request.client.host if request.client else None  # the per-client rate limit's key
            post = await board.post(body["text"], author=author, reply_to=reply_to, source=source)
        except RateLimited as exc:
            return _error(str(exc), 429, {"Retry-After": str(max(1, round(exc.retry_after)))})
        except BlackboardDiskFull as exc:
            return _error(str(exc), 507)
        except BlackboardError as exc:
            return _error(str(exc), 413 if isinstance(exc, PostTooLarge) else 400)
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
            return _error("no such control", 404)
        if controls is None or not is_local(request.scope):
            refused = "node controls are only open to this machine: ask 127.0.0.1 or localhost, not from a web page"
            return _error(refused, 403)
        try:
            body = parse(await request.body()) if request.path_params["action"] == "drop" else {}
            if request.path_params["action"] == "drop":
                if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                    return _error('give {"model": NAME}', 400)
                return JSONResponse({"dropped": controls.drop(body["model"])})
            return _rotate_key(controls, await request.body())
        except ValueError as exc:  # malformed JSON
            return _error(f"malformed request: {exc}", 400)
        except MeshLLMError as exc:
            return _error(str(exc), 409)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/status", status),
            Route("/api/events", events),
            *blackboard_routes(board),
            Route("/api/{action:str}", control, methods=["POST"]),
        ],
    )

"""The console server on :3131: `GET /api/status` (JSON), `GET /api/events` (SSE of state changes),
the blackboard (`GET /api/blackboard` searches or lists the feed, `POST /api/blackboard` posts),
node controls for this machine only, and a small HTML page that shows the status.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any, Protocol

import anyio
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from blackboard.board import Board
from inference.errors import BlackboardError, MeshLLMError, PostTooLarge, RateLimited

from .state import NodeState

KEEPALIVE_S = 15


class Controls(Protocol):
    """What the console may ask of the running node (loopback clients only)."""

    def drop(self, requested: str) -> str: ...

    def rotate_key(self) -> str: ...


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    return host.startswith("127.") or host == "::1"


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status, headers=headers)


def blackboard_routes(board: Board | None) -> list[Route]:
    """`GET /api/blackboard?q=&from=&kind=&since=HOURS&limit=` and `POST /api/blackboard`."""

    def missing() -> JSONResponse:
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
        if int(request.headers.get("content-length") or 0) > 64 << 10:
            return _error("a post request is at most 64 KiB", 413)
        try:
            body = await request.json()
        except ValueError as exc:
            return _error(f"malformed JSON: {exc}", 400)
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return _error('give {"text": "...", "author"?: "...", "reply_to"?: "<post id>"}', 400)
        author, reply_to = body.get("author"), body.get("reply_to")
        if not all(v is None or isinstance(v, str) for v in (author, reply_to)):
            return _error("author and reply_to are strings", 400)
        try:
            post = await board.post(body["text"], author=author, reply_to=reply_to)
        except RateLimited as exc:
            return _error(str(exc), 429, {"Retry-After": str(max(1, round(exc.retry_after)))})
        except BlackboardError as exc:
            return _error(str(exc), 413 if isinstance(exc, PostTooLarge) else 400)
        return JSONResponse({"post": post.summary()}, status_code=201)

    return [Route("/api/blackboard", read, methods=["GET"]), Route("/api/blackboard", write, methods=["POST"])]


def build_console(node: NodeState, controls: Controls | None = None, board: Board | None = None) -> Starlette:
    page = resources.files("mesh_mcp").joinpath("static/index.html").read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def status(request: Request) -> Response:
        return JSONResponse(node.snapshot())

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
            return JSONResponse({"error": "no such control"}, status_code=404)
        if controls is None or not _loopback(request):
            return JSONResponse({"error": "node controls are only open to this machine"}, status_code=403)
        try:
            body = await request.json() if request.path_params["action"] == "drop" else {}
            if request.path_params["action"] == "drop":
                if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                    return JSONResponse({"error": 'give {"model": NAME}'}, status_code=400)
                return JSONResponse({"dropped": controls.drop(body["model"])})
            return JSONResponse({"invite_token": controls.rotate_key()})
        except ValueError as exc:  # malformed JSON
            return JSONResponse({"error": f"malformed request: {exc}"}, status_code=400)
        except MeshLLMError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/status", status),
            Route("/api/events", events),
            *blackboard_routes(board),
            Route("/api/{action:str}", control, methods=["POST"]),
        ],
    )

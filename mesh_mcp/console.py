"""The console server on :3131: `GET /api/status` (JSON), `GET /api/events` (SSE of state changes)
and a small HTML page that shows them. Read-only; the full console comes later.
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

from inference.errors import MeshLLMError

from .state import NodeState

KEEPALIVE_S = 15


class Controls(Protocol):
    """What the console may ask of the running node (loopback clients only)."""

    def drop(self, requested: str) -> str: ...

    def rotate_key(self) -> str: ...


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    return host.startswith("127.") or host == "::1"


def build_console(node: NodeState, controls: Controls | None = None) -> Starlette:
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
            Route("/api/{action:str}", control, methods=["POST"]),
        ],
    )

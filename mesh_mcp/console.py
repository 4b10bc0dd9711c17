"""The console server on :3131: `GET /api/status` (JSON), `GET /api/events` (SSE of state changes)
and a small HTML page that shows them. Read-only; the full console comes later.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import anyio
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .state import NodeState

KEEPALIVE_S = 15


def build_console(node: NodeState) -> Starlette:
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

    return Starlette(
        routes=[Route("/", index), Route("/api/status", status), Route("/api/events", events)],
    )

"""What a node answers on its own ports while `--auto` is still looking for a mesh to join (a `--client --auto`
keeps looking for up to five minutes): the console says so instead of refusing connections, so a person opening it, or a
script waiting on `/api/status`, sees a node that is up and searching.

- console: `GET /api/status` → `{"state": "searching", "discovery": {"state", "detail", "since"}, "node_id", "name",
  "version", "peers": [], "models": [], "llama_ready": false}`; `GET /` → a small page that says so and reloads
  every few seconds (the real console replaces it); any other path → a JSON 503 saying the node is not ready yet.
- API: `GET /v1/models` → an empty list; `GET /health` → `{"status": "searching"}`; any other path → a JSON 503 in
  the API's shape (OpenAI's; Anthropic's under `/v1/messages`) with `Retry-After`.

Both apps are served through the node's own guard (`middleware.HttpGuard`, the same `Policy`), only until the choice
is made; the node's real apps then take the same ports (`cli._choose_mesh`).
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mesh_mcp.api.errors import Flavor, error_response

RETRY_AFTER_S = 5
DETAIL = "looking for a public mesh to join (Nostr relays, mDNS on this network)"


@dataclass
class Searching:
    """The node as it is while it searches; `detail` may change as the search goes on."""

    node_id: str
    name: str
    version: str
    detail: str = DETAIL
    since: float = field(default_factory=time.time)

    def status(self) -> dict[str, Any]:
        return {
            "state": "searching",
            "discovery": {"state": "searching", "detail": self.detail, "since": int(self.since)},
            "node_id": self.node_id,
            "name": self.name,
            "version": self.version,
            "peers": [],
            "models": [],
            "llama_ready": False,
        }


def _not_yet(console: bool, path: str, detail: str) -> Response:
    message = f"this node is not ready yet: {detail}; retry in {RETRY_AFTER_S}s"
    shape: Flavor = "plain" if console else ("anthropic" if path.startswith("/v1/messages") else "openai")
    return error_response(shape, 503, message, "not_ready", headers={"Retry-After": str(RETRY_AFTER_S)})


def console_app(searching: Searching) -> Starlette:
    """The console while the node searches."""

    async def status(request: Request) -> Response:
        return JSONResponse(searching.status())

    async def page(request: Request) -> Response:
        text = html.escape(f"mesh-llm {searching.name}: {searching.detail}…")
        body = (
            '<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="3">'
            f"<title>mesh-llm: searching</title></head><body><p>{text}</p></body></html>"
        )
        return HTMLResponse(body, headers={"Content-Security-Policy": "default-src 'none'"})

    return _app([Route("/api/status", status), Route("/", page)], console=True, detail=searching)


def api_app(searching: Searching) -> Starlette:
    """The OpenAI/Anthropic API while the node searches."""

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": []})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "searching", "node_id": searching.node_id})

    return _app([Route("/v1/models", models), Route("/health", health)], console=False, detail=searching)


_ANY = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def _app(routes: list[Route], *, console: bool, detail: Searching) -> Starlette:
    """`routes`, then every other path and method: the 503 that says the node is not ready yet."""

    async def other(request: Request) -> Response:
        return _not_yet(console, request.url.path, detail.detail)

    return Starlette(routes=[*routes, Route("/{rest:path}", other, methods=_ANY)])

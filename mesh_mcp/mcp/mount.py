"""The node's own `/mcp`: `McpMount`, the API port's ASGI app that serves MCP (streamable HTTP) at /mcp and the
OpenAI/Anthropic API elsewhere, and `OwnTools`, the tools it serves (this node's HTTP API, as `HttpTools`).

The MCP SDK takes ~0.8 s of CPU to import, so this module does not import it (nor `server.py` or
`http_app.py`, which do): `McpMount.run` loads `http_app` in a worker thread once the node runs.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from mesh_mcp.api.errors import error_response
from mesh_mcp.mcp.client import HttpTools
from mesh_mcp.mcp.local import MCP_PATHS


class NodeUrls(Protocol):
    """Where this node's console and API listen (the node's `NodeState`; known once its ports listen)."""

    @property
    def console_url(self) -> str: ...

    @property
    def api_url(self) -> str: ...


class OwnTools:
    """The tools of this node's own `/mcp`: the same calls an attached `blackboard --mcp` makes, to
    this node's ports (known once they listen), so both ways to reach MCP behave alike."""

    def __init__(self, state: NodeUrls) -> None:
        self._state = state

    def _http(self) -> HttpTools:
        return HttpTools(self._state.console_url, self._state.api_url)

    async def post(self, text: str, reply_to: str | None, author: str | None) -> dict[str, Any]:
        return await self._http().post(text, reply_to, author)

    async def search(
        self, query: str, author: str | None, kind: str | None, since_hours: float | None, limit: int
    ) -> list[dict[str, Any]]:
        return await self._http().search(query, author, kind, since_hours, limit)

    async def feed(
        self, author: str | None, kind: str | None, since_hours: float | None, limit: int
    ) -> list[dict[str, Any]]:
        return await self._http().feed(author, kind, since_hours, limit)

    async def models(self) -> list[dict[str, Any]]:
        return await self._http().models()

    async def status(self) -> dict[str, Any]:
        return await self._http().status()

    async def ask(self, question: str, model: str | None, max_tokens: int) -> dict[str, Any]:
        return await self._http().ask(question, model, max_tokens)


class McpMount:
    """The API port's app: MCP (streamable HTTP) at /mcp, the OpenAI/Anthropic API elsewhere. It sits
    behind `api.guard.HttpGuard`, so the MCP app's own Host/Origin checks are off (`guarded=True`).

    `run` (a task of the node's task group) loads the MCP SDK in a worker thread, so joining the mesh
    and serving models do not wait for it, and serves MCP until cancelled; an early /mcp request waits
    for it up to `LOAD_WAIT_S`, then gets 503."""

    LOAD_WAIT_S = 30.0

    def __init__(self, api: ASGIApp, state: NodeUrls, *, allow_remote: bool) -> None:
        self.api, self.state, self.allow_remote = api, state, allow_remote
        self.mcp: ASGIApp | None = None
        self._loaded = anyio.Event()

    async def run(self) -> None:
        module = await anyio.to_thread.run_sync(importlib.import_module, "mesh_mcp.mcp.http_app")
        async with module.McpHttp(OwnTools(self.state), allow_remote=self.allow_remote, guarded=True) as mcp:
            self.mcp = mcp
            self._loaded.set()
            try:
                await anyio.sleep_forever()
            finally:
                self.mcp = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in MCP_PATHS:
            await self.api(scope, receive, send)
            return
        with anyio.move_on_after(self.LOAD_WAIT_S):
            await self._loaded.wait()
        if self.mcp is not None:
            await self.mcp(scope, receive, send)
        else:
            starting = error_response("plain", 503, "MCP is starting; retry", headers={"Retry-After": "1"})
            await starting(scope, receive, send)

"""The node's API on :9337: OpenAI (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
`/v1/models`) and Anthropic (`/v1/messages`), proxied (`proxy.Proxy`) to the llama-server that serves the model the
request names; `/v1/models` lists what the mesh serves and, once it lists any, the `auto` pseudo-model last
(`api/auto.py`: a request naming `auto`, or no model, gets a serving model chosen per request).

The app's one error boundary: a handler (or the proxy) that cannot answer raises `errors.HttpError`, and the
exception handlers here answer it, and unknown endpoints and methods, in the API's own shape — Anthropic's under
`/v1/messages`, OpenAI's elsewhere (`_flavor`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.responses import Response as HTTPResponse
from starlette.routing import Route

from mesh_mcp.api import auto
from mesh_mcp.api.checks import Flavor
from mesh_mcp.api.directory import Directory, Solo
from mesh_mcp.api.errors import HttpError, error_response
from mesh_mcp.api.proxy import OnDemand, Proxy
from mesh_mcp.api.upstream import Pool
from mesh_mcp.state import SERVING, NodeState

MAX_BODY_BYTES = 32 << 20


def _flavor(path: str) -> Flavor:
    """The API a path belongs to: Anthropic's is `/v1/messages` and below, OpenAI's the rest."""
    return "anthropic" if path.startswith("/v1/messages") else "openai"


def build_api(
    node: NodeState,
    directory: Directory | None = None,
    max_body: int = MAX_BODY_BYTES,
    on_demand: OnDemand | None = None,
) -> Starlette:
    """The :9337 application. One pool of upstream connections, closed with the app. `on_demand(name)` is called
    once per request that names a model (served or not), before routing: the node's demand map."""
    pool = Pool()
    mesh: Directory = directory or Solo()

    def entries() -> dict[str, dict[str, Any]]:
        """Every model served in the mesh: local ones first, each with the nodes that serve it."""
        out: dict[str, dict[str, Any]] = {}
        for m in node.models.values():
            if m.state != "stopped":
                out[m.name] = _model_entry(m.name, node.started_at, m.state, [node.node_id])
                _add_facts(out[m.name], m.tools, m.size_bytes or 0, m.context or 0, m.thinking)
        for r in mesh.remote_models():
            entry = out.setdefault(r.name, _model_entry(r.name, node.started_at, r.state, []))
            entry["nodes"].append(r.node_id)
            if r.state == SERVING:
                entry["state"] = SERVING
            _add_facts(entry, r.tools, r.size_bytes, r.ctx, r.thinking)
        if out:  # after the real models, so that a client taking the first entry gets one of them
            out.pop(auto.AUTO, None)  # reserved: a model served under that name is reached only as the pseudo-model
            serving = [e["capabilities"] for e in out.values() if e["state"] == SERVING]
            out[auto.AUTO] = _auto_entry(
                node.started_at, any(c.get("tools") for c in serving), any(c.get("reasoning") for c in serving)
            )
        return out

    async def models(request: Request) -> HTTPResponse:
        return JSONResponse({"object": "list", "data": list(entries().values())})

    async def model(request: Request) -> HTTPResponse:
        name = request.path_params["model"]
        entry = entries().get(name)
        if entry is None:
            raise HttpError(404, f"model '{name}' not found", "model_not_found")
        return JSONResponse(entry)

    async def health(request: Request) -> HTTPResponse:
        return JSONResponse({"status": "ok", "node_id": node.node_id})

    def proxy(path: str) -> Route:
        return Route(path, Proxy(node, mesh, pool, path, _flavor(path), max_body, on_demand), methods=["POST"])

    async def http_error(request: Request, exc: Exception) -> HTTPResponse:
        assert isinstance(exc, HttpError)
        return exc.response(_flavor(request.url.path))

    async def not_found(request: Request, exc: Exception) -> HTTPResponse:
        return error_response(_flavor(request.url.path), 404, f"no such endpoint: {request.method} {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> HTTPResponse:
        return error_response("openai", 405, f"{request.method} is not allowed on {request.url.path}")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        pool.close()

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[HTTPResponse]]] = {
        HttpError: http_error,
        404: not_found,  # Starlette's own (no route): an `HTTPException`, not an `HttpError`
        405: method_not_allowed,
    }
    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/models/{model:path}", model),
            proxy("/v1/chat/completions"),
            proxy("/v1/completions"),
            proxy("/v1/embeddings"),
            proxy("/v1/responses"),
            proxy("/v1/messages"),
            proxy("/v1/messages/count_tokens"),
        ],
        exception_handlers=handlers,
        lifespan=lifespan,
    )


def _model_entry(name: str, created: float, state: str, nodes: list[str]) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(created),
        "owned_by": "mesh-llm",
        "state": state,
        "nodes": nodes,
        "capabilities": {},
    }


def _auto_entry(created: float, tools: bool, reasoning: bool) -> dict[str, Any]:
    """The `auto` pseudo-model: not served by any node (its `state` is "auto", never "serving"), it picks one. It
    can call tools when a serving model can (a request with tools gets one of those), and think when one can (a
    request that turns thinking on gets one of those)."""
    entry = _model_entry(auto.AUTO, created, auto.AUTO, [])
    entry["capabilities"] |= {"tools": tools, "reasoning": reasoning}
    entry |= {"pseudo": True, "description": auto.DESCRIPTION}
    return entry


def _add_facts(
    entry: dict[str, Any], tools: bool | None, size_bytes: int, ctx: int = 0, thinking: bool | None = None
) -> None:
    """What a server of the model knows of it: `capabilities.tools` (its chat template can call tools,
    true if any server says so), `capabilities.reasoning` (a thinking model: thinking is off unless a request turns
    it on, api/reasoning.py), `size_bytes` (its GGUF size) and `context_length` (tokens one request may hold: the
    least any server gives), each only once known."""
    for key, said in (("tools", tools), ("reasoning", thinking)):
        if said is not None:
            entry["capabilities"][key] = said or entry["capabilities"].get(key, False)
    if size_bytes and "size_bytes" not in entry:
        entry["size_bytes"] = size_bytes
    if ctx:
        entry["context_length"] = min(ctx, entry.get("context_length", ctx))

"""The node's API on :9337: OpenAI (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
`/v1/models`) and Anthropic (`/v1/messages`), proxied to the llama-server that serves the model the
request names.

The proxy is a raw ASGI endpoint so that it (a) streams upstream bytes as they arrive, with no
buffering, (b) watches for the client going away from the first byte on and cancels the upstream
request (llama-server then stops generating), and (c) never lets bad input reach llama-server:
oversized bodies get 413, malformed or too deeply nested JSON 400 (`jsonlimits`), unknown models 404
(listing what is served), a model still loading 503 with Retry-After, requests the official APIs
refuse 400 naming the field (`api_checks`). Errors use each API's own error shape; where llama-server's
answers differ from the official APIs' (Anthropic ids and stop sequences, context overflows) they are
rewritten on the way (`api_rewrite`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.responses import Response as HTTPResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from mesh_mcp.api import rewrite as api_rewrite
from mesh_mcp.api.checks import ModelFacts, check_model_field, check_request
from mesh_mcp.api.directory import Directory, RemoteModel, Solo
from mesh_mcp.api.errors import anthropic_error_body, error_body, error_response
from mesh_mcp.api.router import Candidate, match_model, ranked, session_key
from mesh_mcp.api.upstream import Pool, Response, UpstreamBroken, UpstreamUnavailable, request
from mesh_mcp.jsonlimits import JsonRejected, parse_object
from mesh_mcp.mesh.tunnel import HOP_HEADER
from mesh_mcp.state import SERVING, ModelStatus, NodeState

log = logging.getLogger("mesh_llm.api")

Flavor = Literal["openai", "anthropic"]  # the API flavors (errors.Flavor adds the console's)
MAX_BODY_BYTES = 32 << 20
RETRY_AFTER_S = 5
# Headers that describe one hop, never forwarded.
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"server", b"date", b"te", b"trailer", b"upgrade"}


MAX_ERROR_BODY = 64 << 10


class BadRequest(Exception):
    def __init__(self, response: HTTPResponse) -> None:
        self.response = response


async def _read_body(request: Request, flavor: Flavor, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = error_response(flavor, 413, f"request body exceeds {limit} bytes", "request_too_large")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(error_response(flavor, 400, "invalid Content-Length header"))
        if int(declared) > limit:
            raise BadRequest(too_big)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(too_big)
    return bytes(body)


def _parse_payload(body: bytes, flavor: Flavor) -> dict[str, Any]:
    """The request body as a JSON object within `jsonlimits`' bounds (depth, string size), with a usable `model`."""
    try:
        payload = parse_object(body)
    except JsonRejected as exc:
        raise BadRequest(error_response(flavor, 400, str(exc))) from exc
    if (bad := check_model_field(payload)) is not None:
        raise BadRequest(error_response(flavor, bad.status, bad.message, bad.code, param=bad.param))
    return payload


@dataclass(frozen=True)
class Target:
    node_id: str
    base_url: str | None  # local llama-server; None for a remote node


class Proxy:
    """ASGI endpoint forwarding one API path to a server of the requested model: the local
    llama-server or, through the directory, another node of the mesh."""

    def __init__(
        self, node: NodeState, directory: Directory, pool: Pool, path: str, flavor: Flavor, max_body: int
    ) -> None:
        self.node, self.directory, self.pool = node, directory, pool
        self.path, self.flavor, self.max_body = path, flavor, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        routed = request.headers.get(HOP_HEADER.decode()) is not None  # from another node: serve locally only
        try:
            body = await _read_body(request, self.flavor, self.max_body)
            payload = _parse_payload(body, self.flavor)
            name, routes, facts = self._routes(payload.get("model"), routed, session_key(payload))
            if (rejection := check_request(payload, self.flavor, self.path, facts)) is not None:
                response = error_response(
                    self.flavor, rejection.status, rejection.message, rejection.code, param=rejection.param
                )
                raise BadRequest(response)
        except BadRequest as bad:
            await bad.response(scope, receive, send)
            return
        asked = payload.get("stop_sequences")
        stops = tuple(s for s in asked if isinstance(s, str)) if isinstance(asked, list) else ()
        query = scope.get("query_string") or b""
        target = self.path + ("?" + query.decode("latin-1") if query else "")
        headers = [(b"content-type", b"application/json")]
        if accept := request.headers.get("accept"):
            headers.append((b"accept", accept.encode("latin-1")))
        self._count(name, +1)
        started = time.perf_counter()
        try:
            await self._forward(routes, target, body, headers, scope, receive, send, stops)
        finally:
            self._count(name, -1)
            log.debug("%s %s in %.1f ms", self.path, name, 1e3 * (time.perf_counter() - started))

    def _count(self, name: str, delta: int) -> None:
        status = self.node.models.get(name)
        if status is not None:
            self.node.models[name] = replace(status, in_flight=max(0, status.in_flight + delta))

    def _routes(self, requested: str | None, routed: bool, session: str | None) -> tuple[str, list[Target], ModelFacts]:
        """The model's name, its servers (best first) and what they know of it; or the error to answer with."""
        remote = [] if routed else self.directory.remote_models()
        names = self.node.served_names() + sorted({r.name for r in remote} - set(self.node.served_names()))
        name = match_model(requested, names)
        if name is None:
            msg = (
                f"model '{requested}' is not served by this mesh; available: {', '.join(names)}"
                if names
                else f"model '{requested}' is not served: no node of this mesh serves a model yet"
            )
            raise BadRequest(error_response(self.flavor, 404, msg, "model_not_found", available=names))
        local = self.node.models.get(name)
        if local is not None and local.state == "stopped":
            local = None
        if local is not None and self.path.endswith("/embeddings") and not local.embeddings:
            msg = f"model '{name}' is a generation model and does not serve embeddings"
            raise BadRequest(error_response(self.flavor, 400, msg))
        candidates: dict[str, Target] = {}
        pool: list[Candidate] = []
        if local is not None and local.state == SERVING and local.upstream is not None:
            candidates[self.node.node_id] = Target(self.node.node_id, local.upstream)
            pool.append(Candidate(self.node.node_id, local.in_flight, local=True))
        for r in remote:
            if r.name == name and r.state == SERVING and r.node_id not in candidates:
                candidates[r.node_id] = Target(r.node_id, None)
                pool.append(Candidate(r.node_id, r.in_flight))
        if candidates:
            facts = _facts(name, local, [r for r in remote if r.name == name and r.node_id in candidates])
            return name, [candidates[c.node_id] for c in ranked(pool, session)], facts
        if local is not None and local.state == "failed":
            msg = f"model '{name}' failed to start: {local.detail}"
            raise BadRequest(error_response(self.flavor, 503, msg, "model_failed"))
        state = local.state if local is not None else "loading"
        msg = f"model '{name}' is {state}; retry in {RETRY_AFTER_S}s"
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        raise BadRequest(error_response(self.flavor, 503, msg, "model_loading", headers=headers))

    async def _open(self, route: Target, target: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> Response:
        if route.base_url is None:
            return await self.directory.open(route.node_id, "POST", target, headers, body)
        url = urlsplit(route.base_url)
        return await request(self.pool, url.hostname or "127.0.0.1", url.port or 80, "POST", target, body, headers)

    async def _forward(
        self,
        routes: list[Target],
        target: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        scope: Scope,
        receive: Receive,
        send: Send,
        stop_sequences: tuple[str, ...] = (),
    ) -> None:
        async with anyio.create_task_group() as tg:
            # From here on, a client disconnect cancels the upstream request (llama-server stops).
            tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
            resp: Response | None = None
            for route in routes:  # a server that fails before answering is skipped for the next
                try:
                    resp = await self._open(route, target, body, headers)
                    break
                except UpstreamUnavailable as exc:
                    log.warning("server %s of this model is unavailable: %s", route.node_id, exc)
            if resp is None:
                msg = "no server of this model answered; retry shortly"
                hdrs = {"Retry-After": str(RETRY_AFTER_S)}
                await error_response(self.flavor, 503, msg, "backend_unavailable", headers=hdrs)(scope, receive, send)
                tg.cancel_scope.cancel()
                return
            try:
                await self._relay(resp, send, route.node_id, stop_sequences)
            finally:
                await resp.aclose()
                tg.cancel_scope.cancel()

    async def _relay(self, resp: Response, send: Send, node_id: str, stop_sequences: tuple[str, ...]) -> None:
        out_headers = [(k, v) for k, v in resp.headers if k not in _HOP]
        if not any(k == SERVED_BY for k, _ in out_headers):  # a peer that served it has named itself
            out_headers.append((SERVED_BY, node_id.encode()))
        if resp.status >= 400:
            await self._error(resp, out_headers, send)
            return
        content_type = resp.header(b"content-type") or b""
        is_sse = content_type.startswith(b"text/event-stream")
        stream: api_rewrite.AnthropicStream | None = None
        if self.flavor == "anthropic" and self.path == "/v1/messages":
            if not is_sse:
                await self._anthropic_message(resp, out_headers, send, stop_sequences)
                return
            stream = api_rewrite.AnthropicStream(stop_sequences)
            out_headers = [(k, v) for k, v in out_headers if k != b"content-length"]
        await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
        try:
            async for chunk in resp.chunks():
                if stream is not None and not (chunk := stream.feed(chunk)):
                    continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if stream is not None and (tail := stream.flush()):
                await send({"type": "http.response.body", "body": tail, "more_body": True})
        except UpstreamBroken as exc:
            log.warning("upstream failed mid-response: %s", exc)
            if is_sse:  # an incomplete line a stream held back is dropped: the error event follows whole events
                await send({"type": "http.response.body", "body": self._sse_error(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _error(self, resp: Response, headers: list[tuple[bytes, bytes]], send: Send) -> None:
        """An upstream error, read whole (at most `MAX_ERROR_BODY`) and answered in the client's API's shape.

        llama-server answers errors on /v1/messages in OpenAI's shape (`{"error": {"code", "type", ...}}`);
        Anthropic clients expect `{"type": "error", "error": {"type", "message"}}`. A context overflow becomes each
        API's own (`api_rewrite`). Rewritten once: a body a peer already rewrote passes unchanged."""
        raw = await _read_at_most(resp, MAX_ERROR_BODY)
        out = [(k, v) for k, v in headers if k != b"content-length"]
        if self.flavor == "anthropic":
            body = anthropic_error_body(resp.status, raw)
        elif (rewritten := api_rewrite.openai_context_error(raw, self.path)) is not None:
            body = rewritten
        else:
            body = raw
        if body is not raw:
            out = [(k, v) for k, v in out if k != b"content-type"] + [(b"content-type", b"application/json")]
        out.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _anthropic_message(
        self, resp: Response, headers: list[tuple[bytes, bytes]], send: Send, stop_sequences: tuple[str, ...]
    ) -> None:
        """A non-streaming /v1/messages answer, read whole and rewritten (`api_rewrite.anthropic_message`); one
        longer than `MAX_MESSAGE_BODY` passes unchanged."""
        chunks = resp.chunks()
        raw = bytearray()
        try:
            async for chunk in chunks:
                raw += chunk
                if len(raw) > api_rewrite.MAX_MESSAGE_BODY:
                    break
        except UpstreamBroken as exc:
            log.warning("upstream failed mid-response: %s", exc)
            await _send_json(send, 502, error_body("anthropic", 502, "the model's server failed mid-answer; retry"))
            return
        if len(raw) > api_rewrite.MAX_MESSAGE_BODY:
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            await send({"type": "http.response.body", "body": bytes(raw), "more_body": True})
            with contextlib.suppress(UpstreamBroken):
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        body = api_rewrite.anthropic_message(bytes(raw), stop_sequences)
        out = [(k, v) for k, v in headers if k != b"content-length"] + [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _sse_error(self) -> bytes:
        msg = "the model's server failed mid-stream; the response is incomplete"
        if self.flavor == "anthropic":
            return b"event: error\ndata: " + json.dumps(error_body("anthropic", 500, msg)).encode() + b"\n\n"
        return b"data: " + json.dumps(error_body("openai", 500, msg, "upstream_failed")).encode() + b"\n\n"


async def _read_at_most(resp: Response, limit: int) -> bytes:
    """An upstream body up to about `limit` bytes (a failure mid-body keeps what arrived)."""
    raw = bytearray()
    with contextlib.suppress(UpstreamBroken):
        async for chunk in resp.chunks():
            raw += chunk
            if len(raw) > limit:
                break
    return bytes(raw)


async def _send_json(send: Send, status: int, value: dict[str, Any]) -> None:
    body = json.dumps(value).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _facts(name: str, local: ModelStatus | None, remote: list[RemoteModel]) -> ModelFacts:
    """What the servers of a model know of it: the least context any gives, and whether it can call tools
    (true if any server says so, false only if one says so and none says otherwise)."""
    contexts = [c for c in ([local.context] if local else []) + [r.ctx for r in remote] if c]
    said = [t for t in ([local.tools] if local else []) + [r.tools for r in remote] if t is not None]
    return ModelFacts(name, min(contexts) if contexts else None, any(said) if said else None)


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


SERVED_BY = b"x-mesh-node"  # response header: the node whose llama-server answered


def build_api(node: NodeState, directory: Directory | None = None, max_body: int = MAX_BODY_BYTES) -> Starlette:
    """The :9337 application. One pool of upstream connections, closed with the app."""
    pool = Pool()
    mesh: Directory = directory or Solo()

    def entries() -> dict[str, dict[str, Any]]:
        """Every model served in the mesh: local ones first, each with the nodes that serve it."""
        out: dict[str, dict[str, Any]] = {}
        for m in node.models.values():
            if m.state != "stopped":
                out[m.name] = _model_entry(m.name, node.started_at, m.state, [node.node_id])
                _add_facts(out[m.name], m.tools, m.size_bytes or 0, m.context or 0)
        for r in mesh.remote_models():
            entry = out.setdefault(r.name, _model_entry(r.name, node.started_at, r.state, []))
            entry["nodes"].append(r.node_id)
            if r.state == SERVING:
                entry["state"] = SERVING
            _add_facts(entry, r.tools, r.size_bytes, r.ctx)
        return out

    async def models(request: Request) -> HTTPResponse:
        return JSONResponse({"object": "list", "data": list(entries().values())})

    async def model(request: Request) -> HTTPResponse:
        name = request.path_params["model"]
        entry = entries().get(name)
        if entry is None:
            return error_response("openai", 404, f"model '{name}' not found", "model_not_found")
        return JSONResponse(entry)

    async def health(request: Request) -> HTTPResponse:
        return JSONResponse({"status": "ok", "node_id": node.node_id})

    def proxy(path: str, flavor: Flavor = "openai") -> Route:
        return Route(path, Proxy(node, mesh, pool, path, flavor, max_body), methods=["POST"])

    async def not_found(request: Request, exc: Exception) -> HTTPResponse:
        flavor: Flavor = "anthropic" if request.url.path.startswith("/v1/messages") else "openai"
        return error_response(flavor, 404, f"no such endpoint: {request.method} {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> HTTPResponse:
        return error_response("openai", 405, f"{request.method} is not allowed on {request.url.path}")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        pool.close()

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[HTTPResponse]]] = {
        404: not_found,
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
            proxy("/v1/messages", "anthropic"),
            proxy("/v1/messages/count_tokens", "anthropic"),
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


def _add_facts(entry: dict[str, Any], tools: bool | None, size_bytes: int, ctx: int = 0) -> None:
    """What a server of the model knows of it: `capabilities.tools` (its chat template can call tools,
    true if any server says so), `size_bytes` (its GGUF size) and `context_length` (tokens one request may hold:
    the least any server gives), each only once known."""
    if tools is not None:
        entry["capabilities"]["tools"] = tools or entry["capabilities"].get("tools", False)
    if size_bytes and "size_bytes" not in entry:
        entry["size_bytes"] = size_bytes
    if ctx:
        entry["context_length"] = min(ctx, entry.get("context_length", ctx))

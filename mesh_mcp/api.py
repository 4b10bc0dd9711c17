"""The node's API on :9337: OpenAI (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
`/v1/models`) and Anthropic (`/v1/messages`), proxied to the llama-server that serves the model the
request names.

The proxy is a raw ASGI endpoint so that it (a) streams upstream bytes as they arrive, with no
buffering, (b) watches for the client going away from the first byte on and cancels the upstream
request (llama-server then stops generating), and (c) never lets bad input reach llama-server:
oversized bodies get 413, malformed JSON 400, unknown models 404 (listing what is served), a model
still loading 503 with Retry-After. Errors use each API's own error shape.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from . import upstream
from .state import SERVING, ModelStatus, NodeState
from .upstream import Pool, UpstreamBroken, UpstreamUnavailable, request

log = logging.getLogger("mesh_llm.api")

Flavor = Literal["openai", "anthropic"]
MAX_BODY_BYTES = 32 << 20
RETRY_AFTER_S = 5
# Headers that describe one hop, never forwarded.
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"server", b"date", b"te", b"trailer", b"upgrade"}


def error_body(flavor: Flavor, status: int, message: str, code: str | None = None, **extra: Any) -> dict[str, Any]:
    if flavor == "anthropic":
        kind = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large"}.get(
            status, "overloaded_error" if status == 503 else "api_error"
        )
        return {"type": "error", "error": {"type": kind, "message": message, **extra}}
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code, **extra}}


def error_response(
    flavor: Flavor,
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(error_body(flavor, status, message, code, **extra), status_code=status, headers=headers)


class BadRequest(Exception):
    def __init__(self, response: Response) -> None:
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
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(error_response(flavor, 400, f"request body is not valid JSON: {exc}")) from exc
    if not isinstance(payload, dict):
        raise BadRequest(error_response(flavor, 400, "request body must be a JSON object"))
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(error_response(flavor, 400, "'model' must be a string", param="model"))
    return payload


class Proxy:
    """ASGI endpoint forwarding one API path to the llama-server of the requested model."""

    def __init__(self, node: NodeState, pool: Pool, path: str, flavor: Flavor, max_body: int) -> None:
        self.node, self.pool, self.path, self.flavor, self.max_body = node, pool, path, flavor, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            body = await _read_body(request, self.flavor, self.max_body)
            payload = _parse_payload(body, self.flavor)
            status = self._target(payload.get("model"))
        except BadRequest as bad:
            await bad.response(scope, receive, send)
            return
        assert status.upstream is not None
        query = scope.get("query_string") or b""
        target = self.path + ("?" + query.decode("latin-1") if query else "")
        headers = [(b"content-type", b"application/json")]
        if accept := request.headers.get("accept"):
            headers.append((b"accept", accept.encode("latin-1")))
        self._count(status.name, +1)
        started = time.perf_counter()
        try:
            await self._forward(status.upstream, target, body, headers, scope, receive, send)
        finally:
            self._count(status.name, -1)
            elapsed_ms = 1e3 * (time.perf_counter() - started)
            log.debug("%s %s in %.1f ms", self.path, status.name, elapsed_ms)

    def _count(self, name: str, delta: int) -> None:
        status = self.node.models.get(name)
        if status is not None:
            self.node.models[name] = replace(status, in_flight=max(0, status.in_flight + delta))

    def _target(self, requested: str | None) -> ModelStatus:
        status = self.node.find_model(requested)
        served = self.node.served_names()
        if status is None:
            msg = (
                f"model '{requested}' is not served by this mesh; available: {', '.join(served)}"
                if served
                else f"model '{requested}' is not served: this node serves no model yet"
            )
            raise BadRequest(error_response(self.flavor, 404, msg, "model_not_found", available=served))
        if self.path.endswith("/embeddings") and not status.embeddings:
            msg = f"model '{status.name}' is a generation model and does not serve embeddings"
            raise BadRequest(error_response(self.flavor, 400, msg))
        if status.state != SERVING or status.upstream is None:
            if status.state == "failed":
                msg = f"model '{status.name}' failed to start: {status.detail}"
                raise BadRequest(error_response(self.flavor, 503, msg, "model_failed"))
            msg = f"model '{status.name}' is {status.state}; retry in {RETRY_AFTER_S}s"
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            raise BadRequest(error_response(self.flavor, 503, msg, "model_loading", headers=headers))
        return status

    async def _forward(
        self,
        base_url: str,
        target: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        url = urlsplit(base_url)
        async with anyio.create_task_group() as tg:
            # From here on, a client disconnect cancels the upstream request (llama-server stops).
            tg.start_soon(_watch_disconnect, receive, tg.cancel_scope)
            try:
                resp = await request(
                    self.pool, url.hostname or "127.0.0.1", url.port or 80, "POST", target, body, headers
                )
            except UpstreamUnavailable as exc:
                log.warning("upstream %s unreachable: %s", base_url, exc)
                msg = "the model's server is restarting; retry shortly"
                hdrs = {"Retry-After": str(RETRY_AFTER_S)}
                await error_response(self.flavor, 503, msg, "backend_unavailable", headers=hdrs)(scope, receive, send)
                tg.cancel_scope.cancel()
                return
            try:
                await self._relay(resp, send)
            finally:
                await resp.aclose()
                tg.cancel_scope.cancel()

    async def _relay(self, resp: upstream.Response, send: Send) -> None:
        out_headers = [(k, v) for k, v in resp.headers if k not in _HOP]
        await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
        is_sse = (resp.header(b"content-type") or b"").startswith(b"text/event-stream")
        try:
            async for chunk in resp.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamBroken as exc:
            log.warning("upstream failed mid-response: %s", exc)
            if is_sse:
                await send({"type": "http.response.body", "body": self._sse_error(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _sse_error(self) -> bytes:
        msg = "the model's server failed mid-stream; the response is incomplete"
        if self.flavor == "anthropic":
            return b"event: error\ndata: " + json.dumps(error_body("anthropic", 500, msg)).encode() + b"\n\n"
        return b"data: " + json.dumps(error_body("openai", 500, msg, "upstream_failed")).encode() + b"\n\n"


async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


def build_api(node: NodeState, max_body: int = MAX_BODY_BYTES) -> Starlette:
    """The :9337 application. One pool of upstream connections, closed with the app."""
    pool = Pool()

    async def models(request: Request) -> Response:
        data = [_model_entry(node, m.name) for m in node.models.values() if m.state != "stopped"]
        return JSONResponse({"object": "list", "data": data})

    async def model(request: Request) -> Response:
        status = node.find_model(request.path_params["model"])
        if status is None or status.name != request.path_params["model"]:
            name = request.path_params["model"]
            return error_response("openai", 404, f"model '{name}' not found", "model_not_found")
        return JSONResponse(_model_entry(node, status.name))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "node_id": node.node_id})

    def proxy(path: str, flavor: Flavor = "openai") -> Route:
        return Route(path, Proxy(node, pool, path, flavor, max_body), methods=["POST"])

    async def not_found(request: Request, exc: Exception) -> Response:
        flavor: Flavor = "anthropic" if request.url.path.startswith("/v1/messages") else "openai"
        return error_response(flavor, 404, f"no such endpoint: {request.method} {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return error_response("openai", 405, f"{request.method} is not allowed on {request.url.path}")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        pool.close()

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
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


def _model_entry(node: NodeState, name: str) -> dict[str, Any]:
    m = node.models[name]
    return {
        "id": m.name,
        "object": "model",
        "created": int(node.started_at),
        "owned_by": "mesh-llm",
        "state": m.state,
        "nodes": [node.node_id],
    }

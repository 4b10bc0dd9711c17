"""`HttpGuard`, the ASGI middleware in front of both servers (:9337 API + MCP, :3131 console): it asks the pure
`guard.decide` about every request and acts on the verdict — answers a refusal (the guard's one error boundary,
`_refuse`, in the API's own shape) or a CORS preflight, or admits the request: enforces the body limit while the
body streams (chunked included: past the limit the app sees a disconnect and the client a 413), marks the request
local or not for the app (`is_local`), and adds `Access-Control-Allow-Origin` for allowed cross origins.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mesh_mcp.api.errors import error_bytes
from mesh_mcp.api.guard import Admit, Facts, Policy, Preflight, Refuse, Surface, decide

log = logging.getLogger("mesh_llm.node")

LOCAL = "mesh_llm.local"  # scope key: the request comes from this machine, to a loopback name, not from a web page
# The `code` of each refusal where the shape has one (OpenAI's).
_CODES = {400: "invalid_request", 401: "invalid_api_key", 403: "forbidden", 413: "request_too_large"}
_CODES |= {415: "unsupported_media_type", 421: "misdirected_request"}


def is_local(scope: Scope) -> bool:
    """Whether `HttpGuard` found this request local (this machine, a loopback Host, no foreign Origin)."""
    return scope.get(LOCAL) is True


async def _refuse(send: Send, refusal: Refuse, close: bool) -> None:
    """A refusal, in the shape its API uses (OpenAI, Anthropic, or the console's)."""
    body = error_bytes(refusal.flavor, refusal.status, refusal.message, _CODES.get(refusal.status))
    await _answer(send, refusal.status, body, refusal.headers, close)


async def _answer(send: Send, status: int, body: bytes, headers: tuple[tuple[str, str], ...], close: bool) -> None:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    if body:
        raw += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the rest of the body is not worth reading: uvicorn closes after the answer
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class HttpGuard:
    """ASGI middleware: `decide` on every request, then act (see the module docstring)."""

    def __init__(self, app: ASGIApp, policy: Policy, surface: Surface) -> None:
        self.app, self.policy, self.surface = app, policy, surface

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # neither server speaks WebSocket
            await send({"type": "websocket.close", "code": 1008})
            return
        facts = Facts.of(scope)
        verdict = decide(self.policy, self.surface, facts)
        if isinstance(verdict, Refuse):
            await _refuse(send, verdict, close=not facts.drain_after_refusal())
            return
        if isinstance(verdict, Preflight):
            await _answer(send, 204, b"", verdict.headers, close=False)
            return
        await self._admit(verdict, {**scope, LOCAL: verdict.local}, receive, send)

    async def _admit(self, verdict: Admit, scope: Scope, receive: Receive, send: Send) -> None:
        cors = () if verdict.cors_origin is None else (("Access-Control-Allow-Origin", verdict.cors_origin),)
        received = 0
        started = answered = False  # answered: the guard sent the response itself (a 413 mid-body)

        async def bounded_receive() -> Message:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > verdict.body_limit:
                    if not started:
                        answered = True
                        too_big = f"the request body is over {verdict.body_limit} bytes"
                        await _refuse(send, Refuse(413, too_big, verdict.flavor, cors), close=True)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
                if verdict.cors_origin is not None:
                    headers = list(message.get("headers", ()))
                    headers += [(b"access-control-allow-origin", verdict.cors_origin.encode("latin-1"))]
                    headers += [(b"vary", b"Origin")]
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except Exception:
            if not answered:  # the app's own failure; after our 413 it only saw the disconnect we gave it
                raise


def log_exposure(policy: Policy, api_port: int, console_port: int) -> None:
    """Say, at start-up, what other machines and browser apps can reach (never the keys themselves)."""
    if policy.cors_origins:
        log.info("browser apps allowed to call this node (--cors-origin): %s", ", ".join(sorted(policy.cors_origins)))
    if not policy.listen_all:
        return
    ports = f"ports {api_port} (API, /mcp) and {console_port} (console)"
    if policy.no_auth:
        log.warning(
            "--listen-all --no-auth: anyone who can reach this machine on %s can use its models and the mesh's, "
            "call its MCP tools and read and post to the blackboard, with no key; the invite token and node "
            "controls stay on this machine",
            ports,
        )
    else:
        log.info(
            "--listen-all: other machines reach %s with one of the %d API key(s) (Authorization: Bearer KEY or "
            "x-api-key: KEY); the invite token and node controls stay on this machine",
            ports,
            len(policy.api_keys),
        )

"""HTTP errors in one place: the OpenAI shape (`{"error": {"message", "type", "param", "code"}}`), the Anthropic
shape (`{"type": "error", "error": {"type", "message"}}`) and the plain shape of the console and the MCP mount
(`{"error": {"message"}}`), for every app of the node (API proxy, HTTP guard, console, MCP mount).

Bodies are ASCII JSON: a request's text echoed back (a model name) may hold a lone surrogate (`"\\ud800"` is valid
JSON), which UTF-8 cannot encode. `anthropic_error_body` rewrites an upstream (llama-server) error body, which
comes in OpenAI's shape, into Anthropic's.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from starlette.responses import Response

from mesh_mcp.api import rewrite

Flavor = Literal["openai", "anthropic", "plain"]  # plain: the console's and the MCP mount's shape

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    421: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(flavor: Flavor, status: int, message: str, code: str | None = None, **extra: Any) -> dict[str, Any]:
    """The error `message` (HTTP `status`) in `flavor`'s shape; `code` and `extra` fields where the shape has them."""
    if flavor == "anthropic":
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message, **extra}}
    if flavor == "plain":
        return {"error": {"message": message, **extra}}
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code, **extra}}


def error_bytes(flavor: Flavor, status: int, message: str, code: str | None = None, **extra: Any) -> bytes:
    return json.dumps(error_body(flavor, status, message, code, **extra)).encode()


def error_response(
    flavor: Flavor,
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    """An error response in `flavor`'s shape (ASCII JSON)."""
    body = error_bytes(flavor, status, message, code, **extra)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def anthropic_error_body(status: int, raw: bytes) -> bytes:
    """An upstream error body in Anthropic's shape; the message is kept. A body already in Anthropic's shape (a
    peer rewrote it) passes unchanged; a context overflow reads as Anthropic's "prompt is too long"."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("type") == "error" and isinstance(parsed.get("error"), dict):
        return raw
    if (overflow := rewrite.anthropic_context_message(raw)) is not None:
        return error_bytes("anthropic", status, overflow)
    message = raw.decode("utf-8", "replace").strip()[:4096] or f"upstream error {status}"
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"]
        elif isinstance(err, str):
            message = err
        elif isinstance(parsed.get("message"), str):
            message = parsed["message"]
    return error_bytes("anthropic", status, message)

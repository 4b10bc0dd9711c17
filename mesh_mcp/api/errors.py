"""HTTP errors in one place: the OpenAI shape (`{"error": {"message", "type", "param", "code"}}`), the Anthropic
shape (`{"type": "error", "error": {"type", "message"}}`) and the plain shape of the console and the MCP mount
(`{"error": {"message"}}`), for every app of the node (API proxy, HTTP guard, console, MCP mount), and the
in-stream error event of a server-sent-event stream that breaks off.

A handler that cannot answer raises `HttpError` (status, message, code, headers); each app turns it into a response
in its own shape at one boundary (the API app's and the console's exception handlers; the guard renders its own
refusals). Upstream error bodies are rewritten into a client's shape by `rewrite` (it builds them here).

Bodies are ASCII JSON: a request's text echoed back (a model name) may hold a lone surrogate (`"\\ud800"` is valid
JSON), which UTF-8 cannot encode.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from starlette.responses import Response

from mesh_mcp.errors import MeshLLMError

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


def sse_error_event(flavor: Flavor, message: str, code: str | None = None) -> bytes:
    """The last event of a server-sent-event stream that broke off: Anthropic's `event: error`, or OpenAI's
    `data:` line holding an error (status 500: the server failed)."""
    data = error_bytes(flavor, 500, message, code)
    return (b"event: error\ndata: " if flavor == "anthropic" else b"data: ") + data + b"\n\n"


class HttpError(MeshLLMError):
    """An HTTP error a handler gives up with; the app's one boundary answers it in the app's shape (`response`).
    `extra` are fields of the error object where the shape has room (`param`, `available`)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers, extra

    def response(self, flavor: Flavor) -> Response:
        return error_response(flavor, self.status, self.message, self.code, self.headers, **self.extra)

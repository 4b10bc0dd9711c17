"""`McpHttp`: the MCP server over streamable HTTP, as an ASGI app for the paths `/mcp` and `/mcp/` (stateless,
with the SDK's DNS-rebinding checks unless a guard in front already made them)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from types import TracebackType
from urllib.parse import urlsplit

from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import Receive, Scope, Send

from mesh_mcp.api.errors import error_response
from mesh_mcp.mcp.local import MCP_PATHS
from mesh_mcp.mcp.server import build_server
from mesh_mcp.mcp.tools import MeshTools

LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")
_LOCAL_HOSTNAMES = frozenset({"127.0.0.1", "localhost", "::1"})


class McpHttp:
    """The MCP server over streamable HTTP, as an ASGI callable for the paths `/mcp` and `/mcp/`.

        async with McpHttp(tools, allow_remote=listen_all) as mcp_app:
            ...  # route requests whose scope["path"] is in MCP_PATHS to `mcp_app`

    The SDK's session manager runs for the lifetime of the `async with` (its task group is opened
    there, in the caller's task, so it nests in the caller's structured concurrency); requests
    before or after get 503. One instance serves one such lifetime.

    Stateless: every POST is served on its own, with no `Mcp-Session-Id`. The tools are plain
    request/response (no server-to-client requests, no subscriptions), so sessions would buy
    nothing and cost a table of sessions to expire (an agent idle past the timeout would get 404
    and have to reconnect) and to lose on every node restart. Responses are SSE streams (the SDK
    default, which its clients read): a slow `mesh_ask` then gets keepalive pings.

    DNS rebinding: by default only requests whose Host is this machine (127.0.0.1, localhost, [::1],
    any port) and whose Origin, if any, is local are served (the SDK's check; 421/403 otherwise), so a
    web page cannot post through a browser. `allow_remote=True` (for a node listening on all
    interfaces) serves any Host but still refuses browser requests from non-local origins.

    `guarded=True`: the app sits behind `httpguard.HttpGuard` (as in a node), which already checked Host,
    Origin (with the operator's `--cors-origin` allow-list), API keys and the body size, so these checks
    are off here and an origin the operator allowed is not refused twice. The SDK's own Content-Type
    check on POST (application/json, else 400) stays.
    """

    def __init__(
        self, tools: MeshTools, *, name: str = "mesh-llm", allow_remote: bool = False, guarded: bool = False
    ) -> None:
        self.server = build_server(tools, name=name)
        self.allow_remote = allow_remote
        self.guarded = guarded
        if allow_remote or guarded:
            security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
        else:
            security = TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=[*LOCAL_NAMES, *(f"{h}:*" for h in LOCAL_NAMES)],
                allowed_origins=[f"http://{h}{port}" for h in LOCAL_NAMES for port in ("", ":*")],
            )
        # Creates the session manager (the returned Starlette app, whose lifespan would run it, is unused).
        self.server.streamable_http_app(
            streamable_http_path="/mcp", stateless_http=True, json_response=False, transport_security=security
        )
        self._manager = self.server.session_manager
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> McpHttp:
        if self._stack is not None:
            raise RuntimeError("McpHttp is already running")
        stack = AsyncExitStack()
        await stack.enter_async_context(self._manager.run())
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    @staticmethod
    def handles(scope: Scope) -> bool:
        """Whether a request is this app's: HTTP to `/mcp` or `/mcp/`."""
        return scope["type"] == "http" and scope.get("path") in MCP_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # served as a whole app: its lifetime is the `async with`
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})
            return
        if not self.handles(scope):
            await error_response("plain", 404, "MCP is served at /mcp")(scope, receive, send)
            return
        if self._stack is None:
            message = "the MCP server is not running (node starting or stopping)"
            await error_response("plain", 503, message, headers={"Retry-After": "1"})(scope, receive, send)
            return
        if self.allow_remote and not self.guarded and not _local_origin(scope):
            message = "MCP requests from web pages are only served to local origins"
            await error_response("plain", 403, message)(scope, receive, send)
            return
        await self._manager.handle_request(scope, receive, send)


def _local_origin(scope: Scope) -> bool:
    """No Origin header (not a browser), or an Origin on this machine."""
    for key, value in scope.get("headers", ()):
        if key == b"origin":
            origin = value.decode("latin-1").strip()
            return not origin or (urlsplit(origin).hostname or "") in _LOCAL_HOSTNAMES
    return True

"""The mesh's MCP server: `build_server(tools)` registers the six tools of `tools.py` with the official SDK
(`MCPServer`), each calling into a `MeshTools`.

The node implements `MeshTools` through `HttpTools` (`client.py`), served over streamable HTTP at `/mcp` on
its API port (`http_app.McpHttp`, mounted by `mount.McpMount`) and over stdio by `mesh-llm blackboard --mcp`
(`stdio.py`).

Errors: a `MeshLLMError` raised by the tools becomes a tool result with `isError` set whose text is the
error's message (a `RateLimited` one says when to retry); arguments the SDK's validation refuses are
answered in words (`tools.argument_errors`). Anything else is a crash: the SDK logs it and the agent sees
only the tool's name.

Tool results are structured: each tool returns a JSON object (published as its output schema),
and the same object as indented JSON text for clients that read only text.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, cast

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import ValidationError

from blackboard.post import check_author, check_text
from mesh_mcp import __version__
from mesh_mcp.errors import MeshLLMError, RateLimited
from mesh_mcp.mcp.tools import (
    ASK_DESCRIPTION,
    DEFAULT_LIMIT,
    DEFAULT_MAX_TOKENS,
    FEED_DESCRIPTION,
    INSTRUCTIONS,
    MODELS_DESCRIPTION,
    POST_DESCRIPTION,
    SEARCH_DESCRIPTION,
    STATUS_DESCRIPTION,
    Answer,
    AuthorFilter,
    KindFilter,
    Limit,
    MaxTokens,
    MeshTools,
    ModelInfo,
    ModelList,
    ModelName,
    PostAuthor,
    PostList,
    PostSummary,
    Query,
    Question,
    ReplyTo,
    SinceHours,
    Text,
    argument_errors,
    blank,
    check_author_filter,
    check_kind,
    check_limit,
    check_max_tokens,
    check_model,
    check_query,
    check_question,
    check_reply_to,
    check_since,
    post_list,
)

log = logging.getLogger("mesh_llm.mcp")


class _Server(MCPServer):
    """The SDK's server, with argument errors in words (`argument_errors`) instead of pydantic's report."""

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc, UnexpectedToolError) or not isinstance(exc.__cause__, ValidationError):
                raise
            raise ToolError(argument_errors(name, exc.__cause__)) from exc.__cause__


def error_text(exc: MeshLLMError) -> str:
    """What an agent reads for a failed call: the message, and for a rate limit when to retry."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, RateLimited) and "retry in" not in text:
        text += f"; retry in {max(1, math.ceil(exc.retry_after))} s"
    return text


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _tool_errors(name: str) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Awaitable[_R]]]:
    """A `MeshLLMError` from the tool becomes an `isError` result whose text is its message.

    (A `ToolError` would do too, but the SDK prefixes its text with "Error executing tool ...".)
    The SDK passes a returned `CallToolResult` through as is and skips output validation for errors.
    `functools.wraps` keeps the signature, from which the SDK builds the input schema."""

    def decorate(fn: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
        @functools.wraps(fn)
        async def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return await fn(*args, **kwargs)
            except MeshLLMError as exc:
                log.info("MCP tool %s: %s", name, exc)
                result = CallToolResult(content=[TextContent(type="text", text=error_text(exc))], is_error=True)
                return cast(_R, result)

        return call

    return decorate


def build_server(tools: MeshTools, *, name: str = "mesh-llm") -> MCPServer:
    """The MCP server with the six mesh tools, each calling into `tools`."""
    # log_level: MCPServer runs logging.basicConfig(level=...) when the root logger has no handler;
    # WARNING keeps the root logger at its default level (no INFO chatter from other libraries).
    server: MCPServer = _Server(name, version=__version__, instructions=INSTRUCTIONS, log_level="WARNING")
    reading = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(
        name="blackboard_post",
        title="Post to the mesh blackboard",
        description=POST_DESCRIPTION,
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
        ),
    )
    @_tool_errors("blackboard_post")
    async def blackboard_post(text: Text, reply_to: ReplyTo = None, author: PostAuthor = None) -> PostSummary:
        text = check_text(text)
        reply = check_reply_to(reply_to)
        who = None if author is None or blank(author) else check_author(author)
        return cast(PostSummary, await tools.post(text, reply, who))

    @server.tool(
        name="blackboard_search",
        title="Search the mesh blackboard",
        description=SEARCH_DESCRIPTION,
        annotations=reading,
    )
    @_tool_errors("blackboard_search")
    async def blackboard_search(
        query: Query,
        author: AuthorFilter = None,
        kind: KindFilter = None,
        since_hours: SinceHours = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> PostList:
        found = await tools.search(
            check_query(query),
            check_author_filter(author),
            check_kind(kind),
            check_since(since_hours),
            check_limit(limit),
        )
        return post_list(found)

    @server.tool(
        name="blackboard_feed", title="Read the mesh blackboard", description=FEED_DESCRIPTION, annotations=reading
    )
    @_tool_errors("blackboard_feed")
    async def blackboard_feed(
        author: AuthorFilter = None,
        kind: KindFilter = None,
        since_hours: SinceHours = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> PostList:
        found = await tools.feed(
            check_author_filter(author), check_kind(kind), check_since(since_hours), check_limit(limit)
        )
        return post_list(found)

    @server.tool(name="mesh_models", title="Models of the mesh", description=MODELS_DESCRIPTION, annotations=reading)
    @_tool_errors("mesh_models")
    async def mesh_models() -> ModelList:
        return {"models": cast(list[ModelInfo], await tools.models())}

    @server.tool(name="mesh_status", title="Mesh status", description=STATUS_DESCRIPTION, annotations=reading)
    @_tool_errors("mesh_status")
    async def mesh_status() -> dict[str, Any]:
        return await tools.status()

    @server.tool(
        name="mesh_ask",
        title="Ask a model of the mesh",
        description=ASK_DESCRIPTION,
        annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False),
    )
    @_tool_errors("mesh_ask")
    async def mesh_ask(
        question: Question, model: ModelName = None, max_tokens: MaxTokens = DEFAULT_MAX_TOKENS
    ) -> Answer:
        q = check_question(question)
        return cast(Answer, await tools.ask(q, check_model(model), check_max_tokens(max_tokens)))

    return server

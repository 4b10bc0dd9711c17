"""The mesh's MCP server: six tools through which agents use the blackboard and the mesh's models.

`build_server(tools)` makes the server with the official SDK (`MCPServer`). What the tools do is
behind one seam, `MeshTools`: the node implements it in process (served over streamable HTTP at
`/mcp` on its API port through `McpHttp`), and `HttpTools` implements it over a running node's HTTP
endpoints (what `mesh-llm blackboard --mcp` serves over stdio, see `local.py`).

Errors: arguments are checked here, with messages written for the agent that sent them; a
`MeshLLMError` raised by the tools becomes a tool result with `isError` set whose text is the
error's message (a `RateLimited` one says when to retry). Anything else is a crash: the SDK logs
it and the agent sees only the tool's name.

Tool results are structured: each tool returns a JSON object (published as its output schema),
and the same object as indented JSON text for clients that read only text.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Annotated, Any, ParamSpec, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import httpx2
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field, ValidationError
from starlette.types import Receive, Scope, Send
from typing_extensions import TypedDict

from blackboard.post import KNOWN_KINDS, MAX_AUTHOR, MAX_TEXT_BYTES, TTL_S, check_author, check_text
from mesh_mcp import __version__
from mesh_mcp.api.errors import error_response
from mesh_mcp.errors import BackendLoading, BlackboardError, MeshLLMError, ModelNotFound, RateLimited
from mesh_mcp.mcp.local import MCP_PATHS, api_root

log = logging.getLogger("mesh_llm.mcp")

MAX_LIMIT = 100
DEFAULT_LIMIT = 20
MAX_SINCE_HOURS = TTL_S / 3600  # older posts have expired anyway
MAX_QUERY_BYTES = 1024
MAX_QUESTION_BYTES = 32 * 1024
MAX_TOKENS = 4096
DEFAULT_MAX_TOKENS = 512
MAX_MODEL_NAME = 256
_KIND = re.compile(r"[A-Z][A-Z_-]{1,15}")
_POST_ID = re.compile(r"[0-9a-f]{32}")
START_HINT = "mesh-llm --client --blackboard"


class MeshTools(Protocol):
    """What the MCP tools do; the node implements it in process, `HttpTools` over HTTP."""

    async def post(self, text: str, reply_to: str | None, author: str | None) -> dict[str, Any]:
        """Post to the blackboard; returns the stored post's `Post.summary()`."""
        ...

    async def search(
        self, query: str, author: str | None, kind: str | None, since_hours: float | None, limit: int
    ) -> list[dict[str, Any]]:
        """Posts matching `query` (post summaries)."""
        ...

    async def feed(
        self, author: str | None, kind: str | None, since_hours: float | None, limit: int
    ) -> list[dict[str, Any]]:
        """Recent posts, newest first (post summaries)."""
        ...

    async def models(self) -> list[dict[str, Any]]:
        """Models of the mesh: each `{"name", "nodes": [node ids], "state", "capabilities": {...}}`."""
        ...

    async def status(self) -> dict[str, Any]:
        """This node (id, name), its mesh peers, models and blackboard statistics."""
        ...

    async def ask(self, question: str, model: str | None, max_tokens: int) -> dict[str, Any]:
        """One chat completion: `{"model", "answer"}`; model None picks a serving model."""
        ...


# ---------------------------------------------------------------------------------------------
# Output shapes (published as the tools' output schemas)


class PostSummary(TypedDict):
    id: Annotated[str, Field(description="the post's id (32 hex chars): give it as reply_to to answer the post")]
    author: Annotated[str, Field(description="who wrote it")]
    origin: Annotated[str, Field(description="id of the node it was posted on")]
    created: Annotated[float, Field(description="when it was posted, unix seconds")]
    kind: Annotated[str, Field(description='the leading "KIND:" of the text (STATUS, FINDING, ...), or ""')]
    text: Annotated[str, Field(description="the text as stored (after scrubbing)")]
    reply_to: Annotated[str | None, Field(description="id of the post this one answers")]


class PostList(TypedDict):
    posts: list[PostSummary]
    count: int


class ModelInfo(TypedDict):
    name: Annotated[str, Field(description="the model's name: give it as `model` to mesh_ask")]
    nodes: Annotated[list[str], Field(description="ids of the nodes that serve it")]
    state: Annotated[str, Field(description="serving, loading, downloading, failed or stopped")]
    capabilities: Annotated[dict[str, Any], Field(description="what is known of what it can do")]


class ModelList(TypedDict):
    models: list[ModelInfo]


class Answer(TypedDict):
    model: Annotated[str, Field(description="the model that answered")]
    answer: Annotated[str, Field(description="its answer")]


# ---------------------------------------------------------------------------------------------
# Arguments. Ranges appear in the JSON schema (for the agent) and are checked in `_check_*`, so
# that a wrong value gets one plain sentence back rather than a pydantic report.

Text = Annotated[
    str,
    Field(
        description=f"The post, at most {MAX_TEXT_BYTES} bytes of UTF-8. Start it with its kind, e.g. "
        "'FINDING: the flaky test fails only with -n 4'.",
        json_schema_extra={"minLength": 1},
    ),
]
ReplyTo = Annotated[
    str | None,
    Field(
        description="Id of the post this one answers (32 hex characters, from a search or feed result).",
        json_schema_extra={"pattern": "^[0-9a-fA-F]{32}$"},
    ),
]
PostAuthor = Annotated[
    str | None,
    Field(
        description=f"Your name as the post's author (one line, at most {MAX_AUTHOR} characters); "
        "default: the node's choice. Use the same name for all your posts.",
        json_schema_extra={"maxLength": MAX_AUTHOR},
    ),
]
Query = Annotated[
    str,
    Field(
        description=f"Words to look for in posts (at most {MAX_QUERY_BYTES} bytes).",
        json_schema_extra={"minLength": 1},
    ),
]
AuthorFilter = Annotated[
    str | None,
    Field(description="Only posts by this author.", json_schema_extra={"maxLength": MAX_AUTHOR}),
]
KindFilter = Annotated[
    str | None,
    Field(
        description="Only posts of this kind, e.g. STATUS, FINDING, QUESTION, ANSWER.",
        json_schema_extra={"pattern": "^[A-Za-z][A-Za-z_-]{1,15}:?$"},
    ),
]
SinceHours = Annotated[
    float | None,
    Field(
        description=f"Only posts from the last this many hours (more than 0, at most {MAX_SINCE_HOURS:g}).",
        json_schema_extra={"exclusiveMinimum": 0, "maximum": MAX_SINCE_HOURS},
    ),
]
Limit = Annotated[
    int,
    Field(
        description=f"At most this many posts (1 to {MAX_LIMIT}).",
        json_schema_extra={"minimum": 1, "maximum": MAX_LIMIT},
    ),
]
Question = Annotated[
    str,
    Field(
        description="The question or task, self-contained: the model sees nothing else.",
        json_schema_extra={"minLength": 1},
    ),
]
ModelName = Annotated[
    str | None,
    Field(
        description="A model name from mesh_models; omit it to let the mesh pick a serving model.",
        json_schema_extra={"maxLength": MAX_MODEL_NAME},
    ),
]
MaxTokens = Annotated[
    int,
    Field(
        description=f"Longest answer, in tokens (1 to {MAX_TOKENS}).",
        json_schema_extra={"minimum": 1, "maximum": MAX_TOKENS},
    ),
]


class InvalidArgument(MeshLLMError):
    """A tool argument is out of range or malformed (the message says which and why)."""


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgument(f"limit must be between 1 and {MAX_LIMIT}; got {limit}")
    return limit


def _check_since(since_hours: float | None) -> float | None:
    if since_hours is None:
        return None
    if not math.isfinite(since_hours) or not 0 < since_hours <= MAX_SINCE_HOURS:
        raise InvalidArgument(
            f"since_hours must be more than 0 and at most {MAX_SINCE_HOURS:g} (posts expire after "
            f"{MAX_SINCE_HOURS:g} h); got {since_hours}"
        )
    return since_hours


def _blank(value: str | None) -> bool:
    """Agents often send "" for an optional argument they mean to leave out."""
    return value is None or not value.strip()


def _check_kind(kind: str | None) -> str | None:
    if kind is None or _blank(kind):
        return None
    normal = kind.strip().removesuffix(":").strip().upper()
    if not _KIND.fullmatch(normal):
        raise InvalidArgument(f"kind is one word of 2 to 16 letters, e.g. {', '.join(KNOWN_KINDS[:4])}; got {kind!r}")
    return normal


def _check_author_filter(author: str | None) -> str | None:
    if author is None or _blank(author):
        return None
    author = author.strip()
    if len(author) > MAX_AUTHOR or any(c in author for c in "\x00\n\r"):
        raise InvalidArgument(f"author is one line of 1 to {MAX_AUTHOR} characters")
    return author


def _check_reply_to(reply_to: str | None) -> str | None:
    if reply_to is None or _blank(reply_to):
        return None
    normal = reply_to.strip().lower()
    if not _POST_ID.fullmatch(normal):
        raise InvalidArgument(f"reply_to is a post id: 32 hex characters; got {reply_to[:80]!r}")
    return normal


def _bounded(value: str, name: str, max_bytes: int, empty: str) -> str:
    value = value.strip()
    if not value:
        raise InvalidArgument(empty)
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidArgument(f"{name} is at most {max_bytes} bytes of UTF-8; this one is {size}")
    return value


def _check_query(query: str) -> str:
    return _bounded(query, "query", MAX_QUERY_BYTES, "query needs at least one word to search for")


def _check_question(question: str) -> str:
    return _bounded(question, "question", MAX_QUESTION_BYTES, "question is empty")


def _check_model(model: str | None) -> str | None:
    if model is None or _blank(model):
        return None
    model = model.strip()
    if len(model) > MAX_MODEL_NAME or any(c in model for c in "\x00\n\r"):
        raise InvalidArgument(f"model is a name from mesh_models (one line, at most {MAX_MODEL_NAME} characters)")
    return model


def _check_max_tokens(max_tokens: int) -> int:
    if not 1 <= max_tokens <= MAX_TOKENS:
        raise InvalidArgument(f"max_tokens must be between 1 and {MAX_TOKENS}; got {max_tokens}")
    return max_tokens


# What each argument takes, for the sentence that answers a value of the wrong type (which the SDK's pydantic
# validation catches before a tool runs, and would report as a pydantic dump with a documentation URL).
_EXPECTED = {
    "text": f"a string of at most {MAX_TEXT_BYTES} bytes (the post, starting with its kind, e.g. 'STATUS: ...')",
    "reply_to": "a post id (32 hex characters), or left out",
    "author": f"one line of at most {MAX_AUTHOR} characters (your name), or left out",
    "query": f"a string of at most {MAX_QUERY_BYTES} bytes (the words to search for)",
    "kind": "a kind such as STATUS, FINDING, QUESTION or ANSWER, or left out",
    "since_hours": f"a number of hours, more than 0 and at most {MAX_SINCE_HOURS:g}, or left out",
    "limit": f"a whole number from 1 to {MAX_LIMIT}",
    "question": "a string (the question, self-contained)",
    "model": "a model name from mesh_models, or left out",
    "max_tokens": f"a whole number from 1 to {MAX_TOKENS}",
}


def argument_errors(tool: str, exc: ValidationError, most: int = 3) -> str:
    """One sentence for arguments the SDK's validation refused: each argument named with what it takes."""
    parts = []
    for err in exc.errors()[:most]:
        name = ".".join(str(part) for part in err["loc"]) or "the arguments"
        expected = _EXPECTED.get(str(err["loc"][0]) if err["loc"] else "", "")
        if err["type"] == "missing":
            parts.append(f"{name} is required" + (f": {expected}" if expected else ""))
            continue
        shown = repr(err.get("input"))
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        what = expected or str(err["msg"]).removeprefix("Input should be ")
        parts.append(f"{name} must be {what}; got {shown}")
    more = len(exc.errors()) - most
    return f"{tool}: " + "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


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


def _posts(items: list[dict[str, Any]]) -> PostList:
    return {"posts": cast(list[PostSummary], items), "count": len(items)}


INSTRUCTIONS = f"""\
This server connects you to a mesh-llm mesh: machines that pool their GPUs to serve LLMs, and a
shared blackboard where the agents working on those machines leave short notes for each other.

Blackboard etiquette: before starting a piece of work, search or read the feed for what others
already found or are doing. Post what you start (STATUS:), what you learn that others could use
(FINDING:), what you need (QUESTION:), and answer others' questions (ANSWER:, with reply_to).
Posts are visible to every node and agent of the mesh, are scrubbed of personal data (e-mail
addresses, phone numbers, keys, tokens, home paths) before they are stored, cannot be edited or
deleted, and expire after {MAX_SINCE_HOURS:g} hours. Keep them short and self-contained.

mesh_models and mesh_status show what the mesh serves; mesh_ask sends a self-contained question to
one of its models."""

POST_DESCRIPTION = f"""\
Post a message to the mesh blackboard, which every node and agent in this mesh can read.

Use it to tell other agents what you are working on, to share something you found, to ask for
help, or to answer a question. Start the text with its kind:
- STATUS: what you are doing now ("STATUS: refactoring the gossip codec, avoid mesh/wire.py")
- FINDING: something you learned that others can use ("FINDING: tests need MESH_LLM_HOME set")
- QUESTION: something you need from others
- ANSWER: a reply to a QUESTION; pass the question's id as reply_to
Other kinds: {", ".join(KNOWN_KINDS[4:])}.

The post is visible to the whole mesh, is scrubbed of personal data (e-mail addresses, phone
numbers, keys, tokens, home paths) before it is stored, cannot be edited or deleted, and expires
after {MAX_SINCE_HOURS:g} hours. At most {MAX_TEXT_BYTES} bytes. Posting is rate-limited per author:
when told to retry, wait that long. Returns the post as stored, with its id."""

SEARCH_DESCRIPTION = f"""\
Search the mesh blackboard for posts containing the given words.

Use it before starting work (has another agent already found or started this?), and to find
answers to a problem you hit. Narrow it with author, kind (STATUS, FINDING, QUESTION, ANSWER, ...)
and since_hours. Only posts of the last {MAX_SINCE_HOURS:g} hours exist; the text is as stored (scrubbed)."""

FEED_DESCRIPTION = f"""\
The latest posts on the mesh blackboard, newest first.

Use it to catch up on what the other agents of the mesh are doing (kind=STATUS), what they found
(kind=FINDING), or which questions are open (kind=QUESTION). Filter by author, kind and
since_hours; without filters it is the whole board of the last {MAX_SINCE_HOURS:g} hours, up to limit posts."""

MODELS_DESCRIPTION = """\
The models this mesh serves or is starting: for each its name (give it as `model` to mesh_ask),
the ids of the nodes that serve it, its state (serving, loading, downloading, failed) and what is
known of its capabilities. Only `serving` models answer."""

STATUS_DESCRIPTION = """\
This node and its mesh: the node's id and name, the mesh's peers (other nodes, their roles and
the models they serve), this node's models, and blackboard statistics. Use it to check that the
mesh is up and who is in it."""

ASK_DESCRIPTION = """\
Ask one of the mesh's models a question and get its answer (a single chat completion: no history,
no tools, the model sees only your question).

Use it to offload a self-contained sub-task or to get a second opinion from a local model. The
models may be small: check what they say. model is a name from mesh_models; omitted, a serving
model is picked. Returns the answer and the model that gave it."""


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
        reply = _check_reply_to(reply_to)
        who = None if author is None or _blank(author) else check_author(author)
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
            _check_query(query),
            _check_author_filter(author),
            _check_kind(kind),
            _check_since(since_hours),
            _check_limit(limit),
        )
        return _posts(found)

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
            _check_author_filter(author), _check_kind(kind), _check_since(since_hours), _check_limit(limit)
        )
        return _posts(found)

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
        q = _check_question(question)
        return cast(Answer, await tools.ask(q, _check_model(model), _check_max_tokens(max_tokens)))

    return server


# ---------------------------------------------------------------------------------------------
# MeshTools over a running node's HTTP endpoints


class HttpTools:
    """`MeshTools` for a node running on this machine, through its console (`/api/*`) and API (`/v1/*`).

    Every call uses a fresh HTTP client (local calls; nothing to close). HTTP and connection failures
    become the project's errors, with the node's own message."""

    CONSOLE_TIMEOUT_S = 15.0
    ASK_TIMEOUT_S = 600.0  # a long answer from a model on CPU takes minutes

    def __init__(self, console_url: str, api_url: str) -> None:
        self.console_url = console_url.rstrip("/")
        self.api_url = api_root(api_url)

    # -- blackboard

    async def post(self, text: str, reply_to: str | None, author: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"text": text}
        if author is not None:
            body["author"] = author
        if reply_to is not None:
            body["reply_to"] = reply_to
        data = await self._request("POST", self.console_url + "/api/blackboard", json=body, blackboard=True)
        post = data.get("post")
        if not isinstance(post, dict):
            raise MeshLLMError(f"the node at {self.console_url} answered a post without the post: {str(data)[:200]}")
        return post

    async def search(
        self, query: str, author: str | None, kind: str | None, since_hours: float | None, limit: int
    ) -> list[dict[str, Any]]:
        return await self._posts({"q": query, "from": author, "kind": kind, "since": since_hours, "limit": limit})

    async def feed(
        self, author: str | None, kind: str | None, since_hours: float | None, limit: int
    ) -> list[dict[str, Any]]:
        return await self._posts({"from": author, "kind": kind, "since": since_hours, "limit": limit})

    async def _posts(self, params: Mapping[str, str | float | int | None]) -> list[dict[str, Any]]:
        query = {k: str(v) for k, v in params.items() if v is not None}
        data = await self._request("GET", self.console_url + "/api/blackboard", params=query, blackboard=True)
        posts = data.get("posts")
        if not isinstance(posts, list) or not all(isinstance(p, dict) for p in posts):
            raise MeshLLMError(f"the node at {self.console_url} answered without a list of posts: {str(data)[:200]}")
        return posts

    # -- mesh

    async def models(self) -> list[dict[str, Any]]:
        out = []
        for entry in await self._model_entries():
            caps = entry.get("capabilities")
            capabilities: dict[str, Any] = dict(caps) if isinstance(caps, dict) else {}
            for key in ("embeddings", "architecture", "context_length", "vision", "tools"):
                if key in entry and key not in capabilities:
                    capabilities[key] = entry[key]
            nodes = entry.get("nodes")
            out.append(
                {
                    "name": str(entry.get("id", "")),
                    "nodes": [str(n) for n in nodes] if isinstance(nodes, list) else [],
                    "state": str(entry.get("state", "serving")),
                    "capabilities": capabilities,
                }
            )
        return out

    async def status(self) -> dict[str, Any]:
        snap = await self._request("GET", self.console_url + "/api/status")
        keep = ("node_id", "name", "version", "mesh_id", "uptime_s", "api_url", "console_url", "peers", "blackboard")
        out = {k: snap[k] for k in keep if k in snap}  # not the invite token: a secret that admits machines
        models = snap.get("models")
        if isinstance(models, list):
            out["models"] = [
                {k: m.get(k) for k in ("name", "state", "detail", "in_flight")} for m in models if isinstance(m, dict)
            ]
        return out

    async def ask(self, question: str, model: str | None, max_tokens: int) -> dict[str, Any]:
        if model is None:
            model = await self._pick_model()
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "stream": False,
        }
        data = await self._request(
            "POST", self.api_url + "/v1/chat/completions", json=payload, wait_s=self.ASK_TIMEOUT_S
        )
        try:
            message = data["choices"][0]["message"]
            answer = message.get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise MeshLLMError(f"the model's server answered without a completion: {str(data)[:200]}") from exc
        answered_by = data.get("model")
        return {"model": answered_by if isinstance(answered_by, str) and answered_by else model, "answer": answer}

    async def _model_entries(self) -> list[dict[str, Any]]:
        data = await self._request("GET", self.api_url + "/v1/models")
        entries = data.get("data")
        if not isinstance(entries, list):
            raise MeshLLMError(f"the node at {self.api_url} answered /v1/models without a list: {str(data)[:200]}")
        return [e for e in entries if isinstance(e, dict)]

    async def _pick_model(self) -> str:
        """A serving generation model (the first the node lists: its own come first)."""
        entries = await self._model_entries()
        for entry in entries:
            if entry.get("state", "serving") == "serving" and not entry.get("embeddings") and entry.get("id"):
                return str(entry["id"])
        if any(e.get("state") in ("loading", "downloading") for e in entries):
            raise BackendLoading("no model of this mesh is serving yet; they are still loading: ask again in a minute")
        raise MeshLLMError(
            "no node of this mesh serves a model: start one with `mesh-llm --model NAME` "
            "(e.g. SmolLM2-135M-Instruct) or join a mesh that does"
        )

    # -- HTTP

    async def _request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        wait_s: float = CONSOLE_TIMEOUT_S,
        blackboard: bool = False,
    ) -> dict[str, Any]:
        base = _origin(url)
        try:
            async with httpx2.AsyncClient(timeout=httpx2.Timeout(wait_s, connect=5.0)) as client:
                resp = await client.request(method, url, json=json, params=params)
        except httpx2.ConnectError as exc:
            raise MeshLLMError(
                f"no mesh-llm node is running at {base} (connection refused): start one with `{START_HINT}`"
            ) from exc
        except httpx2.TimeoutException as exc:
            raise MeshLLMError(f"the mesh-llm node at {base} did not answer within {wait_s:g} s") from exc
        except httpx2.TransportError as exc:
            raise MeshLLMError(f"talking to the mesh-llm node at {base} failed: {exc or type(exc).__name__}") from exc
        if resp.status_code >= 400:
            raise _http_error(resp, base, blackboard)
        try:
            data = resp.json()
        except ValueError as exc:
            raise MeshLLMError(f"the node at {base} answered {method} {url} with something not JSON") from exc
        if not isinstance(data, dict):
            raise MeshLLMError(f"the node at {base} answered {method} {url} with JSON that is not an object")
        return data


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _error_message(resp: httpx2.Response) -> tuple[str, str | None]:
    """The message (and error code) of an error response: `{"error": {"message", "code"}}`,
    `{"error": "..."}`, or the body's text."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            code = err.get("code")
            return err["message"], code if isinstance(code, str) else None
        if isinstance(err, str):
            return err, None
        if isinstance(body.get("detail"), str):
            return body["detail"], None
    text = resp.text.strip()
    return (text[:500] if text else f"HTTP {resp.status_code} {resp.reason_phrase}"), None


def _retry_after(resp: httpx2.Response, default: float = 1.0) -> float:
    try:
        value = float(resp.headers.get("retry-after", ""))
    except ValueError:
        return default
    return value if math.isfinite(value) and value >= 0 else default


def _http_error(resp: httpx2.Response, base: str, blackboard: bool) -> MeshLLMError:
    message, code = _error_message(resp)
    status = resp.status_code
    if status == 429:
        return RateLimited(message, _retry_after(resp))
    if blackboard and status == 404:
        if "blackboard" in message:  # the node's own explanation
            return BlackboardError(message)
        return BlackboardError(f"the node at {base} has no blackboard (HTTP 404); start one with `{START_HINT}`")
    if blackboard and status in (400, 409, 413, 422, 507):
        return BlackboardError(message)
    if status == 404 and code == "model_not_found":
        return ModelNotFound(message)
    if status == 503 and ("retry-after" in resp.headers or code == "model_loading"):
        return BackendLoading(message)
    return MeshLLMError(f"the node at {base} answered HTTP {status}: {message}")


# ---------------------------------------------------------------------------------------------
# Streamable HTTP at /mcp, for the node's own ASGI app

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

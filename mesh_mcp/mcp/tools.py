"""What the mesh's six MCP tools are: the `MeshTools` seam they call, their limits, argument schemas and
checks, output shapes, and the words an agent reads about them (instructions and descriptions).

Nothing here imports the MCP SDK: `server.py` registers these with it. Arguments are checked here, with
messages written for the agent that sent them (`InvalidArgument`); a value of the wrong type, which the
SDK's validation refuses before a tool runs, is answered by `argument_errors` in the same words.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Protocol, cast

from pydantic import Field, ValidationError
from typing_extensions import TypedDict

from blackboard.post import KNOWN_KINDS, MAX_AUTHOR, MAX_TEXT_BYTES, TTL_S
from mesh_mcp.errors import MeshLLMError

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


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgument(f"limit must be between 1 and {MAX_LIMIT}; got {limit}")
    return limit


def check_since(since_hours: float | None) -> float | None:
    if since_hours is None:
        return None
    if not math.isfinite(since_hours) or not 0 < since_hours <= MAX_SINCE_HOURS:
        raise InvalidArgument(
            f"since_hours must be more than 0 and at most {MAX_SINCE_HOURS:g} (posts expire after "
            f"{MAX_SINCE_HOURS:g} h); got {since_hours}"
        )
    return since_hours


def blank(value: str | None) -> bool:
    """Agents often send "" for an optional argument they mean to leave out."""
    return value is None or not value.strip()


def check_kind(kind: str | None) -> str | None:
    if kind is None or blank(kind):
        return None
    normal = kind.strip().removesuffix(":").strip().upper()
    if not _KIND.fullmatch(normal):
        raise InvalidArgument(f"kind is one word of 2 to 16 letters, e.g. {', '.join(KNOWN_KINDS[:4])}; got {kind!r}")
    return normal


def check_author_filter(author: str | None) -> str | None:
    if author is None or blank(author):
        return None
    author = author.strip()
    if len(author) > MAX_AUTHOR or any(c in author for c in "\x00\n\r"):
        raise InvalidArgument(f"author is one line of 1 to {MAX_AUTHOR} characters")
    return author


def check_reply_to(reply_to: str | None) -> str | None:
    if reply_to is None or blank(reply_to):
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


def check_query(query: str) -> str:
    return _bounded(query, "query", MAX_QUERY_BYTES, "query needs at least one word to search for")


def check_question(question: str) -> str:
    return _bounded(question, "question", MAX_QUESTION_BYTES, "question is empty")


def check_model(model: str | None) -> str | None:
    if model is None or blank(model):
        return None
    model = model.strip()
    if len(model) > MAX_MODEL_NAME or any(c in model for c in "\x00\n\r"):
        raise InvalidArgument(f"model is a name from mesh_models (one line, at most {MAX_MODEL_NAME} characters)")
    return model


def check_max_tokens(max_tokens: int) -> int:
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


def post_list(items: list[dict[str, Any]]) -> PostList:
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

"""The MCP server through the SDK's own clients: in memory, over streamable HTTP (`McpHttp` on a real
uvicorn), over stdio (`run_stdio` in a subprocess); `HttpTools` against a small real HTTP server
that speaks the node's contract; and `local.py`'s runtime file and node start/stop.

`TwinTools` stands in for the node: an in-memory `MeshTools` that keeps posts in a list.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp_types import CallToolResult, TextContent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from blackboard.post import parse_kind
from mesh_mcp.api.serve import serve_http
from mesh_mcp.errors import BackendLoading, BlackboardError, MeshLLMError, ModelNotFound, RateLimited
from mesh_mcp.mcp import local
from mesh_mcp.mcp.client import HttpTools
from mesh_mcp.mcp.http_app import McpHttp
from mesh_mcp.mcp.local import (
    MCP_PATHS,
    RuntimeInfo,
    attach_or_start,
    find_running,
    read_runtime,
    remove_runtime,
    write_runtime,
)
from mesh_mcp.mcp.server import build_server
from mesh_mcp.mcp.tools import MeshTools

REPO = Path(__file__).resolve().parent.parent
TOOLS = {"blackboard_post", "blackboard_search", "blackboard_feed", "mesh_models", "mesh_status", "mesh_ask"}


# ---------------------------------------------------------------------------------------------
# The twin


class TwinTools:
    """An in-memory mesh: posts in a list, one serving model that echoes."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: Exception | None = None

    def _enter(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.fail is not None:
            raise self.fail

    async def post(self, text: str, reply_to: str | None, author: str | None) -> dict[str, Any]:
        self._enter("post", text, reply_to, author)
        created = round(time.time(), 3) + len(self.posts) * 0.001
        summary = {
            "id": hashlib.sha256(f"{text}{created}".encode()).hexdigest()[:32],
            "author": author or "twin-node",
            "origin": "0123456789abcdef",
            "created": created,
            "kind": parse_kind(text),
            "text": text,
            "reply_to": reply_to,
        }
        self.posts.append(summary)
        return summary

    def _select(
        self, query: str | None, author: str | None, kind: str | None, since_hours: float | None, limit: int
    ) -> list[dict[str, Any]]:
        cutoff = time.time() - since_hours * 3600 if since_hours is not None else -math.inf
        out = [
            p
            for p in reversed(self.posts)
            if (query is None or query.lower() in p["text"].lower())
            and (author is None or p["author"] == author)
            and (kind is None or p["kind"] == kind)
            and p["created"] >= cutoff
        ]
        return out[:limit]

    async def search(
        self, query: str, author: str | None, kind: str | None, since_hours: float | None, limit: int
    ) -> list[dict[str, Any]]:
        self._enter("search", query, author, kind, since_hours, limit)
        return self._select(query, author, kind, since_hours, limit)

    async def feed(
        self, author: str | None, kind: str | None, since_hours: float | None, limit: int
    ) -> list[dict[str, Any]]:
        self._enter("feed", author, kind, since_hours, limit)
        return self._select(None, author, kind, since_hours, limit)

    async def models(self) -> list[dict[str, Any]]:
        self._enter("models")
        return [{"name": "Echo-1B", "nodes": ["n1", "n2"], "state": "serving", "capabilities": {"embeddings": False}}]

    async def status(self) -> dict[str, Any]:
        self._enter("status")
        return {"node_id": "n1", "name": "twin", "peers": [{"node_id": "n2"}], "blackboard": {"posts": len(self.posts)}}

    async def ask(self, question: str, model: str | None, max_tokens: int) -> dict[str, Any]:
        self._enter("ask", question, model, max_tokens)
        return {"model": model or "Echo-1B", "answer": f"echo({max_tokens}): {question}"}


def _twin_is_mesh_tools(t: TwinTools) -> MeshTools:  # mypy checks the twin against the protocol
    return t


def text_of(result: CallToolResult) -> str:
    assert len(result.content) == 1 and isinstance(result.content[0], TextContent), result.content
    return result.content[0].text


def run(fn: Callable[[], Awaitable[None]]) -> None:
    anyio.run(fn)


# ---------------------------------------------------------------------------------------------
# (a) In memory


@pytest.fixture(params=["auto", "legacy"])
def mode(request: pytest.FixtureRequest) -> str:
    """auto: the 2026 per-request protocol (in process, no JSON-RPC); legacy: initialize + JSON-RPC streams."""
    return str(request.param)


def test_lists_the_six_tools_with_schemas(mode: str) -> None:
    async def go() -> None:
        async with Client(build_server(TwinTools()), mode=mode) as client:
            listed = {t.name: t for t in (await client.list_tools()).tools}
        assert set(listed) == TOOLS
        post = listed["blackboard_post"]
        assert post.input_schema["required"] == ["text"]
        assert set(post.input_schema["properties"]) == {"text", "reply_to", "author"}
        assert "48 hours" in (post.description or "") and "QUESTION:" in (post.description or "")
        assert post.output_schema is not None and "id" in post.output_schema["properties"]
        assert post.annotations is not None and post.annotations.read_only_hint is False
        search = listed["blackboard_search"].input_schema
        assert search["required"] == ["query"]
        assert search["properties"]["limit"]["maximum"] == 100 and search["properties"]["limit"]["minimum"] == 1
        assert search["properties"]["since_hours"]["maximum"] == 48
        assert "required" not in listed["blackboard_feed"].input_schema
        assert listed["mesh_ask"].input_schema["properties"]["max_tokens"]["maximum"] == 4096
        for name in ("blackboard_search", "blackboard_feed", "mesh_models", "mesh_status"):
            annotations = listed[name].annotations
            assert annotations is not None and annotations.read_only_hint, name
        assert all(t.description and len(t.description) > 80 for t in listed.values())

    run(go)


def test_every_tool_round_trip(mode: str) -> None:
    twin = TwinTools()

    async def go() -> None:
        async with Client(build_server(twin), mode=mode) as client:
            r = await client.call_tool("blackboard_post", {"text": "  QUESTION: who owns wire.py?  ", "author": "a1"})
            assert not r.is_error, text_of(r)
            question = r.structured_content
            assert question is not None and question["kind"] == "QUESTION" and question["author"] == "a1"
            assert question["text"] == "QUESTION: who owns wire.py?"  # trimmed before it reaches the node
            assert json.loads(text_of(r)) == question
            r = await client.call_tool(
                "blackboard_post", {"text": "ANSWER: b2 does", "reply_to": question["id"].upper(), "author": "b2"}
            )
            assert not r.is_error, text_of(r)
            assert r.structured_content is not None and r.structured_content["reply_to"] == question["id"]

            r = await client.call_tool("blackboard_feed", {})
            assert r.structured_content is not None and r.structured_content["count"] == 2
            assert [p["kind"] for p in r.structured_content["posts"]] == ["ANSWER", "QUESTION"]
            r = await client.call_tool("blackboard_feed", {"kind": "question:", "since_hours": 1, "limit": 5})
            assert r.structured_content is not None
            assert [p["id"] for p in r.structured_content["posts"]] == [question["id"]]
            assert twin.calls[-1] == ("feed", (None, "QUESTION", 1.0, 5))

            r = await client.call_tool("blackboard_search", {"query": "wire.py", "author": "a1"})
            assert r.structured_content is not None and r.structured_content["count"] == 1
            assert twin.calls[-1] == ("search", ("wire.py", "a1", None, None, 20))

            r = await client.call_tool("mesh_models", {})
            assert r.structured_content == {
                "models": [
                    {
                        "name": "Echo-1B",
                        "nodes": ["n1", "n2"],
                        "state": "serving",
                        "capabilities": {"embeddings": False},
                    }
                ]
            }
            r = await client.call_tool("mesh_status", {})
            assert r.structured_content is not None and r.structured_content["blackboard"] == {"posts": 2}
            r = await client.call_tool("mesh_ask", {"question": "2+2?", "max_tokens": 8})
            assert r.structured_content == {"model": "Echo-1B", "answer": "echo(8): 2+2?"}
            assert twin.calls[-1] == ("ask", ("2+2?", None, 8))

            # Agents often fill optional arguments with "": that means "not given".
            r = await client.call_tool("blackboard_post", {"text": "NOTE: n", "author": "", "reply_to": " "})
            assert not r.is_error and twin.calls[-1] == ("post", ("NOTE: n", None, None))
            r = await client.call_tool("blackboard_feed", {"author": "", "kind": ""})
            assert not r.is_error and twin.calls[-1] == ("feed", (None, None, None, 20))
            r = await client.call_tool("mesh_ask", {"question": "q", "model": ""})
            assert not r.is_error and twin.calls[-1] == ("ask", ("q", None, 512))

    run(go)


BAD_CALLS = [
    ("blackboard_post", {"text": ""}, "a post needs some text"),
    ("blackboard_post", {"text": "   "}, "a post needs some text"),
    ("blackboard_post", {"text": "é" * 2049}, "at most 4096 bytes of UTF-8; this one is 4098"),
    ("blackboard_post", {"text": "x", "reply_to": "not-an-id"}, "reply_to is a post id: 32 hex characters"),
    ("blackboard_post", {"text": "x", "author": "a\nb"}, "one line"),
    ("blackboard_post", {"text": 5}, "text"),
    ("blackboard_post", {}, "text"),
    ("blackboard_search", {"query": " "}, "query needs at least one word"),
    ("blackboard_search", {"query": "x" * 1025}, "at most 1024 bytes"),
    ("blackboard_search", {"query": "x", "limit": 0}, "limit must be between 1 and 100; got 0"),
    ("blackboard_feed", {"limit": 101}, "limit must be between 1 and 100; got 101"),
    ("blackboard_feed", {"limit": "many"}, "limit"),
    ("blackboard_feed", {"since_hours": 0}, "since_hours must be more than 0 and at most 48"),
    ("blackboard_feed", {"since_hours": 49}, "since_hours must be more than 0 and at most 48"),
    ("blackboard_feed", {"since_hours": -1}, "since_hours"),
    ("blackboard_feed", {"kind": "not a kind"}, "kind is one word of 2 to 16 letters"),
    ("blackboard_feed", {"author": "x" * 65}, "author is one line of 1 to 64 characters"),
    ("mesh_ask", {"question": ""}, "question is empty"),
    ("mesh_ask", {"question": "hi", "max_tokens": 0}, "max_tokens must be between 1 and 4096; got 0"),
    ("mesh_ask", {"question": "hi", "max_tokens": 4097}, "max_tokens must be between 1 and 4096"),
]


@pytest.mark.parametrize(("tool", "args", "expected"), BAD_CALLS)
def test_invalid_arguments_are_clear_errors(tool: str, args: dict[str, Any], expected: str) -> None:
    twin = TwinTools()

    async def go() -> None:
        async with Client(build_server(twin)) as client:
            r = await client.call_tool(tool, args)
        assert r.is_error
        assert expected in text_of(r)

    run(go)
    assert twin.calls == []  # refused before reaching the node


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (BlackboardError("the blackboard is full"), "the blackboard is full"),
        (RateLimited("author a1 posts too fast", 12.2), "author a1 posts too fast; retry in 13 s"),
        (RateLimited("slow down; retry in 3 s", 3), "slow down; retry in 3 s"),
        (MeshLLMError("no node at http://127.0.0.1:3131"), "no node at http://127.0.0.1:3131"),
    ],
)
def test_mesh_errors_become_error_results(error: MeshLLMError, expected: str, mode: str) -> None:
    twin = TwinTools()
    twin.fail = error

    async def go() -> None:
        async with Client(build_server(twin), mode=mode) as client:
            for tool, args in [("blackboard_post", {"text": "STATUS: hi"}), ("mesh_status", {})]:
                r = await client.call_tool(tool, args)
                assert r.is_error and r.structured_content is None
                assert text_of(r) == expected

    run(go)


def test_an_unexpected_crash_is_an_error_without_its_details() -> None:
    twin = TwinTools()
    twin.fail = RuntimeError("secret internals")

    async def go() -> None:
        async with Client(build_server(twin)) as client:
            r = await client.call_tool("mesh_models", {})
        assert r.is_error and "secret" not in text_of(r) and "mesh_models" in text_of(r)

    run(go)


# ---------------------------------------------------------------------------------------------
# (b) Streamable HTTP: McpHttp on a real uvicorn


def node_app(mcp: McpHttp) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A raw ASGI app that routes /mcp the way the node's does, everything else to a 404."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if McpHttp.handles(scope):
            await mcp(scope, receive, send)
            return
        await JSONResponse({"error": "not here"}, status_code=404)(scope, receive, send)

    return app


@asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """`app` on uvicorn at 127.0.0.1:<free port> for the block; stopped afterwards."""
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_http, app, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


def test_mcp_over_streamable_http(mode: str) -> None:
    twin = TwinTools()

    async def go() -> None:
        mcp = McpHttp(twin)
        async with mcp, served(node_app(mcp)) as base:
            for path in sorted(MCP_PATHS):
                async with Client(base + path, mode=mode) as client:
                    assert {t.name for t in (await client.list_tools()).tools} == TOOLS
                    r = await client.call_tool("blackboard_post", {"text": "FINDING: it works over HTTP"})
                    assert not r.is_error and r.structured_content is not None
                    r = await client.call_tool("blackboard_feed", {"kind": "FINDING"})
                    assert r.structured_content is not None and r.structured_content["count"] >= 1
                    twin.fail = RateLimited("too fast", 2)
                    r = await client.call_tool("blackboard_post", {"text": "again"})
                    assert r.is_error and text_of(r) == "too fast; retry in 2 s"
                    twin.fail = None

    run(go)


INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def test_mcp_http_refuses_foreign_hosts_and_origins() -> None:
    async def go() -> None:
        local_only = McpHttp(TwinTools())
        remote_ok = McpHttp(TwinTools(), allow_remote=True)
        async with (
            local_only,
            remote_ok,
            served(node_app(local_only)) as local_base,
            served(node_app(remote_ok)) as remote_base,
            httpx2.AsyncClient(timeout=10) as http,
        ):

            async def status(base: str, **headers: str) -> int:
                r = await http.post(base + "/mcp", json=INIT, headers={**HEADERS, **headers})
                return r.status_code

            port = local_base.rsplit(":", 1)[1]
            assert await status(local_base) == 200
            assert await status(local_base, host=f"localhost:{port}") == 200
            assert await status(local_base, origin=f"http://localhost:{port}") == 200
            assert await status(local_base, host=f"evil.example:{port}") == 421  # DNS rebinding
            assert await status(local_base, host=f"192.168.1.20:{port}") == 421
            assert await status(local_base, origin="http://evil.example") == 403
            assert await status(remote_base, host="192.168.1.20:9337") == 200  # --listen-all: other machines
            assert await status(remote_base, origin="http://evil.example") == 403  # but not web pages
            assert await status(remote_base, origin="http://127.0.0.1:3131") == 200
            r = await http.get(local_base + "/v1/other")
            assert r.status_code == 404

    run(go)


def test_mcp_http_answers_503_outside_its_lifetime() -> None:
    async def go() -> None:
        mcp = McpHttp(TwinTools())
        async with served(mcp) as base, httpx2.AsyncClient(timeout=10) as http:  # served as a whole app
            r = await http.post(base + "/mcp", json=INIT, headers=HEADERS)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            async with mcp:
                assert (await http.post(base + "/mcp", json=INIT, headers=HEADERS)).status_code == 200
                assert (await http.post(base + "/v1/chat/completions", json={})).status_code == 404
            r = await http.post(base + "/mcp", json=INIT, headers=HEADERS)
            assert r.status_code == 503

    run(go)


# ---------------------------------------------------------------------------------------------
# (c) HttpTools against a node-contract server


class FakeNode:
    """The node's HTTP contract (console /api/* and API /v1/*) as a Starlette app; records requests."""

    NODE_ID = "00112233aabbccdd"

    def __init__(self, *, blackboard: bool = True) -> None:
        self.posts: list[dict[str, Any]] = []
        self.queries: list[dict[str, str]] = []
        self.chats: list[dict[str, Any]] = []
        self.blackboard = blackboard
        routes = [
            Route("/api/status", self.status),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]
        if blackboard:
            routes.append(Route("/api/blackboard", self.board, methods=["GET", "POST"]))
        self.app = Starlette(routes=routes)

    async def board(self, request: Request) -> Response:
        if request.method == "GET":
            self.queries.append(dict(request.query_params))
            limit = int(request.query_params.get("limit", "20"))
            q = request.query_params.get("q")
            found = [p for p in reversed(self.posts) if q is None or q in p["text"]]
            return JSONResponse({"posts": found[:limit]})
        body = await request.json()
        text = body.get("text", "")
        if not text.strip():
            return JSONResponse({"error": {"message": "a post needs some text"}}, status_code=400)
        if body.get("author") == "spammer":
            msg = {"error": {"message": "spammer posts too fast"}}
            return JSONResponse(msg, status_code=429, headers={"Retry-After": "7"})
        if len(text.encode()) > 4096:
            return JSONResponse({"error": {"message": "a post is at most 4096 bytes"}}, status_code=413)
        post = {
            "id": hashlib.sha256(text.encode()).hexdigest()[:32],
            "author": body.get("author") or "node-name",
            "origin": self.NODE_ID,
            "created": 1700000000,
            "kind": parse_kind(text),
            "text": text,
            "reply_to": body.get("reply_to"),
        }
        self.posts.append(post)
        return JSONResponse({"post": post}, status_code=201)

    async def status(self, request: Request) -> Response:
        return JSONResponse(
            {
                "node_id": self.NODE_ID,
                "name": "fake",
                "version": "0.1.0",
                "api_url": "http://127.0.0.1:1/v1",
                "console_url": "http://127.0.0.1:2",
                "uptime_s": 3.5,
                "mesh_id": "m1",
                "invite_token": "SECRET-TOKEN",
                "hardware": {"gpus": []},
                "peers": [{"node_id": self.NODE_ID, "name": "fake", "role": "client", "models": [], "self": True}],
                "models": [{"name": "Small", "state": "serving", "detail": "", "in_flight": 0, "pid": 42}],
                "blackboard": {"posts": len(self.posts)},
            }
        )

    async def models(self, request: Request) -> Response:
        data = [
            {"id": "Embed", "object": "model", "state": "serving", "nodes": ["a"], "embeddings": True},
            {"id": "Loading-7B", "object": "model", "state": "loading", "nodes": ["a"]},
            {"id": "Small", "object": "model", "state": "serving", "nodes": ["a", "b"]},
        ]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.chats.append(body)
        if body["model"] == "missing":
            err = {"message": "model 'missing' is not served by this mesh; available: Small", "code": "model_not_found"}
            return JSONResponse({"error": err}, status_code=404)
        if body["model"] == "Loading-7B":
            err = {"message": "model 'Loading-7B' is loading; retry in 5s", "code": "model_loading"}
            return JSONResponse({"error": err}, status_code=503, headers={"Retry-After": "5"})
        answer = {"role": "assistant", "content": "4"}
        return JSONResponse({"model": body["model"], "choices": [{"message": answer, "finish_reason": "stop"}]})


def test_http_tools_speak_the_node_contract() -> None:
    node = FakeNode()

    async def go() -> None:
        async with served(node.app) as base:
            tools = HttpTools(base, base + "/v1/")  # the node reports its API URL with /v1
            post = await tools.post("FINDING: x", None, "a1")
            assert post["kind"] == "FINDING" and post["author"] == "a1"
            reply = await tools.post("ANSWER: y", post["id"], None)
            assert reply["reply_to"] == post["id"] and reply["author"] == "node-name"
            assert [p["id"] for p in await tools.feed(None, None, None, 20)] == [reply["id"], post["id"]]
            assert [p["id"] for p in await tools.search("FINDING", "a1", "FINDING", 2.5, 10)] == [post["id"]]
            assert node.queries == [
                {"limit": "20"},
                {"q": "FINDING", "from": "a1", "kind": "FINDING", "since": "2.5", "limit": "10"},
            ]

            with pytest.raises(BlackboardError, match="a post needs some text"):
                await tools.post(" ", None, None)
            with pytest.raises(BlackboardError, match="at most 4096 bytes"):
                await tools.post("x" * 5000, None, None)
            with pytest.raises(RateLimited, match="spammer posts too fast") as limited:
                await tools.post("STATUS: spam", None, "spammer")
            assert limited.value.retry_after == 7

            models = await tools.models()
            assert [m["name"] for m in models] == ["Embed", "Loading-7B", "Small"]
            assert models[0]["capabilities"] == {"embeddings": True}
            assert models[2] == {"name": "Small", "nodes": ["a", "b"], "state": "serving", "capabilities": {}}

            status = await tools.status()
            assert status["node_id"] == FakeNode.NODE_ID and status["blackboard"] == {"posts": 2}
            assert status["peers"][0]["role"] == "client"
            assert status["models"] == [{"name": "Small", "state": "serving", "detail": "", "in_flight": 0}]
            assert "invite_token" not in status and "SECRET-TOKEN" not in json.dumps(status)

            assert await tools.ask("2+2?", None, 16) == {"model": "Small", "answer": "4"}  # skips embeddings/loading
            assert node.chats[-1] == {
                "model": "Small",
                "messages": [{"role": "user", "content": "2+2?"}],
                "max_tokens": 16,
                "stream": False,
            }
            with pytest.raises(ModelNotFound, match="available: Small"):
                await tools.ask("hi", "missing", 16)
            with pytest.raises(BackendLoading, match="loading"):
                await tools.ask("hi", "Loading-7B", 16)

    run(go)


def test_http_tools_rate_limit_reaches_the_agent() -> None:
    node = FakeNode()

    async def go() -> None:
        async with served(node.app) as base:
            async with Client(build_server(HttpTools(base, base))) as client:
                r = await client.call_tool("blackboard_post", {"text": "STATUS: spam", "author": "spammer"})
                assert r.is_error and text_of(r) == "spammer posts too fast; retry in 7 s"
                r = await client.call_tool("blackboard_post", {"text": "STATUS: fine", "author": "a1"})
                assert not r.is_error and r.structured_content is not None
                assert r.structured_content["created"] == 1700000000.0

    run(go)


def test_http_tools_without_a_node_or_a_blackboard() -> None:
    port = free_port()  # nothing listens there
    node = FakeNode(blackboard=False)

    async def go() -> None:
        tools = HttpTools(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}")
        for call in (tools.feed(None, None, None, 5), tools.models(), tools.status()):
            with pytest.raises(MeshLLMError) as refused:
                await call
            message = str(refused.value)
            assert f"no mesh-llm node is running at http://127.0.0.1:{port}" in message
            assert "mesh-llm --client --blackboard" in message
        async with served(node.app) as base:
            with pytest.raises(BlackboardError, match="has no blackboard"):
                await HttpTools(base, base).post("STATUS: x", None, None)

    run(go)


# ---------------------------------------------------------------------------------------------
# (d) local.py: the runtime file, attaching, starting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    return int(proc.stdout)


def test_runtime_file_round_trip(tmp_path: Path) -> None:
    info = RuntimeInfo(pid=os.getpid(), node_id="aa", api_url="http://127.0.0.1:9337/v1", console_url="http://x:3")
    assert read_runtime(tmp_path) is None
    write_runtime(tmp_path / "home", info)
    assert read_runtime(tmp_path / "home") == info
    assert info.mcp_url == "http://127.0.0.1:9337/mcp"
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["node.json"]  # no temp file left behind
    remove_runtime(tmp_path / "home", pid=os.getpid() + 1)  # someone else's: kept
    assert read_runtime(tmp_path / "home") == info
    remove_runtime(tmp_path / "home")
    assert not (tmp_path / "home" / "node.json").exists()
    remove_runtime(tmp_path / "home")  # nothing there: fine


def test_stale_runtime_file_is_ignored(tmp_path: Path) -> None:
    write_runtime(tmp_path, RuntimeInfo(pid=dead_pid(), node_id="aa", api_url="http://a:1", console_url="http://a:2"))
    assert (tmp_path / "node.json").exists() and read_runtime(tmp_path) is None


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{",
        "[]",
        '{"pid": 1}',
        '{"pid": "1", "node_id": "a", "api_url": "http://a", "console_url": "http://b"}',
        '{"pid": true, "node_id": "a", "api_url": "http://a", "console_url": "http://b"}',
        '{"pid": PID, "node_id": "", "api_url": "http://a", "console_url": "http://b"}',
        '{"pid": PID, "node_id": "a", "api_url": "ftp://a", "console_url": "http://b"}',
        "\xff\xfe",
    ],
)
def test_malformed_runtime_file_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / "node.json").write_bytes(content.replace("PID", str(os.getpid())).encode("latin-1"))
    assert read_runtime(tmp_path) is None


def test_attaches_to_the_node_that_answers_as_itself(tmp_path: Path) -> None:
    node = FakeNode()

    async def go() -> None:
        async with served(node.app) as base:
            info = RuntimeInfo(pid=os.getpid(), node_id=FakeNode.NODE_ID, api_url=base + "/v1", console_url=base)
            write_runtime(tmp_path, info)
            assert await find_running(tmp_path) == info
            async with attach_or_start(tmp_path, [], None) as attached:
                assert attached == info
            write_runtime(tmp_path, RuntimeInfo(os.getpid(), "someone-else", base, base))  # a recycled pid
            assert await find_running(tmp_path) is None

    run(go)


FAKE_NODE = """
import json, os, signal, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
args = sys.argv[1:]
port = int(args[args.index("--console-port") + 1])
if "--stubborn" in args:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "--crash" in args:
    print("fake node: cannot start", flush=True)
    sys.exit(3)
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"node_id": "fa4e", "home": os.environ["MESH_LLM_HOME"], "args": args}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture
def fake_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Make attach_or_start start a fake node script (same flags) instead of the real node."""
    script = tmp_path / "fake_node.py"
    script.write_text(textwrap.dedent(FAKE_NODE))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    # A busy "default" API port: the node must then get other ports.
    monkeypatch.setattr(local, "DEFAULT_API_PORT", busy.getsockname()[1])
    monkeypatch.setattr(local, "STOP_TIMEOUT_S", 1.0)

    def configure(*extra: str) -> None:
        real = local.node_command

        def command(join: list[str], name: str | None, api_port: int, console_port: int) -> list[str]:
            args = real(join, name, api_port, console_port)
            return [sys.executable, str(script), *args[args.index("mesh_mcp.cli") + 1 :], *extra]

        monkeypatch.setattr(local, "node_command", command)

    yield configure
    busy.close()


def test_starts_a_node_and_stops_it(tmp_path: Path, fake_node: Callable[..., None]) -> None:
    fake_node()
    home = tmp_path / "home"

    async def go() -> int:
        async with attach_or_start(home, ["TOKEN-1"], "laptop") as info:
            status = await local.node_status(info.console_url)
            assert status is not None and status["home"] == str(home)
            args = status["args"]
            assert args[:2] == ["--client", "--blackboard"]
            assert args[args.index("--join") + 1] == "TOKEN-1" and args[args.index("--name") + 1] == "laptop"
            assert args[args.index("--port") + 1] != str(local.DEFAULT_API_PORT)  # the default was busy
            assert info.node_id == "fa4e" and local.pid_alive(info.pid)
            return info.pid

    pid = anyio.run(go)
    assert not local.pid_alive(pid)
    log = (home / "logs" / "mcp-node.log").read_text()
    assert "TOKEN-1" not in log  # invite tokens stay out of the log


def test_a_started_node_is_stopped_on_cancellation_and_killed_if_stubborn(
    tmp_path: Path, fake_node: Callable[..., None]
) -> None:
    fake_node("--stubborn")
    pids: list[int] = []

    async def go() -> None:
        with anyio.move_on_after(30) as scope:
            async with attach_or_start(tmp_path, [], None) as info:
                pids.append(info.pid)
                scope.cancel()
                await anyio.sleep(30)
        assert scope.cancelled_caught

    run(go)
    assert pids and not local.pid_alive(pids[0])


def test_a_node_that_fails_to_start_is_reported_with_its_log(tmp_path: Path, fake_node: Callable[..., None]) -> None:
    fake_node("--crash")

    async def go() -> None:
        with pytest.raises(MeshLLMError, match=r"exited \(3\) before it was ready(.|\n)*fake node: cannot start"):
            async with attach_or_start(tmp_path, [], None):
                pytest.fail("should not start")

    run(go)


# ---------------------------------------------------------------------------------------------
# stdio: `run_stdio` in a subprocess, through the SDK's stdio client


def stdio_server_params(home: Path, *args: str) -> StdioServerParameters:
    """How an MCP host launches the stdio server for `home` (here: `run_stdio` directly; the end-to-end
    test can pass `mesh_mcp.cli blackboard --mcp` instead)."""
    code = "import sys, anyio; from pathlib import Path; from mesh_mcp.mcp.stdio import run_stdio; "
    code += "anyio.run(run_stdio, Path(sys.argv[1]), sys.argv[2:])"
    return StdioServerParameters(
        command=sys.executable, args=["-c", code, str(home), *args], env={"MESH_LLM_HOME": str(home)}, cwd=REPO
    )


def test_stdio_server_attached_to_a_running_node(tmp_path: Path) -> None:
    node = FakeNode()
    errlog = tmp_path / "stderr.log"

    async def go() -> None:
        async with served(node.app) as base:
            write_runtime(tmp_path, RuntimeInfo(os.getpid(), FakeNode.NODE_ID, base + "/v1", base))
            with open(errlog, "w") as err:
                from mcp.client.stdio import stdio_client

                async with Client(stdio_client(stdio_server_params(tmp_path), errlog=err)) as client:
                    assert {t.name for t in (await client.list_tools()).tools} == TOOLS
                    r = await client.call_tool("blackboard_post", {"text": "STATUS: over stdio", "author": "cli"})
                    assert not r.is_error, text_of(r)
                    r = await client.call_tool("blackboard_search", {"query": "stdio"})
                    assert r.structured_content is not None and r.structured_content["count"] == 1
                    r = await client.call_tool("mesh_ask", {"question": "2+2?"})
                    assert r.structured_content == {"model": "Small", "answer": "4"}
        assert node.posts[0]["text"] == "STATUS: over stdio"

    run(go)
    assert "Traceback" not in errlog.read_text()


def test_pid_alive() -> None:
    assert local.pid_alive(os.getpid())
    assert not local.pid_alive(dead_pid())

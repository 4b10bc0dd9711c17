"""Hostile request bodies on every /v1 route (issue 12, item 4): each is refused with a 400 in the route's API shape
(OpenAI `{"error": {...}}`, Anthropic `{"type": "error", ...}`) in bounded time, never a 500, and never reaches the
model's server — a real socket standing in for llama-server counts what arrives.

The proxy app runs in process (the component under test); tests/test_api_correctness.py sends the deepest case to a
real node.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest

from mesh_mcp.api.app import build_api
from mesh_mcp.state import NodeState

ROUTES = {
    "/v1/chat/completions": "openai",
    "/v1/completions": "openai",
    "/v1/embeddings": "openai",
    "/v1/responses": "openai",
    "/v1/messages": "anthropic",
    "/v1/messages/count_tokens": "anthropic",
}
USER = [{"role": "user", "content": "hi"}]


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * depth + close * depth


def deep_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


HOSTILE: list[tuple[str, bytes | Callable[[str], bytes], str]] = [
    ("10 000-deep array", b'{"model": "m", "messages": ' + nested(10_000) + b"}", "nests deeper than"),
    ("100 000-deep array", b'{"model": "m", "messages": ' + nested(100_000) + b"}", "nests deeper than"),
    ("10 000-deep object", deep_object(10_000), "nests deeper than"),
    ("10 000-deep top-level array", nested(10_000), "nests deeper than"),
    ("65-deep array (just past the bound)", b'{"model": "m", "x": ' + nested(65) + b"}", "nests deeper than"),
    ("5000-digit integer", b'{"model": "m", "max_tokens": ' + b"9" * 5000 + b"}", "too many digits"),
    ("not an object", b"[1, 2, 3]", "must be a JSON object"),
    ("not JSON", b"{'model': 'm'}", "not valid JSON"),
    ("not UTF-8", b'{"model": "\xff\xfe"}', "not UTF-8"),
    ("empty body", b"", "not valid JSON"),
    ("model not a string", b'{"model": {"$gt": ""}}', "'model' must be a string"),
    ("model of 100 000 characters", b'{"model": "' + b"m" * 100_000 + b'"}', "at most 256 characters"),
]


class Upstream:
    """A socket where llama-server would be: answers 200 with a fixed body and counts the requests it got."""

    def __init__(self) -> None:
        self.requests = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]) if b"content-length:" in head else 0
            await reader.readexactly(length)
            self.requests += 1
            body = b'{"ok": true}'
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            await writer.wait_closed()


@asynccontextmanager
async def api_with_upstream(**models: dict[str, Any]) -> AsyncIterator[tuple[httpx2.AsyncClient, Upstream]]:
    upstream = Upstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    node = NodeState(node_id="n1", name="t", version="0", api_url="", console_url="")
    for name, facts in (models or {"m": {}}).items():
        node.update_model(name, state="serving", upstream=f"http://127.0.0.1:{upstream.port}", **facts)
    try:
        transport = httpx2.ASGITransport(app=build_api(node))
        async with httpx2.AsyncClient(transport=transport, base_url="http://node", timeout=60) as client:
            yield client, upstream
    finally:
        server.close()
        await server.wait_closed()


def assert_api_error(r: httpx2.Response, flavor: str, words: str) -> None:
    assert r.status_code == 400, r.text[:300]
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    if flavor == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    else:
        assert body["error"]["type"] == "invalid_request_error", body
    assert words in body["error"]["message"], body["error"]["message"][:300]


@pytest.mark.parametrize(("case", "body", "words"), HOSTILE, ids=[c for c, _, _ in HOSTILE])
def test_hostile_bodies_are_400_on_every_route_in_bounded_time(case: str, body: bytes, words: str) -> None:
    async def go() -> None:
        async with api_with_upstream() as (client, upstream):
            for path, flavor in ROUTES.items():
                started = time.monotonic()
                r = await client.post(path, content=body, headers={"content-type": "application/json"})
                assert time.monotonic() - started < 20, f"{path}: {case} took too long"  # loose: no hang
                assert_api_error(r, flavor, words)
            assert upstream.requests == 0

    anyio.run(go)


def test_a_lone_surrogate_echoed_back_is_escaped_not_a_500() -> None:
    # "\ud800" is valid JSON but cannot be UTF-8: an error message that echoes it must still encode.
    async def go() -> None:
        async with api_with_upstream() as (client, upstream):
            for path in ROUTES:
                r = await client.post(path, content=b'{"model": "\\ud800", "messages": []}')
                assert r.status_code == 404 and "\\ud800" in r.text, r.text[:200]
            r = await client.post(
                "/v1/chat/completions", content=b'{"model": "m", "messages": [{"role": "\\ud800", "content": "x"}]}'
            )
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
            assert upstream.requests == 0

    anyio.run(go)


VALUE_CASES = [
    ("/v1/chat/completions", {"messages": USER, "temperature": float("inf")}, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 10**30}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "n": 10**9}, "n"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["s"] * 10_000}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 5 + [7]}, "messages[5]"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -(10**30)}, "max_tokens"),
    ("/v1/responses", {"input": "x", "top_p": -1}, "top_p"),
    ("/v1/messages", {"max_tokens": 1, "messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
    ("/v1/messages", {"max_tokens": "1", "messages": USER}, "max_tokens"),
    ("/v1/messages", {"max_tokens": 1, "messages": USER, "stop_sequences": ["x" * 100_000]}, "stop_sequences"),
    ("/v1/messages/count_tokens", {"messages": {"role": "user"}}, "messages"),
]


@pytest.mark.parametrize(("path", "fields", "param"), VALUE_CASES)
def test_hostile_values_are_400_naming_the_field(path: str, fields: dict[str, Any], param: str) -> None:
    async def go() -> None:
        async with api_with_upstream() as (client, upstream):
            body = json.dumps({"model": "m", **fields}).encode()
            r = await client.post(path, content=body, headers={"content-type": "application/json"})
            assert_api_error(r, ROUTES[path], param.split("[")[0])
            assert r.json()["error"].get("param") == param
            assert upstream.requests == 0

    anyio.run(go)


def test_a_forced_tool_call_on_a_model_without_tools_never_reaches_it() -> None:
    async def go() -> None:
        async with api_with_upstream(m={"tools": False}, coder={"tools": True}) as (client, upstream):
            r = await client.post(
                "/v1/chat/completions", json={"model": "m", "messages": USER, "tool_choice": "required"}
            )
            assert_api_error(r, "openai", "cannot call tools")
            r = await client.post(
                "/v1/messages",
                json={"model": "m", "max_tokens": 4, "messages": USER, "tool_choice": {"type": "any"}},
            )
            assert_api_error(r, "anthropic", "cannot call tools")
            assert upstream.requests == 0
            # A model that can call tools takes it.
            r = await client.post(
                "/v1/chat/completions", json={"model": "coder", "messages": USER, "tool_choice": "required"}
            )
            assert r.status_code == 200 and upstream.requests == 1

    anyio.run(go)


def test_the_largest_legal_request_still_passes() -> None:
    # Bounds that refuse the hostile must not refuse the legitimate: 64 levels, a long prompt, many messages.
    async def go() -> None:
        async with api_with_upstream() as (client, upstream):
            messages = [{"role": "user", "content": "x" * 1000}] * 2000 + [{"role": "user", "content": "y" * 4_000_000}]
            r = await client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "x": [[[[1]]]]})
            assert r.status_code == 200, r.text[:300]
            body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "x": ' + nested(60) + b"}"
            r = await client.post("/v1/chat/completions", content=body)
            assert r.status_code == 200, r.text[:300]
            assert upstream.requests == 2

    anyio.run(go)

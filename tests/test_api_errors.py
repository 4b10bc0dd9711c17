"""The HTTP error module and each app's one error boundary: the shapes built in `api/errors.py`, an `HttpError` or
a project error raised by a handler answered in the app's shape, and the in-stream error event. In process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from blackboard.board import Board
from blackboard.post import MAX_TEXT_BYTES
from blackboard.scrub import default_scrubber
from blackboard.store import Store
from mesh_mcp.api.app import build_api
from mesh_mcp.api.console import build_console
from mesh_mcp.api.errors import HttpError, error_body, sse_error_event
from mesh_mcp.api.guard import CONSOLE, Policy
from mesh_mcp.api.middleware import HttpGuard
from mesh_mcp.errors import MeshLLMError
from mesh_mcp.state import NodeState

USER = [{"role": "user", "content": "hi"}]


def make_node() -> NodeState:
    return NodeState(node_id="n1", name="t", version="0", api_url="", console_url="")


@pytest.mark.parametrize(
    ("flavor", "status", "expected"),
    [
        (
            "openai",
            404,
            {"error": {"message": "m", "type": "invalid_request_error", "param": "p", "code": "c", "more": 1}},
        ),
        ("openai", 503, {"error": {"message": "m", "type": "server_error", "param": "p", "code": "c", "more": 1}}),
        (
            "anthropic",
            404,
            {"type": "error", "error": {"type": "not_found_error", "message": "m", "param": "p", "more": 1}},
        ),
        ("anthropic", 418, {"type": "error", "error": {"type": "api_error", "message": "m", "param": "p", "more": 1}}),
        ("plain", 409, {"error": {"message": "m", "param": "p", "more": 1}}),
    ],
)
def test_each_shape_is_built_in_one_place(flavor: Any, status: int, expected: dict[str, Any]) -> None:
    assert error_body(flavor, status, "m", "c", param="p", more=1) == expected
    response = HttpError(status, "m", "c", {"Retry-After": "3"}, param="p", more=1).response(flavor)
    assert response.status_code == status and json.loads(response.body) == expected
    assert response.headers["retry-after"] == "3" and response.headers["content-type"] == "application/json"


def test_the_in_stream_error_event_is_each_apis_own() -> None:
    anthropic = sse_error_event("anthropic", "broke", "upstream_failed")
    assert anthropic.startswith(b"event: error\ndata: ") and anthropic.endswith(b"\n\n")
    assert json.loads(anthropic.split(b"data: ", 1)[1]) == error_body("anthropic", 500, "broke")
    openai = sse_error_event("openai", "broke", "upstream_failed")
    assert openai.startswith(b"data: ") and openai.endswith(b"\n\n")
    assert json.loads(openai.removeprefix(b"data: "))["error"]["code"] == "upstream_failed"


def test_a_message_whose_server_breaks_off_is_502_in_anthropic_shape() -> None:
    """A non-streaming /v1/messages answer is read whole before it is rewritten: an upstream that dies before its
    end is answered 502 by the app's boundary (nothing was sent yet), in Anthropic's shape."""

    async def go() -> httpx2.Response:
        async def dies_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"id"')
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(dies_mid_body, "127.0.0.1", 0)
        node = make_node()
        node.update_model("m", state="serving", upstream=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            transport = httpx2.ASGITransport(app=build_api(node))
            async with httpx2.AsyncClient(transport=transport, base_url="http://node") as c:
                return await c.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": USER})
        finally:
            server.close()
            await server.wait_closed()

    r = anyio.run(go)
    assert r.status_code == 502
    assert r.json() == {"type": "error", "error": {"type": "api_error", "message": r.json()["error"]["message"]}}
    assert "failed mid-answer" in r.json()["error"]["message"]


class Controls:
    """The console's `Controls` (the node is the real one): `drop` of a model this node does not serve fails as the
    node's does, with a `MeshLLMError`."""

    def drop(self, requested: str) -> str:
        raise MeshLLMError(f"this node does not serve {requested!r}")

    def rotate_key(self, evict: Sequence[str] = (), add_owners: Sequence[str] = ()) -> str:
        return "token"


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Board]:
    key = Ed25519PrivateKey.generate()
    scrubber = default_scrubber()
    with Store(tmp_path / "blackboard.db") as store:
        yield Board(store, key, "0123456789abcdef", "me", lambda: scrubber, clock=lambda: 1_700_000_000.0)


def console(board: Board | None, *requests: tuple[str, str, Any]) -> list[httpx2.Response]:
    """`requests` (method, path, JSON body) in order, to a guarded console, from this machine."""

    async def go() -> list[httpx2.Response]:
        app = HttpGuard(build_console(make_node(), Controls(), board), Policy(), CONSOLE)
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            return [await c.request(method, path, json=body) for method, path, body in requests]

    return anyio.run(go)


def test_console_answers_each_project_error_with_its_status(board: Board) -> None:
    posts = [("POST", "/api/blackboard", {"text": f"post {i}", "author": "alice"}) for i in range(21)]
    *accepted, limited, too_long, failed, unknown = console(
        board,
        *posts,
        ("POST", "/api/blackboard", {"text": "x" * (MAX_TEXT_BYTES + 1), "author": "bob"}),
        ("POST", "/api/drop", {"model": "nope"}),
        ("POST", "/api/nothing", {}),
    )
    assert [r.status_code for r in accepted] == [201] * 20
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert too_long.status_code == 413 and str(MAX_TEXT_BYTES) in too_long.json()["error"]["message"]
    assert failed.status_code == 409 and failed.json() == {"error": {"message": "this node does not serve 'nope'"}}
    assert unknown.status_code == 404 and unknown.json() == {"error": {"message": "no such control"}}


def test_console_without_a_blackboard_says_how_to_get_one() -> None:
    (read,) = console(None, ("GET", "/api/blackboard", None))
    assert read.status_code == 404 and "--blackboard" in read.json()["error"]["message"]

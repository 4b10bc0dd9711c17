"""The API's answers to requests that never reach a llama-server: in process, no sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import httpx2
import pytest

from mesh_mcp.api.app import build_api
from mesh_mcp.api.rewrite import anthropic_error_body
from mesh_mcp.state import NodeState
from mesh_mcp.testing import FactsDirectory, TwinDirectory


def make_node(**models: str) -> NodeState:
    s = NodeState(node_id="n1", name="t", version="0", api_url="", console_url="")
    for name, state in models.items():
        s.update_model(name, state=state, detail="llama-server exited 1" if state == "failed" else "")
    return s


def post(node: NodeState, path: str, body: bytes | None = None, json: Any = None, **kw: Any) -> httpx2.Response:
    async def go() -> httpx2.Response:
        transport = httpx2.ASGITransport(app=build_api(node, max_body=kw.pop("max_body", 1 << 20)))
        async with httpx2.AsyncClient(transport=transport, base_url="http://node") as c:
            return await c.post(path, content=body, json=json, **kw)

    return anyio.run(go)


def get(node: NodeState, path: str) -> httpx2.Response:
    async def go() -> httpx2.Response:
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=build_api(node)), base_url="http://n") as c:
            return await c.get(path)

    return anyio.run(go)


CHAT = "/v1/chat/completions"


def test_loading_model_is_503_with_retry_after() -> None:
    r = post(make_node(m="loading"), CHAT, json={"model": "m", "messages": []})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "model_loading"


def test_downloading_model_is_503_too() -> None:
    r = post(make_node(m="downloading"), CHAT, json={"model": "m", "messages": []})
    assert r.status_code == 503 and "downloading" in r.json()["error"]["message"]


def test_failed_model_says_why() -> None:
    r = post(make_node(m="failed"), CHAT, json={"model": "m", "messages": []})
    assert r.status_code == 503
    assert "exited 1" in r.json()["error"]["message"]


def test_unknown_model_lists_available() -> None:
    r = post(make_node(a="serving", b="loading"), CHAT, json={"model": "zzz", "messages": []})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["available"] == ["a", "b"]


def test_no_models_at_all() -> None:
    r = post(make_node(), CHAT, json={"model": "x"})
    assert r.status_code == 404 and "serves a model yet" in r.json()["error"]["message"]


def test_anthropic_errors_use_anthropic_shape() -> None:
    r = post(make_node(a="serving"), "/v1/messages", json={"model": "zzz", "max_tokens": 1, "messages": []})
    assert r.status_code == 404
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{oops", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"model": 7}', "'model' must be a string"),
        (b"\xff\xfe\x00", "not UTF-8"),
    ],
)
def test_malformed_requests_are_400(body: bytes, message: str) -> None:
    r = post(make_node(m="serving"), CHAT, body=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_body_over_the_limit_is_413_by_header_and_by_stream() -> None:
    node = make_node(m="serving")
    r = post(node, CHAT, body=b"x" * 2000, max_body=1000)
    assert r.status_code == 413

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(5):
            yield b"x" * 400  # no Content-Length: caught while reading

    r = post(node, CHAT, body=chunks(), max_body=1000)  # type: ignore[arg-type]
    assert r.status_code == 413


def test_unknown_endpoint_and_wrong_method() -> None:
    node = make_node(m="serving")
    assert get(node, "/v1/nothing").status_code == 404
    assert get(node, CHAT).status_code == 405


def test_models_endpoint_shows_states() -> None:
    data = get(make_node(a="serving", b="loading"), "/v1/models").json()["data"]
    assert [(m["id"], m["state"], m["object"]) for m in data] == [
        ("a", "serving", "model"),
        ("b", "loading", "model"),
        ("auto", "auto", "model"),  # the pseudo-model (api/auto.py), last: `data[0]` is a real one
    ]
    assert get(make_node(a="serving"), "/v1/models/a").json()["id"] == "a"
    assert get(make_node(a="serving"), "/v1/models/b").status_code == 404


def test_models_show_tool_capability_and_size_once_known() -> None:
    node = make_node(chat="serving", emb="loading")
    node.update_model("chat", tools=False, size_bytes=98_362_432)

    async def go() -> httpx2.Response:
        transport = httpx2.ASGITransport(app=build_api(node, FactsDirectory()))
        async with httpx2.AsyncClient(transport=transport, base_url="http://n") as c:
            return await c.get("/v1/models")

    data = {m["id"]: m for m in anyio.run(go).json()["data"]}
    assert data["chat"]["capabilities"] == {"tools": False} and data["chat"]["size_bytes"] == 98_362_432
    assert data["emb"]["capabilities"] == {} and "size_bytes" not in data["emb"]
    assert data["coder"]["capabilities"] == {"tools": True} and data["coder"]["size_bytes"] == 1_117_320_768
    assert data["coder"]["nodes"] == ["n2", "n3", "n4"] and data["coder"]["state"] == "serving"
    assert data["coder"]["context_length"] == 8192
    assert data["old"]["capabilities"] == {} and "size_bytes" not in data["old"] and "context_length" not in data["old"]


def test_backend_gone_between_check_and_request_is_503() -> None:
    node = make_node(m="serving")
    node.update_model("m", upstream="http://127.0.0.1:9")  # nothing listens on the discard port
    r = post(node, CHAT, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"


def post_via(node: NodeState, directory: TwinDirectory, body: dict[str, Any]) -> httpx2.Response:
    async def go() -> httpx2.Response:
        transport = httpx2.ASGITransport(app=build_api(node, directory))
        async with httpx2.AsyncClient(transport=transport, base_url="http://node") as c:
            return await c.post(CHAT, json=body)

    return anyio.run(go)


def test_a_server_that_fails_before_answering_is_skipped_for_the_next() -> None:
    mesh = TwinDirectory({"n-down": None, "n-up": b'{"ok": true}'})
    r = post_via(make_node(), mesh, {"model": "remote-model", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert mesh.tried == ["n-down", "n-up"]  # fewest in flight first, then the fallback


def test_every_server_down_is_503() -> None:
    mesh = TwinDirectory({"a": None, "b": None})
    r = post_via(make_node(), mesh, {"model": "remote-model", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"


def test_routed_requests_are_never_forwarded_again() -> None:
    mesh = TwinDirectory({"n1": b"{}"})

    async def go() -> httpx2.Response:
        transport = httpx2.ASGITransport(app=build_api(make_node(), mesh))
        async with httpx2.AsyncClient(transport=transport, base_url="http://node") as c:
            return await c.post(CHAT, json={"model": "remote-model"}, headers={"x-mesh-llm-routed": "1"})

    r = anyio.run(go)
    assert r.status_code == 404 and mesh.tried == []


def test_upstream_failing_mid_stream_ends_the_sse_stream_with_an_error_event() -> None:
    async def go() -> httpx2.Response:
        async def broken_llama_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                b'10\r\ndata: {"a": 1}\n\n\r\n'
            )
            await writer.drain()
            writer.close()  # dies mid-stream

        server = await asyncio.start_server(broken_llama_server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        node = make_node(m="serving")
        node.update_model("m", upstream=f"http://127.0.0.1:{port}")
        try:
            transport = httpx2.ASGITransport(app=build_api(node))
            async with httpx2.AsyncClient(transport=transport, base_url="http://node") as c:
                return await c.post(
                    CHAT, json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                )
        finally:
            server.close()
            await server.wait_closed()

    r = anyio.run(go)
    events = [line for line in r.text.split("\n\n") if line]
    assert events[0] == 'data: {"a": 1}'
    assert "failed mid-stream" in events[-1] and events[-1].startswith("data: ")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            b'{"error":{"code":400,"message":"request (20310 tokens) exceeds the available context size",'
            b'"type":"exceed_context_size_error"}}',
            "prompt is too long: request (20310 tokens) exceeds",
        ),
        (b'{"error":"bad thing"}', "bad thing"),
        (b'{"message":"plain"}', "plain"),
        (b"not json at all", "not json at all"),
        (b"", "upstream error 400"),
    ],
)
def test_upstream_errors_are_rewritten_in_anthropic_shape(raw: bytes, message: str) -> None:
    body = json.loads(anthropic_error_body(400, raw))
    assert body == {"type": "error", "error": {"type": "invalid_request_error", "message": body["error"]["message"]}}
    assert body["error"]["message"].startswith(message)


def test_an_anthropic_shaped_error_passes_unchanged() -> None:
    raw = b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}'
    assert anthropic_error_body(529, raw) == raw

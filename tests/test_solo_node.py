"""A real node serving SmolLM2 solo through the real llama-server, driven by the official SDKs.

One node is shared by the tests of this module (starting it costs seconds); tests that kill
or stop things start their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

from tests.conftest import SMOLLM
from tests.harness import NodeProcess, free_port, pid_alive, port_is_free, serving_node

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node(llama: object, smollm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with serving_node(tmp_path_factory.mktemp("solo"), SMOLLM, smollm.parent) as n:
        yield n


def oa(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.api + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(node: NodeProcess) -> None:
    models = oa(node).models.list()
    assert [m.id for m in models.data] == [SMOLLM, "auto"]


def test_chat_completion(node: NodeProcess) -> None:
    resp = oa(node).chat.completions.create(
        model=SMOLLM, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0
    )
    assert resp.choices[0].message.content
    assert resp.usage is not None and resp.usage.completion_tokens > 0


def test_chat_completion_streams_token_by_token(node: NodeProcess) -> None:
    stream = oa(node).chat.completions.create(
        model=SMOLLM,
        messages=[{"role": "user", "content": "Count from one to ten in words."}],
        max_tokens=32,
        temperature=0,
        stream=True,
    )
    arrivals, text = [], ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
            text += chunk.choices[0].delta.content
    assert len(arrivals) >= 10, "expected many separate content chunks"
    assert text.strip()
    # Chunks arrive spread over time, not in one buffered burst at the end.
    assert arrivals[-1] - arrivals[0] > 0.01


def test_fuzzy_model_name_selects_the_model(node: NodeProcess) -> None:
    resp = oa(node).chat.completions.create(
        model=SMOLLM.lower(), messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert resp.choices[0].message.content is not None


def test_completions(node: NodeProcess) -> None:
    resp = oa(node).completions.create(model=SMOLLM, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert resp.choices[0].text


def test_tools_are_passed_through(node: NodeProcess) -> None:
    # SmolLM2's chat template has no tool syntax, so the model answers in text; what this checks is
    # that the proxy forwards `tools` untouched and llama-server accepts them. (A model whose
    # template has tool calls, Qwen2.5-Coder, comes with the draft/target work.)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    resp = oa(node).chat.completions.create(
        model=SMOLLM,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,  # type: ignore[arg-type]
        max_tokens=8,
    )
    assert resp.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_structured_output_passes_through(node: NodeProcess) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    resp = oa(node).chat.completions.create(
        model=SMOLLM,
        messages=[{"role": "user", "content": "Is it sunny in Paris? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}},
        max_tokens=48,
        temperature=0,
    )
    data = json.loads(resp.choices[0].message.content or "")
    assert set(data) == {"city", "sunny"} and isinstance(data["sunny"], bool)


def test_anthropic_messages(node: NodeProcess) -> None:
    client = anthropic.Anthropic(base_url=node.api, api_key="unused", max_retries=0)
    msg = client.messages.create(model=SMOLLM, max_tokens=16, messages=[{"role": "user", "content": "Say hello."}])
    assert msg.role == "assistant"
    assert msg.content and msg.content[0].type == "text"


def test_anthropic_messages_stream(node: NodeProcess) -> None:
    client = anthropic.Anthropic(base_url=node.api, api_key="unused", max_retries=0)
    pieces = []
    with client.messages.stream(
        model=SMOLLM, max_tokens=24, messages=[{"role": "user", "content": "Tell me a story."}]
    ) as stream:
        for text in stream.text_stream:
            pieces.append(text)
        final = stream.get_final_message()
    assert len(pieces) >= 5
    assert final.stop_reason in ("max_tokens", "end_turn")


def test_llama_server_errors_reach_anthropic_clients_in_anthropic_shape(node: NodeProcess) -> None:
    """llama-server answers /v1/messages errors in OpenAI's shape; the node rewrites them (here: a prompt longer than
    the whole context: 2048 × 4 slots of unified KV = SmolLM2's 8192 training context) so the SDK raises its typed
    error with llama-server's message."""
    client = anthropic.Anthropic(base_url=node.api, api_key="unused", max_retries=0)
    long = "word " * 9000
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=SMOLLM, max_tokens=4, messages=[{"role": "user", "content": long}])
    body = err.value.body
    assert isinstance(body, dict) and body["type"] == "error", body
    assert body["error"]["type"] == "invalid_request_error" and "context" in body["error"]["message"], body
    r = httpx2.post(
        node.api + "/v1/chat/completions", json={"model": SMOLLM, "messages": [{"role": "user", "content": long}]}
    )
    assert r.status_code == 400 and "type" not in r.json(), "OpenAI clients keep llama-server's OpenAI shape"
    entry = httpx2.get(node.api + "/v1/models").json()["data"][0]
    assert entry["context_length"] == 8192, entry  # what one request may hold, as the node publishes it


def test_unknown_model_is_404_listing_available(node: NodeProcess) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        oa(node).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    body = err.value.body
    assert isinstance(body, dict)
    assert "no-such-model" in body["message"]
    assert body["available"] == [SMOLLM]


def test_unknown_model_anthropic_error_shape(node: NodeProcess) -> None:
    client = anthropic.Anthropic(base_url=node.api, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="nope", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert "nope" in str(err.value)


def test_malformed_json_is_400(node: NodeProcess) -> None:
    r = httpx2.post(
        node.api + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]


def test_oversized_body_is_413(node: NodeProcess) -> None:
    big = b'{"model": "x", "pad": "' + b"a" * (33 << 20) + b'"}'
    r = httpx2.post(node.api + "/v1/chat/completions", content=big, timeout=60)
    assert r.status_code == 413


def test_embeddings_on_a_generation_model_is_a_clear_error(node: NodeProcess) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oa(node).embeddings.create(model=SMOLLM, input="hello")
    assert "does not serve embeddings" in str(err.value)


def test_node_survives_bad_input_and_keeps_serving(node: NodeProcess) -> None:
    for body in (
        b"",
        b"[]",
        b'{"model": 5}',
        b"\xff\xfe",
        b'{"messages": "nope", "model": "' + SMOLLM.encode() + b'"}',
    ):
        r = httpx2.post(node.api + "/v1/chat/completions", content=body)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
    test_chat_completion(node)


def test_client_disconnect_mid_stream_cancels_generation(node: NodeProcess) -> None:
    log = next((node.home / "logs").glob("llama-server-*.log"))
    mark = len(log.read_text())
    with httpx2.stream(
        "POST",
        node.api + "/v1/chat/completions",
        json={
            "model": SMOLLM,
            "messages": [{"role": "user", "content": "Write a long essay."}],
            "max_tokens": 2000,
            "ignore_eos": True,
            "stream": True,
        },
        timeout=30,
    ) as r:
        for _ in r.iter_raw():
            break  # read one chunk, then hang up
    # llama-server cancelled that generation instead of producing all 2000 tokens
    deadline = time.monotonic() + 30
    released: list[int] = []
    while not released and time.monotonic() < deadline:
        time.sleep(0.2)
        released = [int(n) for n in re.findall(r"stop processing: n_tokens = (\d+)", log.read_text()[mark:])]
    assert "cancel task" in log.read_text()[mark:]
    assert released and released[0] < 2000, released
    test_chat_completion(node)


def test_console_status_and_events(node: NodeProcess) -> None:
    status = node.status()
    assert status["node_id"] and status["version"]
    assert status["llama_cpp"]["backend"] in ("cpu", "cuda", "metal", "vulkan", "external")
    assert status["llama_cpp"]["version"]
    assert status["hardware"]["cpu_cores"] >= 1
    (model,) = status["models"]
    assert model["name"] == SMOLLM and model["state"] == "serving"
    assert model["architecture"] == "llama" and model["layers"] == 30
    assert "upstream" not in model
    with httpx2.stream("GET", node.console + "/api/events", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("data:"):
                break
    assert "event: status" in lines
    assert json.loads(lines[-1][5:])["node_id"] == status["node_id"]
    page = httpx2.get(node.console + "/")
    assert page.status_code == 200 and "/static/console.js" in page.text
    script = httpx2.get(node.console + "/static/console.js")  # the page's live updates come from /api/events
    assert script.status_code == 200 and "/api/events" in script.text


def test_llama_server_crash_is_restarted(llama: object, smollm: Path, spawn: Callable[..., NodeProcess]) -> None:
    n = spawn("--model", str(smollm), "--ctx-size", "1024", env={"MESH_LLM_MODELS": str(smollm.parent)})
    name = smollm.name.removesuffix(".gguf")
    first = n.wait_model_state(name, "serving", timeout=180)
    os.kill(first["pid"], signal.SIGKILL)
    n.wait_for("restart", lambda s: (m := n.model(s, name)) is not None and m["restarts"] >= 1, timeout=30)
    again = n.wait_model_state(name, "serving", timeout=120)
    assert again["pid"] != first["pid"]
    r = httpx2.post(
        n.api + "/v1/chat/completions",
        json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert "crashed" in n.log() and "restarting" in n.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_reaps_children_and_frees_ports(
    sig: int, llama: object, smollm: Path, spawn: Callable[..., NodeProcess]
) -> None:
    n = spawn("--model", str(smollm), "--ctx-size", "1024", env={"MESH_LLM_MODELS": str(smollm.parent)})
    model = n.wait_model_state(smollm.name.removesuffix(".gguf"), "serving", timeout=180)
    n.signal(sig)
    assert n.wait_exit(timeout=30) == 0
    assert not pid_alive(model["pid"])
    assert port_is_free(n.api_port) and port_is_free(n.console_port)


def test_corrupt_model_fails_with_a_clear_reason(
    llama: object, tmp_path: Path, spawn: Callable[..., NodeProcess]
) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    n = spawn("--model", str(bad))
    model = n.wait_model_state("broken", "failed", timeout=60)
    assert "broken.gguf" in model["detail"]
    r = httpx2.post(n.api + "/v1/chat/completions", json={"model": "broken", "messages": []})
    assert r.status_code == 503
    assert "failed" in r.json()["error"]["message"]


def test_no_arguments_prints_next_steps_and_serves_console(spawn: Callable[..., NodeProcess]) -> None:
    n = spawn()
    status = n.wait_for("console", lambda s: True, timeout=30)
    assert status["models"] == []
    assert "mesh-llm --model" in n.log()
    assert httpx2.get(n.api + "/v1/models").json()["data"] == []


def test_port_in_use_is_a_clear_error(spawn: Callable[..., NodeProcess]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        n = spawn("--port", str(port))
        assert n.wait_exit(timeout=30) == 1
        assert "already in use" in n.log()
    assert free_port()

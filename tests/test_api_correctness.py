"""API correctness as clients of the official APIs see it (issue 12): what OpenAI and Anthropic refuse is refused
(400 with `param`), Anthropic stop sequences, message ids and context overflows come back as Anthropic reports them,
and MCP argument errors are sentences.

Fast tests drive the pure parts (`api_checks`, `api_rewrite`) and the MCP server through the SDK's client; the slow
ones run a real node serving SmolLM2 (whose chat template cannot call tools) with a 512-token context, driven by
the official `openai` and `anthropic` SDKs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import anyio
import httpx2
import openai
import pytest
from mcp import Client

from mesh_mcp.api import rewrite as api_rewrite
from mesh_mcp.api.checks import ModelFacts, Rejection, check_request
from mesh_mcp.mcp.server import build_server
from tests.conftest import SMOLLM
from tests.harness import NodeProcess
from tests.test_mcp_server import TwinTools, text_of

USER = [{"role": "user", "content": "hi"}]
FACTS = ModelFacts("m", context=4096, tools=False)
CHAT, MESSAGES = "/v1/chat/completions", "/v1/messages"

# ---------------------------------------------------------------------------------------------
# api_checks: what is refused, with which param


REFUSED = [
    ("openai", CHAT, {"messages": []}, "messages"),
    ("openai", CHAT, {}, "messages"),
    ("openai", CHAT, {"messages": "hi"}, "messages"),
    ("openai", CHAT, {"messages": ["hi"]}, "messages[0]"),
    ("openai", CHAT, {"messages": [*USER, {"role": "bogus", "content": "x"}]}, "messages[1].role"),
    ("openai", CHAT, {"messages": USER, "temperature": -3}, "temperature"),
    ("openai", CHAT, {"messages": USER, "temperature": 2.5}, "temperature"),
    ("openai", CHAT, {"messages": USER, "temperature": "hot"}, "temperature"),
    ("openai", CHAT, {"messages": USER, "temperature": float("nan")}, "temperature"),
    ("openai", CHAT, {"messages": USER, "top_p": 1.5}, "top_p"),
    ("openai", CHAT, {"messages": USER, "max_tokens": 0}, "max_tokens"),
    ("openai", CHAT, {"messages": USER, "max_tokens": -1}, "max_tokens"),
    ("openai", CHAT, {"messages": USER, "max_tokens": 10**12}, "max_tokens"),
    ("openai", CHAT, {"messages": USER, "max_tokens": 1.5}, "max_tokens"),
    ("openai", CHAT, {"messages": USER, "max_tokens": True}, "max_tokens"),
    ("openai", CHAT, {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("openai", CHAT, {"messages": USER, "n": 0}, "n"),
    ("openai", CHAT, {"messages": USER, "n": 1000}, "n"),
    ("openai", CHAT, {"messages": USER, "stop": [str(i) for i in range(17)]}, "stop"),
    ("openai", CHAT, {"messages": USER, "stop": ["x" * 2000]}, "stop"),
    ("openai", CHAT, {"messages": USER, "stop": 5}, "stop"),
    ("openai", CHAT, {"messages": USER, "stream": "yes"}, "stream"),
    ("openai", CHAT, {"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ("openai", CHAT, {"messages": USER, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("openai", "/v1/completions", {"prompt": "x", "max_tokens": 10**12}, "max_tokens"),
    ("openai", "/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("openai", "/v1/responses", {"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ("openai", "/v1/responses", {"input": "x", "tool_choice": "required"}, "tool_choice"),
    ("anthropic", MESSAGES, {"max_tokens": 8, "messages": []}, "messages"),
    ("anthropic", MESSAGES, {"messages": USER}, "max_tokens"),
    ("anthropic", MESSAGES, {"max_tokens": -1, "messages": USER}, "max_tokens"),
    ("anthropic", MESSAGES, {"max_tokens": 8, "messages": [{"role": "bogus", "content": "x"}]}, "messages[0].role"),
    ("anthropic", MESSAGES, {"max_tokens": 8, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ("anthropic", MESSAGES, {"max_tokens": 8, "messages": USER, "temperature": 1.5}, "temperature"),
    ("anthropic", MESSAGES, {"max_tokens": 8, "messages": USER, "top_k": -1}, "top_k"),
    ("anthropic", MESSAGES, {"max_tokens": 8, "messages": USER, "stop_sequences": "x"}, "stop_sequences"),
    ("anthropic", MESSAGES, {"max_tokens": 8, "messages": USER, "tool_choice": {"type": "any"}}, "tool_choice"),
    (
        "anthropic",
        MESSAGES,
        {"max_tokens": 8, "messages": USER, "tool_choice": {"type": "tool", "name": "f"}},
        "tool_choice",
    ),
    ("anthropic", "/v1/messages/count_tokens", {"messages": []}, "messages"),
]


@pytest.mark.parametrize(("flavor", "path", "payload", "param"), REFUSED)
def test_requests_the_official_apis_refuse_are_400_naming_the_field(
    flavor: Any, path: str, payload: dict[str, Any], param: str
) -> None:
    rejection = check_request(payload, flavor, path, FACTS)
    assert isinstance(rejection, Rejection) and rejection.status == 400
    assert rejection.param == param
    assert rejection.message.startswith(param.split("[")[0]) or rejection.message.startswith(("'", "model"))


CLAUDE_CODE = {  # the fields Claude Code 2.1.197 sends (docs/ARCHITECTURE.md, "Coding agents")
    "model": "m",
    "max_tokens": 32000,  # more than the model's context: allowed, generation ends when the context is full
    "stream": True,
    "system": [{"type": "text", "text": "You are Claude Code", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": "hello"},
        {"role": "system", "content": "a reminder mid-conversation"},
        {"role": "user", "content": "go on"},
    ],
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "context_management": {"edits": []},
    "output_config": {"effort": "high"},
    "metadata": {"user_id": "u"},
    "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
    "tool_choice": {"type": "auto"},
    "temperature": 1,
}
ACCEPTED = [
    ("anthropic", MESSAGES, CLAUDE_CODE, FACTS),
    ("anthropic", MESSAGES, {**CLAUDE_CODE, "tool_choice": {"type": "any"}}, ModelFacts("m", tools=True)),
    ("anthropic", MESSAGES, {**CLAUDE_CODE, "tool_choice": {"type": "any"}}, ModelFacts("m")),  # not known yet
    ("anthropic", MESSAGES, {"max_tokens": 1, "messages": USER, "stop_sequences": ["a", "b"], "top_k": 0}, FACTS),
    ("anthropic", "/v1/messages/count_tokens", {"messages": USER, "tools": []}, FACTS),
    (
        "openai",
        CHAT,
        {
            "messages": [
                {"role": "developer", "content": "x"},
                {"role": "system", "content": "y"},
                *USER,
                {"role": "assistant", "content": None, "tool_calls": []},
                {"role": "tool", "content": "r", "tool_call_id": "1"},
                {"role": "function", "content": "r", "name": "f"},
            ],
            "temperature": 2,
            "top_p": 0,
            "max_tokens": None,
            "max_completion_tokens": 2**31 - 1,
            "n": 2,
            "stop": "END",
            "tool_choice": "auto",
            "response_format": {"type": "json_object"},
            "cache_prompt": True,  # a llama.cpp extension passes
        },
        FACTS,
    ),
    ("openai", CHAT, {"messages": USER, "tool_choice": "none"}, FACTS),
    ("openai", CHAT, {"messages": USER, "tool_choice": "required"}, ModelFacts("m", tools=True)),
    ("openai", "/v1/completions", {"prompt": "x", "stop": ["a", "b"], "max_tokens": 4}, FACTS),
    ("openai", "/v1/embeddings", {"input": "x"}, FACTS),
]


@pytest.mark.parametrize(("flavor", "path", "payload", "facts"), ACCEPTED)
def test_what_clients_legitimately_send_passes(flavor: Any, path: str, payload: dict[str, Any], facts: Any) -> None:
    assert check_request(payload, flavor, path, facts) is None


def test_an_absurd_max_tokens_is_answered_with_the_models_context() -> None:
    rejection = check_request({"messages": USER, "max_tokens": 10**12}, "openai", CHAT, FACTS)
    assert rejection is not None
    assert "between 1 and 2147483647" in rejection.message and "4096 tokens" in rejection.message


# ---------------------------------------------------------------------------------------------
# api_rewrite


def test_a_non_streaming_anthropic_message_gets_its_id_and_stop_sequence() -> None:
    upstream = {
        "id": "chatcmpl-abc",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "one, two"}],
        "stop_reason": "end_turn",
        "stop_sequence": "three",
    }
    out = json.loads(api_rewrite.anthropic_message(json.dumps(upstream).encode(), ("three",)))
    assert out["id"] == "msg_abc" and out["stop_reason"] == "stop_sequence" and out["stop_sequence"] == "three"
    assert out["content"] == upstream["content"]
    # A stop string of the chat template, not the client's: the model ended its turn.
    out = json.loads(api_rewrite.anthropic_message(json.dumps(upstream).encode(), ()))
    assert out["stop_reason"] == "end_turn" and out["stop_sequence"] is None
    # Idempotent: a peer's rewritten body passes a second hop unchanged.
    once = api_rewrite.anthropic_message(json.dumps(upstream).encode(), ("three",))
    assert api_rewrite.anthropic_message(once, ("three",)) == once
    assert api_rewrite.anthropic_message(b"not json", ()) == b"not json"


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


STREAM = sse(
    ("message_start", {"type": "message_start", "message": {"id": "chatcmpl-xyz", "type": "message", "content": []}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"text": "one, two, "}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "message_delta",
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": "three"}, "usage": {}},
    ),
    ("message_stop", {"type": "message_stop"}),
)


def events_of(stream: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in stream.split(b"\n") if line.startswith(b"data:")]


def test_a_stream_is_rewritten_the_same_however_it_is_cut() -> None:
    whole = api_rewrite.AnthropicStream(("three",))
    expected = whole.feed(STREAM) + whole.flush()
    events = events_of(expected)
    assert events[0]["message"]["id"] == "msg_xyz"
    assert events[4]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "three"}
    assert events[1:4] == events_of(STREAM)[1:4] and events[5] == {"type": "message_stop"}
    # Events that need no change pass byte for byte.
    assert expected.split(b"\n\n")[1:4] == STREAM.split(b"\n\n")[1:4]
    for cut in range(1, len(STREAM)):
        parts = api_rewrite.AnthropicStream(("three",))
        got = parts.feed(STREAM[:cut]) + parts.feed(STREAM[cut:]) + parts.flush()
        assert got == expected, cut
    # Complete lines are passed on at once: only an incomplete one is held back.
    first = STREAM.index(b"\n\n") + 2
    live = api_rewrite.AnthropicStream(("three",))
    assert live.feed(STREAM[: first + 5]) == expected[: expected.index(b"\n\n") + 2]
    # Idempotent across hops.
    again = api_rewrite.AnthropicStream(("three",))
    assert again.feed(expected) + again.flush() == expected


def test_an_endless_line_is_passed_on_not_buffered() -> None:
    stream = api_rewrite.AnthropicStream(())
    sent = 0
    for _ in range(40):
        sent += len(stream.feed(b"data: " + b"x" * 65536))
    assert len(stream.pending) <= api_rewrite.MAX_LINE
    assert sent >= 40 * 65542 - api_rewrite.MAX_LINE
    rest = stream.feed(b"y\n" + STREAM) + stream.flush()
    rewritten = api_rewrite.AnthropicStream(()).feed(STREAM)
    assert rest.endswith(b"y\n" + rewritten) and b"msg_xyz" in rewritten  # the next line is read again
    assert sent + len(rest) == 40 * 65542 + 2 + len(rewritten)


OVERFLOW = json.dumps(
    {
        "error": {
            "code": 400,
            "message": "request (600 tokens) exceeds the available context size (512 tokens), try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 600,
            "n_ctx": 512,
        }
    }
).encode()


def test_context_overflow_is_each_apis_own_error() -> None:
    body = api_rewrite.openai_context_error(OVERFLOW, CHAT)
    assert body is not None
    error = json.loads(body)["error"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    assert error["param"] == "messages" and "maximum context length is 512 tokens" in error["message"]
    assert "600 tokens" in error["message"]
    completions = api_rewrite.openai_context_error(OVERFLOW, "/v1/completions")
    assert completions is not None and json.loads(completions)["error"]["param"] == "prompt"
    assert api_rewrite.openai_context_error(body, CHAT) is None  # already rewritten: passes
    assert api_rewrite.openai_context_error(b'{"error": {"type": "server_error"}}', CHAT) is None
    message = api_rewrite.anthropic_context_message(OVERFLOW)
    assert message is not None and message.startswith("prompt is too long: 600 tokens > 512 maximum")


# ---------------------------------------------------------------------------------------------
# MCP: argument errors the SDK's validation catches are sentences


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_mcp_argument_errors_are_one_sentence_naming_the_argument(mode: str) -> None:
    twin = TwinTools()
    calls: list[tuple[str, dict[str, Any], str]] = [
        (
            "blackboard_feed",
            {"limit": "many"},
            "blackboard_feed: limit must be a whole number from 1 to 100; got 'many'",
        ),
        ("blackboard_post", {}, "blackboard_post: text is required: a string of at most 4096 bytes"),
        (
            "mesh_ask",
            {"question": "q", "max_tokens": 1.5},
            "mesh_ask: max_tokens must be a whole number from 1 to 4096",
        ),
        ("blackboard_search", {"query": ["a"]}, "blackboard_search: query must be a string"),
        ("blackboard_feed", {"since_hours": "x"}, "since_hours must be a number of hours, more than 0 and at most 48"),
    ]

    async def go() -> None:
        async with Client(build_server(twin), mode=mode) as client:
            for tool, args, expected in calls:
                r = await client.call_tool(tool, args)
                text = text_of(r)
                assert r.is_error and expected in text, text
                assert "pydantic" not in text and "http" not in text and "\n" not in text

    anyio.run(go)
    assert twin.calls == []


# ---------------------------------------------------------------------------------------------
# A real node and the official SDKs

CTX = 512


@pytest.fixture(scope="module")
def node(llama: object, smollm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    env = {"MESH_LLM_MODELS": str(smollm.parent)}
    args = ["--model", SMOLLM, "--ctx-size", str(CTX), "--parallel", "1"]  # one slot: a request holds CTX tokens
    n = NodeProcess(home=tmp_path_factory.mktemp("correct"), args=args, env=env).start()
    try:
        model = n.wait_model_state(SMOLLM, "serving", timeout=180)
        assert model["tools"] is False, "SmolLM2's chat template cannot call tools: the tool_choice tests rely on it"
        yield n
    finally:
        n.stop()


def oa(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.api + "/v1", api_key="unused", max_retries=0, timeout=120)


def an(node: NodeProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=node.api, api_key="unused", max_retries=0, timeout=120)


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
OPENAI_REFUSED = [
    ({"messages": []}, "messages", "at least one message"),
    ({"messages": [{"role": "bogus", "content": "x"}]}, "messages[0].role", "must be one of system, developer"),
    ({"messages": USER, "temperature": -3}, "temperature", "between 0 and 2"),
    ({"messages": USER, "top_p": 2}, "top_p", "between 0 and 1"),
    ({"messages": USER, "max_tokens": 10**12}, "max_tokens", f"context holds {CTX} tokens"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens", "between 1 and"),
    ({"messages": USER, "n": 100}, "n", "between 1 and 16"),
    ({"messages": USER, "stop": [str(i) for i in range(20)]}, "stop", "at most 16 strings"),
    ({"messages": USER, "tools": TOOLS, "tool_choice": "required"}, "tool_choice", "cannot call tools"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("fields", "param", "words"), OPENAI_REFUSED)
def test_openai_sdk_gets_400_with_param(node: NodeProcess, fields: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oa(node).chat.completions.create(model=SMOLLM, **fields)
    assert caught.value.status_code == 400 and caught.value.type == "invalid_request_error"
    assert caught.value.param == param and words in caught.value.message


@pytest.mark.slow
def test_a_model_name_that_is_no_name_is_400(node: NodeProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oa(node).chat.completions.create(model="m" * 1000, messages=USER)  # type: ignore[arg-type]
    assert caught.value.param == "model"


ANTHROPIC_REFUSED = [
    ({"max_tokens": 8, "messages": []}, "at least one message"),
    ({"max_tokens": -1, "messages": USER}, "max_tokens must be a whole number between 1 and"),
    ({"max_tokens": 8, "messages": [{"role": "bogus", "content": "x"}]}, "must be one of user, assistant"),
    ({"max_tokens": 8, "messages": USER, "extra_body": {"temperature": 1.5}}, "between 0 and 1"),
    (
        {
            "max_tokens": 8,
            "messages": USER,
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"},
        },
        "cannot call tools",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("fields", "words"), ANTHROPIC_REFUSED)
def test_anthropic_sdk_gets_invalid_request_error(node: NodeProcess, fields: dict[str, Any], words: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        an(node).messages.create(model=SMOLLM, **fields)
    error = caught.value.body["error"]  # type: ignore[index]
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert words in error["message"]


@pytest.mark.slow
def test_anthropic_max_tokens_is_required(node: NodeProcess) -> None:
    # The SDK itself insists on max_tokens; its raw `post` sends what a hand-written client would.
    with pytest.raises(anthropic.BadRequestError) as caught:
        an(node).post(MESSAGES, cast_to=object, body={"model": SMOLLM, "messages": USER})
    assert "'max_tokens' is required" in caught.value.body["error"]["message"]  # type: ignore[index]


GREEDY = {"temperature": 0}  # (this SDK no longer takes `temperature` as an argument)


def _a_stop_sequence(client: anthropic.Anthropic, prompt: str) -> str:
    """A word the model says (greedy) in its answer to `prompt`, after its first few: where a stop will hit."""
    first = client.messages.create(
        model=SMOLLM, max_tokens=40, extra_body=GREEDY, messages=[{"role": "user", "content": prompt}]
    )
    text = "".join(block.text for block in first.content if block.type == "text")
    words = [w for w in text.split() if w.isalpha() and len(w) > 2]
    assert len(words) >= 4, f"the model said too little to pick a stop sequence from: {text!r}"
    return words[3]


@pytest.mark.slow
def test_anthropic_stop_sequence_and_message_id(node: NodeProcess) -> None:
    client = an(node)
    prompt = "Count from one to twenty in words, separated by commas."
    stop = _a_stop_sequence(client, prompt)
    messages: Any = [{"role": "user", "content": prompt}]
    msg = client.messages.create(
        model=SMOLLM, max_tokens=40, extra_body=GREEDY, stop_sequences=[stop], messages=messages
    )
    assert msg.id.startswith("msg_")
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", stop)
    with client.messages.stream(
        model=SMOLLM, max_tokens=40, extra_body=GREEDY, stop_sequences=["never said", stop], messages=messages
    ) as stream:
        final = stream.get_final_message()
    assert final.id.startswith("msg_")
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
    # Without a stop sequence the turn ends as before, and ids are Anthropic's too.
    plain = client.messages.create(model=SMOLLM, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert plain.id.startswith("msg_") and plain.stop_reason in ("max_tokens", "end_turn") and not plain.stop_sequence


LONG = " ".join(["apple banana cherry"] * 300)  # ~900 tokens: more than the 512 the node gives a request


@pytest.mark.slow
def test_context_overflow_is_context_length_exceeded_for_openai(node: NodeProcess) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            oa(node).chat.completions.create(
                model=SMOLLM, max_tokens=4, stream=stream, messages=[{"role": "user", "content": LONG}]
            )
        assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"
        assert caught.value.type == "invalid_request_error"
        assert f"maximum context length is {CTX} tokens" in caught.value.message


@pytest.mark.slow
def test_context_overflow_is_prompt_too_long_for_anthropic(node: NodeProcess) -> None:
    messages: Any = [{"role": "user", "content": LONG}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        an(node).messages.create(model=SMOLLM, max_tokens=4, messages=messages)
    error = caught.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("prompt is too long: ") and f"> {CTX} maximum" in error["message"]
    with (
        pytest.raises(anthropic.BadRequestError) as caught,
        an(node).messages.stream(model=SMOLLM, max_tokens=4, messages=messages) as stream,
    ):
        stream.get_final_message()
    assert "prompt is too long" in str(caught.value)


@pytest.mark.slow
def test_deep_json_is_400_in_each_apis_shape_from_a_real_node(node: NodeProcess) -> None:
    deep = b'{"model": "x", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    for path in (CHAT, "/v1/completions", "/v1/embeddings", "/v1/responses", MESSAGES, "/v1/messages/count_tokens"):
        r = httpx2.post(node.api + path, content=deep, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, (path, r.text[:200])
        body = r.json()
        error = body["error"]
        assert "nests deeper than" in error["message"]
        assert (body["type"] == "error") if path.startswith(MESSAGES) else (error["type"] == "invalid_request_error")

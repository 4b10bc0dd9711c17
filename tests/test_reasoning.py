"""Thinking models: every reasoning control read into one decision (`mesh_mcp/api/reasoning.py`) as tables, and a
real node serving a thinking model — a generated GGUF with Qwen3's real chat template (`tests.ggufgen.write_thinker`:
it thinks "Why? 4." and answers "Four") — beside SmolLM2, driven by the official OpenAI and Anthropic SDKs and plain
HTTP: no thinking unless asked, `reasoning_content` / `thinking` blocks when asked, streamed and not, a budget cut
short, and `/v1/models` saying which model thinks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from inference.gguf_facts import read_facts, template_thinks
from inference.llama_server import REASONING_ARGS, ServerSettings, server_args
from mesh_mcp.api.checks import Rejection
from mesh_mcp.api.reasoning import UNLIMITED, Thinking, apply, read
from tests.conftest import SMOLLM
from tests.ggufgen import THINKER_ANSWER, THINKER_THOUGHT, write_thinker
from tests.harness import NodeProcess, serving_node

CHAT, MESSAGES, RESPONSES = "/v1/chat/completions", "/v1/messages", "/v1/responses"
ON, OFF = Thinking(on=True, asked=True), Thinking(on=False, asked=True)

# --- the decision, pure -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "payload", "thinking"),
    [
        ("nothing said: off", {}, Thinking()),
        ("reasoning_effort low", {"reasoning_effort": "low"}, ON),
        ("reasoning_effort none", {"reasoning_effort": "none"}, OFF),
        ("reasoning.enabled", {"reasoning": {"enabled": True}}, ON),
        ("reasoning.enabled false", {"reasoning": {"enabled": False}}, OFF),
        ("reasoning.effort", {"reasoning": {"effort": "high"}}, ON),
        ("reasoning.max_tokens is a budget", {"reasoning": {"max_tokens": 64}}, Thinking(True, 64, True)),
        ("reasoning.max_tokens 0: off", {"reasoning": {"max_tokens": 0}}, Thinking(False, 0, True)),
        ("the template switch", {"chat_template_kwargs": {"enable_thinking": True}}, ON),
        ("an alias of the switch", {"chat_template_kwargs": {"thinking_enabled": True}}, ON),
        ("a top-level switch", {"enable_thinking": True}, ON),
        ("Anthropic's", {"thinking": {"type": "enabled", "budget_tokens": 2048}}, Thinking(True, 2048, True)),
        ("Anthropic's adaptive", {"thinking": {"type": "adaptive"}}, ON),
        ("Anthropic's disabled", {"thinking": {"type": "disabled"}}, OFF),
        ("a budget alone does not turn it on", {"reasoning_budget_tokens": 9}, Thinking(False, 9, True)),
        ("budget 0 turns it off", {"reasoning_effort": "high", "thinking_budget": 0}, Thinking(False, 0, True)),
        ("a huge budget is unlimited", {"reasoning": {"max_tokens": 10**30}}, Thinking(True, UNLIMITED, True)),
        # later in the order overrides earlier (the reference implementation's order)
        ("effort after reasoning", {"reasoning": {"enabled": True}, "reasoning_effort": "none"}, OFF),
        (
            "the switch after effort",
            {"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}},
            ON,
        ),
        ("the switch after Anthropic's", {"thinking": {"type": "enabled"}, "enable_thinking": False}, OFF),
        (
            "the template's switch last",
            {"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}},
            OFF,
        ),
        ("null is not said", {"reasoning_effort": None, "reasoning": None, "enable_thinking": None}, Thinking()),
    ],
)
def test_the_decision(case: str, payload: dict[str, Any], thinking: Thinking) -> None:
    for path in (CHAT, MESSAGES, RESPONSES):
        assert read(payload, path) == thinking, f"{case} on {path}"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"reasoning_effort": 3}, "reasoning_effort"),
        ({"reasoning": True}, "reasoning"),
        ({"reasoning": {"enabled": "yes"}}, "reasoning.enabled"),
        ({"reasoning": {"effort": "maximum"}}, "reasoning.effort"),
        ({"reasoning": {"max_tokens": -1}}, "reasoning.max_tokens"),
        ({"thinking": {"type": "on"}}, "thinking"),
        ({"thinking": "enabled"}, "thinking"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1.5}}, "thinking.budget_tokens"),
        ({"enable_thinking": "true"}, "enable_thinking"),
        ({"reasoning_budget_tokens": True}, "reasoning_budget_tokens"),
        ({"chat_template_kwargs": []}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"enable_thinking": "false"}}, "chat_template_kwargs.enable_thinking"),
    ],
)
def test_what_cannot_be_read_is_a_400_naming_the_field(payload: dict[str, Any], param: str) -> None:
    got = read(payload, CHAT)
    assert isinstance(got, Rejection) and got.status == 400 and got.param == param, got
    assert param.split(".")[0] in got.message


def _read(payload: dict[str, Any], path: str) -> Thinking:
    got = read(payload, path)
    assert isinstance(got, Thinking), got
    return got


def test_written_as_llama_server_reads_it() -> None:
    p: dict[str, Any] = {"reasoning_effort": "low", "chat_template_kwargs": {"x": 1, "thinking_enabled": False}}
    assert apply(p, CHAT, Thinking(True, None, True))
    assert p["chat_template_kwargs"] == {"x": 1, "enable_thinking": True}, "one switch, other kwargs kept"
    assert p["reasoning_budget_tokens"] == UNLIMITED, "the servers' default budget is 0: on means unlimited"
    p = {"reasoning_effort": "none", "enable_thinking": True}
    apply(p, CHAT, _read(p, CHAT))
    assert "reasoning_effort" not in p, "llama-server reads effort none after the switch: it would undo it"
    p = {"thinking": {"type": "adaptive"}}
    apply(p, MESSAGES, _read(p, MESSAGES))
    assert p == {
        "thinking": {"type": "enabled", "budget_tokens": UNLIMITED},
        "chat_template_kwargs": {"enable_thinking": True},
    }
    p = {"thinking": {"type": "disabled"}}
    apply(p, MESSAGES, _read(p, MESSAGES))
    assert p == {"chat_template_kwargs": {"enable_thinking": False}}
    p = {"reasoning": {"max_tokens": 5}}
    apply(p, CHAT, _read(p, CHAT))
    assert p["reasoning_budget_tokens"] == 5 and p["chat_template_kwargs"] == {"enable_thinking": True}


@pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES])
@pytest.mark.parametrize(
    "payload",
    [
        {"reasoning_effort": "high"},
        {"thinking": {"type": "enabled", "budget_tokens": 77}},
        {"reasoning": {"enabled": False}},
        {"chat_template_kwargs": {"enable_think": True}, "reasoning_effort": "none"},
    ],
)
def test_a_written_request_reads_the_same(path: str, payload: dict[str, Any]) -> None:
    """A peer's entry node wrote it; the serving node reads it again and changes nothing."""
    first = read(payload, path)
    assert isinstance(first, Thinking)
    apply(payload, path, first)
    again = read(payload, path)
    assert isinstance(again, Thinking) and again.on == first.on
    before = json.dumps(payload, sort_keys=True)
    assert not apply(payload, path, again) and json.dumps(payload, sort_keys=True) == before


def test_paths_without_a_template_are_left_alone() -> None:
    for path in ("/v1/completions", "/v1/embeddings", "/v1/messages/count_tokens"):
        p = {"reasoning_effort": "bogus", "prompt": "x"}
        assert (
            read(p, path) == Thinking() and not apply(p, path, ON) and p == {"reasoning_effort": "bogus", "prompt": "x"}
        )


def test_every_chat_server_starts_with_thinking_parsed_and_off() -> None:
    chat = server_args(Path("llama-server"), Path("m.gguf"), "m", 1, ServerSettings())
    at = chat.index("--reasoning-format")
    assert chat[at : at + len(REASONING_ARGS)] == list(REASONING_ARGS)
    assert chat[chat.index("--reasoning") + 1] == "off" and chat[chat.index("--reasoning-budget") + 1] == "0"
    embed = server_args(Path("llama-server"), Path("m.gguf"), "m", 1, ServerSettings(embeddings=True))
    assert "--reasoning" not in embed, "an embedding server has no chat template to think with"


def test_which_templates_think(tmp_path: Path, smollm: Path) -> None:
    assert read_facts(write_thinker(tmp_path / "thinker.gguf")).template_thinks
    assert not read_facts(smollm).template_thinks
    assert template_thinks("{{ '<think>\\n' }}") and not template_thinks("{{ messages }}")


# --- one real node: a thinking model and SmolLM2 ------------------------------------------------------------------

ASK: Any = [{"role": "user", "content": "What is 2+2? One word."}]  # Any: the SDKs type messages strictly


@pytest.fixture(scope="module")
def node(llama: object, smollm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    thinker = write_thinker(tmp_path_factory.mktemp("thinker") / "thinker.gguf")
    with serving_node(tmp_path_factory.mktemp("reasoning"), SMOLLM, smollm.parent, "--model", str(thinker)) as n:
        n.wait_model_state("thinker", "serving", timeout=180)
        yield n


@pytest.fixture(scope="module")
def oa(node: NodeProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=node.api + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def an(node: NodeProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=node.api, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def _said(message: Any) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of an OpenAI SDK message (llama-server's extra field is kept by the SDK)."""
    return getattr(message, "reasoning_content", None), message.content


def _streamed(stream: Any) -> tuple[str, str]:
    thought, answer = "", ""
    for chunk in stream:
        for choice in chunk.choices:
            thought += getattr(choice.delta, "reasoning_content", None) or ""
            answer += choice.delta.content or ""
    return thought, answer


@pytest.mark.slow
def test_models_say_which_can_think(oa: openai.OpenAI, node: NodeProcess) -> None:
    caps = {m["id"]: m["capabilities"] for m in httpx2.get(node.api + "/v1/models", timeout=30).json()["data"]}
    assert caps["thinker"]["reasoning"] is True and caps[SMOLLM]["reasoning"] is False, caps
    assert caps["auto"]["reasoning"] is True, "auto can think: a request that asks gets a thinking model"
    assert {m.id for m in oa.models.list().data} == {"thinker", SMOLLM, "auto"}


@pytest.mark.slow
def test_no_thinking_unless_asked(oa: openai.OpenAI) -> None:
    resp = oa.chat.completions.create(model="thinker", messages=ASK, max_tokens=64, temperature=0)
    assert _said(resp.choices[0].message) == (None, THINKER_ANSWER)
    stream = oa.chat.completions.create(model="thinker", messages=ASK, max_tokens=64, temperature=0, stream=True)
    assert _streamed(stream) == ("", THINKER_ANSWER)
    off = oa.chat.completions.create(
        model="thinker",
        messages=ASK,
        max_tokens=64,
        temperature=0,
        reasoning_effort="none",
    )
    assert _said(off.choices[0].message) == (None, THINKER_ANSWER)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "fields"),
    [
        ("reasoning_effort", {"reasoning_effort": "low"}),
        ("reasoning.enabled", {"extra_body": {"reasoning": {"enabled": True}}}),
        ("chat_template_kwargs", {"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}),
        (
            "Anthropic's thinking on the OpenAI API",
            {"extra_body": {"thinking": {"type": "enabled", "budget_tokens": 1024}}},
        ),
    ],
)
def test_thinking_when_asked(oa: openai.OpenAI, how: str, fields: dict[str, Any]) -> None:
    resp = oa.chat.completions.create(model="thinker", messages=ASK, max_tokens=64, temperature=0, **fields)
    assert _said(resp.choices[0].message) == (THINKER_THOUGHT, THINKER_ANSWER), how
    stream = oa.chat.completions.create(
        model="thinker",
        messages=ASK,
        max_tokens=64,
        temperature=0,
        stream=True,
        **fields,
    )
    assert _streamed(stream) == (THINKER_THOUGHT, THINKER_ANSWER), how + ", streamed"


@pytest.mark.slow
def test_a_budget_cuts_thinking_short(oa: openai.OpenAI, an: anthropic.Anthropic) -> None:
    """Three tokens of thinking ("W", "h", "y"), then llama.cpp forces the end tag and the answer follows."""
    resp = oa.chat.completions.create(
        model="thinker",
        messages=ASK,
        max_tokens=64,
        temperature=0,
        extra_body={"reasoning": {"max_tokens": 3}},
    )
    assert _said(resp.choices[0].message) == (THINKER_THOUGHT[:3], THINKER_ANSWER)
    msg = an.messages.create(
        model="thinker",
        max_tokens=64,
        messages=ASK,
        thinking={"type": "enabled", "budget_tokens": 3},
    )
    assert next((b.type, getattr(b, "thinking", None)) for b in msg.content) == ("thinking", THINKER_THOUGHT[:3])


@pytest.mark.slow
def test_anthropic_thinking_blocks(an: anthropic.Anthropic) -> None:
    plain = an.messages.create(model="thinker", max_tokens=64, messages=ASK)
    assert [(b.type, getattr(b, "text", None)) for b in plain.content] == [("text", THINKER_ANSWER)]
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}
    msg = an.messages.create(model="thinker", max_tokens=64, messages=ASK, thinking=thinking)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert [getattr(b, "thinking", None) or getattr(b, "text", None) for b in msg.content] == [
        THINKER_THOUGHT,
        THINKER_ANSWER,
    ]
    with an.messages.stream(model="thinker", max_tokens=64, messages=ASK, thinking=thinking) as stream:
        deltas = [e.delta for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "".join(d.thinking for d in deltas if d.type == "thinking_delta") == THINKER_THOUGHT
    assert "".join(d.text for d in deltas if d.type == "text_delta") == THINKER_ANSWER
    assert [b.type for b in final.content] == ["thinking", "text"]


@pytest.mark.slow
def test_responses_reasoning_items(oa: openai.OpenAI) -> None:
    resp = oa.responses.create(model="thinker", input="What is 2+2?", max_output_tokens=64, reasoning={"effort": "low"})
    kinds = [item.type for item in resp.output]
    assert kinds == ["reasoning", "message"], kinds
    assert resp.output_text == THINKER_ANSWER
    plain = oa.responses.create(model="thinker", input="What is 2+2?", max_output_tokens=64)
    assert [item.type for item in plain.output] == ["message"] and plain.output_text == THINKER_ANSWER


@pytest.mark.slow
def test_plain_http_and_bad_controls(node: NodeProcess) -> None:
    url = node.api + "/v1/chat/completions"
    body = {"model": "thinker", "messages": ASK, "max_tokens": 64, "chat_template_kwargs": {"enable_thinking": True}}
    got = httpx2.post(url, json=body, timeout=60).json()["choices"][0]["message"]
    assert (got.get("reasoning_content"), got["content"]) == (THINKER_THOUGHT, THINKER_ANSWER)
    bad = httpx2.post(url, json={**body, "chat_template_kwargs": {"enable_thinking": "yes"}}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs.enable_thinking"
    bad = httpx2.post(node.api + "/v1/messages", json={**body, "thinking": {"type": "maybe"}}, timeout=60)
    assert bad.status_code == 400 and bad.json()["type"] == "error", "Anthropic's error shape on its API"


@pytest.mark.slow
def test_auto_gives_a_thinking_request_to_a_thinking_model(oa: openai.OpenAI) -> None:
    plain = oa.chat.completions.with_raw_response.create(model="auto", messages=ASK, max_tokens=8)
    assert plain.headers["x-mesh-model"] == SMOLLM, "without thinking: the largest"
    raw = oa.chat.completions.with_raw_response.create(
        model="auto", messages=ASK, max_tokens=64, reasoning_effort="high"
    )
    assert raw.headers["x-mesh-model"] == "thinker"
    assert _said(raw.parse().choices[0].message) == (THINKER_THOUGHT, THINKER_ANSWER)


@pytest.mark.slow
def test_a_model_that_cannot_think_answers_a_thinking_request(oa: openai.OpenAI) -> None:
    resp = oa.chat.completions.create(model=SMOLLM, messages=ASK, max_tokens=8, temperature=0, reasoning_effort="high")
    assert resp.choices[0].message.content and _said(resp.choices[0].message)[0] is None

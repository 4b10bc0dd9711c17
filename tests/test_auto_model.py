"""`model: "auto"` (and no model): the rule that picks a serving model (`mesh_mcp/api/auto.py`) as tables; the API
in process over an in-memory mesh whose servers answer like llama-server (the response's `model` is the request's),
driven by the official OpenAI and Anthropic SDKs; and one real node serving SmolLM2."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anthropic
import anyio
import httpx2
import openai
import pytest

from mesh_mcp.api.app import build_api
from mesh_mcp.api.auto import (
    MAX_CANDIDATES,
    MAX_TOKENS,
    ModelCandidate,
    RequestFacts,
    choose_auto,
    is_auto,
    merge,
    request_facts,
)
from mesh_mcp.api.directory import RemoteModel
from mesh_mcp.response import Response
from mesh_mcp.state import ModelStatus, NodeState
from tests.conftest import SMOLLM
from tests.harness import NodeProcess, serving_node

GB = 1 << 30
C = ModelCandidate

# --- the rule, pure ---------------------------------------------------------------------------------------------

SMALL_TOOLS = C("small-tools", 1, tools=True, ctx=32768, size_bytes=1 * GB)
BIG = C("big", 1, tools=False, ctx=4096, size_bytes=8 * GB)
MID = C("mid", 2, tools=None, ctx=0, size_bytes=4 * GB)
EMB = C("emb", 1, size_bytes=16 * GB, embeddings=True)
THINKER = C("thinker", 1, ctx=4096, size_bytes=GB // 2, thinking=True)


@pytest.mark.parametrize(
    ("case", "want", "candidates", "chosen"),
    [
        ("nothing serving", RequestFacts(), [], None),
        ("a model without servers is never chosen", RequestFacts(), [C("gone", 0, size_bytes=GB)], None),
        ("the largest", RequestFacts(), [SMALL_TOOLS, BIG, MID], "big"),
        ("tools: a tool-capable one, even small", RequestFacts(tools=True), [SMALL_TOOLS, BIG, MID], "small-tools"),
        ("tools, none capable: still the largest", RequestFacts(tools=True), [BIG, MID], "big"),
        ("context: one that holds it", RequestFacts(tokens=8000), [SMALL_TOOLS, BIG], "small-tools"),
        ("context: 0 (not known) counts as holding", RequestFacts(tokens=8000), [SMALL_TOOLS, BIG, MID], "mid"),
        ("context exactly full holds", RequestFacts(tokens=4096), [SMALL_TOOLS, BIG], "big"),
        ("none holds it: the largest", RequestFacts(tokens=10**6), [SMALL_TOOLS, BIG], "big"),
        ("tools before context", RequestFacts(tools=True, tokens=10**6), [SMALL_TOOLS, BIG], "small-tools"),
        ("thinking: a thinking model, even small", RequestFacts(thinking=True), [THINKER, BIG, MID], "thinker"),
        ("thinking, none can: the largest", RequestFacts(thinking=True), [BIG, MID], "big"),
        ("no thinking asked: the largest", RequestFacts(), [THINKER, BIG], "big"),
        ("tools before thinking", RequestFacts(tools=True, thinking=True), [THINKER, SMALL_TOOLS], "small-tools"),
        ("thinking before context", RequestFacts(thinking=True, tokens=8000), [THINKER, SMALL_TOOLS], "thinker"),
        ("generation avoids an embedding model", RequestFacts(), [EMB, SMALL_TOOLS], "small-tools"),
        ("embeddings prefer one", RequestFacts(embeddings=True), [SMALL_TOOLS, BIG, EMB], "emb"),
        ("only an embedding model: it", RequestFacts(), [EMB], "emb"),
        (
            "same size: the faster",
            RequestFacts(),
            [C("slow", 1, size_bytes=GB, tok_s=10.0), C("fast", 1, size_bytes=GB, tok_s=90.0)],
            "fast",
        ),
        (
            "same size and speed: the least in flight per server",
            RequestFacts(),
            [C("busy", 1, in_flight=3, size_bytes=GB), C("spread", 4, in_flight=8, size_bytes=GB)],
            "spread",
        ),
        ("all equal: by name", RequestFacts(), [C("b", 1), C("a", 1), C("c", 1)], "a"),
    ],
)
def test_the_rule(case: str, want: RequestFacts, candidates: list[ModelCandidate], chosen: str | None) -> None:
    assert choose_auto(want, candidates) == chosen, case
    assert choose_auto(want, list(reversed(candidates))) == chosen, case + " (order does not matter)"


@pytest.mark.parametrize(
    ("case", "hostile", "sane", "winner"),
    [
        # impossible numbers count as not known (0), never as the best possible
        ("negative size is unknown, not huge", C("a", 1, size_bytes=-(10**18)), C("b", 1), "a"),
        ("NaN speed is unknown", C("x", 1, tok_s=float("nan")), C("y", 1, tok_s=1.0), "y"),
        ("infinite speed is unknown", C("x", 1, tok_s=float("inf")), C("y", 1, tok_s=1.0), "y"),
        ("negative in flight is idle, not less", C("x", 1, in_flight=-(10**9)), C("a", 1), "a"),
        ("negative context is unknown: it holds", C("x", 1, ctx=-5), C("a", 1, ctx=50), "x"),
    ],
)
def test_hostile_facts_win_nothing(case: str, hostile: ModelCandidate, sane: ModelCandidate, winner: str) -> None:
    assert choose_auto(RequestFacts(tokens=100), [hostile, sane]) == winner, case
    assert choose_auto(RequestFacts(tokens=100), [hostile]) == hostile.name, case + ": alone it still answers"


def test_ten_thousand_candidates_cost_a_bounded_pass() -> None:
    many = [C(f"m{i:05d}", 1, size_bytes=i) for i in range(10_000)]
    assert choose_auto(RequestFacts(), many) == f"m{MAX_CANDIDATES - 1:05d}"  # only the first MAX_CANDIDATES
    assert choose_auto(RequestFacts(), many, limit=10_000) == "m09999"

    def endless() -> Iterator[ModelCandidate]:
        i = 0
        while True:
            i += 1
            yield C(f"e{i}", 1)

    assert choose_auto(RequestFacts(), endless(), limit=100) == "e1"  # stops at the limit
    assert choose_auto(RequestFacts(), many, limit=0) is None and choose_auto(RequestFacts(), many, limit=-1) is None


@pytest.mark.parametrize(
    ("payload", "size", "path", "facts"),
    [
        ({}, 0, "/v1/chat/completions", RequestFacts()),
        ({"tools": [{"type": "function"}]}, 30, "/v1/chat/completions", RequestFacts(tools=True, tokens=10)),
        ({"tools": []}, 0, "/v1/chat/completions", RequestFacts()),
        ({"tools": "yes"}, 0, "/v1/chat/completions", RequestFacts()),
        ({"functions": [{"name": "f"}]}, 0, "/v1/chat/completions", RequestFacts(tools=True)),
        ({"max_tokens": 100}, 300, "/v1/messages", RequestFacts(tokens=200)),
        ({"max_completion_tokens": 7}, 0, "/v1/chat/completions", RequestFacts(tokens=7)),
        ({"max_tokens": True}, 0, "/v1/chat/completions", RequestFacts()),  # a bool is no count
        ({"max_tokens": "9"}, 0, "/v1/chat/completions", RequestFacts()),
        ({"max_tokens": -9}, 0, "/v1/chat/completions", RequestFacts()),
        ({"max_tokens": 10**30}, 0, "/v1/chat/completions", RequestFacts(tokens=MAX_TOKENS)),
        ({}, -5, "/v1/completions", RequestFacts()),
        ({"input": "x"}, 3, "/v1/embeddings", RequestFacts(tokens=1, embeddings=True)),
    ],
)
def test_what_a_request_needs(payload: dict[str, Any], size: int, path: str, facts: RequestFacts) -> None:
    assert request_facts(payload, size, path) == facts


def test_which_names_leave_the_choice_to_the_mesh() -> None:
    assert is_auto(None) and is_auto("") and is_auto("auto") and is_auto("AUTO") and is_auto("Auto")
    assert not is_auto("auto-coder") and not is_auto("SmolLM2") and not is_auto(" auto") and not is_auto(3)


def test_merge_takes_serving_servers_only_and_merges_their_facts() -> None:
    local = [
        ModelStatus(
            "a",
            "serving",
            upstream="http://127.0.0.1:1",
            tools=False,
            context=4096,
            size_bytes=GB,
            measured_tok_s=20.0,
            in_flight=2,
        ),
        ModelStatus("b", "loading", size_bytes=9 * GB),
        ModelStatus("c", "serving", upstream=None),  # no llama-server yet: not routable
        ModelStatus("e", "serving", upstream="http://127.0.0.1:2", embeddings=True),
    ]
    remote = [
        RemoteModel("a", "n2", "serving", 1, tools=True, size_bytes=GB, ctx=2048, thinking=False),
        RemoteModel("a", "n3", "loading", 0, ctx=16),
        RemoteModel("b", "n2", "loading", 0),
        RemoteModel("d", "n3", "serving", 5, size_bytes=-1),
        RemoteModel("d", "n4", "serving", 0, thinking=True),
    ]
    got = {c.name: c for c in merge(local, remote)}
    assert set(got) == {"a", "d", "e"}
    assert got["a"] == C(
        "a", 2, in_flight=3, tools=True, ctx=2048, size_bytes=GB, tok_s=20.0, embeddings=False, thinking=False
    )
    assert got["d"] == C("d", 2, in_flight=5, size_bytes=0, thinking=True), "thinks if any server says so"
    assert got["e"].embeddings is True
    assert len(merge([], [RemoteModel(f"m{i}", "n", "serving", 0) for i in range(10_000)], limit=50)) == 50
    # a member serving a model it calls "auto" (claiming any size) is never the choice: `auto` would name itself
    hostile = [RemoteModel("AUTO", "n9", "serving", 0, size_bytes=10**15), RemoteModel("a", "n2", "serving", 0)]
    assert [c.name for c in merge([], hostile)] == ["a"]
    # and the remote speed a record gives (`tps`) counts
    assert merge([], [RemoteModel("a", "n2", "serving", 0, tok_s=12.5)])[0].tok_s == 12.5


# --- through the API, in process ---------------------------------------------------------------------------------


class LlamaTwin:
    """Remote servers of several models that answer like llama-server: the answer's `model` is the request's."""

    MODELS = (
        RemoteModel("Tiny-Chat", "n2", "serving", 0, tools=False, size_bytes=1 * GB, ctx=2048, thinking=True),
        RemoteModel("Big-Chat", "n3", "serving", 0, tools=False, size_bytes=8 * GB, ctx=4096),
        RemoteModel("Small-Coder", "n4", "serving", 0, tools=True, size_bytes=2 * GB, ctx=32768),
        RemoteModel("Huge-Loading", "n5", "loading", 0, tools=True, size_bytes=70 * GB, ctx=131072),
    )

    def __init__(self, models: tuple[RemoteModel, ...] = MODELS) -> None:
        self.models = models
        self.asked: list[tuple[str, str, dict[str, Any]]] = []

    def remote_models(self) -> list[RemoteModel]:
        return list(self.models)

    async def open(
        self, node_id: str, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        request = json.loads(body)
        self.asked.append((node_id, target, request))
        model = request.get("model")
        if target == "/v1/messages":
            answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
                      "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
                      "usage": {"input_tokens": 3, "output_tokens": 1}}  # fmt: skip
        elif request.get("stream"):
            events = [
                {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}]},
                {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
                 "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            ]  # fmt: skip
            sse = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
            return Response(200, [(b"content-type", b"text/event-stream")], _once(sse))
        else:
            answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": model,
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}  # fmt: skip
        return Response(200, [(b"content-type", b"application/json")], _once(json.dumps(answer).encode()))


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def entry_node() -> NodeState:
    return NodeState(node_id="n1" * 8, name="entry", version="0", api_url="", console_url="")


class Api:
    """The API app over `LlamaTwin`, with the demand it records."""

    def __init__(self, twin: LlamaTwin | None = None, node: NodeState | None = None) -> None:
        self.twin = twin or LlamaTwin()
        self.demand: list[tuple[str, bool]] = []
        self.app = build_api(node or entry_node(), self.twin, on_demand=self.wanted)

    def wanted(self, name: str, served: bool) -> None:
        self.demand.append((name, served))

    def post(self, path: str, body: dict[str, Any]) -> httpx2.Response:
        async def go() -> httpx2.Response:
            transport = httpx2.ASGITransport(app=self.app)
            async with httpx2.AsyncClient(transport=transport, base_url="http://node") as c:
                with anyio.fail_after(30):
                    return await c.post(path, json=body)

        return anyio.run(go)

    def get(self, path: str) -> httpx2.Response:
        async def go() -> httpx2.Response:
            async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.app), base_url="http://n") as c:
                return await c.get(path)

        return anyio.run(go)


HELLO: list[Any] = [{"role": "user", "content": "hello"}]
TOOLS = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]


def test_auto_and_no_model_answer_from_the_largest_serving_model_and_say_so() -> None:
    for model in ("auto", "", None, "AUTO"):
        api = Api()
        body = {"messages": HELLO, "max_tokens": 8} | ({} if model is None else {"model": model})
        r = api.post("/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "Big-Chat" and r.headers["x-mesh-model"] == "Big-Chat", model
        assert r.headers["x-mesh-node"] == "n3"
        assert [(node, asked["model"]) for node, _, asked in api.twin.asked] == [("n3", "Big-Chat")]
        assert api.demand == [("Big-Chat", True)], "counted as demand for the model chosen, never for 'auto'"


def test_auto_with_tools_takes_a_tool_capable_model() -> None:
    api = Api()
    r = api.post("/v1/chat/completions", {"model": "auto", "messages": HELLO, "tools": TOOLS})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "Small-Coder" and r.headers["x-mesh-model"] == "Small-Coder"


def test_auto_with_a_long_prompt_takes_a_model_whose_context_holds_it() -> None:
    api = Api()
    long = [{"role": "user", "content": "word " * 4000}]  # about 20 kB: past Big-Chat's 4096 tokens at 3 bytes each
    r = api.post("/v1/chat/completions", {"model": "auto", "messages": long, "max_tokens": 16})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "Small-Coder"


def test_a_named_model_is_unchanged_and_named_in_the_header() -> None:
    api = Api()
    r = api.post("/v1/chat/completions", {"model": "tiny-chat", "messages": HELLO})  # case-insensitive match
    assert r.status_code == 200 and r.headers["x-mesh-model"] == "Tiny-Chat"
    assert api.twin.asked[0][2]["model"] == "tiny-chat", "the body of a named model goes unchanged"


def test_auto_streams_with_the_chosen_model() -> None:
    api = Api()
    r = api.post("/v1/chat/completions", {"model": "auto", "messages": HELLO, "stream": True})
    assert r.status_code == 200 and r.headers["x-mesh-model"] == "Big-Chat"
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert chunks and {c["model"] for c in chunks} == {"Big-Chat"}


def test_auto_with_nothing_serving_answers_like_a_model_the_mesh_lacks() -> None:
    empty = Api(LlamaTwin(()))
    r = empty.post("/v1/chat/completions", {"model": "auto", "messages": HELLO})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "no node of this mesh serves a model yet" in r.json()["error"]["message"]
    assert empty.demand == [] and empty.twin.asked == []
    loading = Api(LlamaTwin((RemoteModel("Slow", "n2", "loading", 0),)))
    r = loading.post("/v1/chat/completions", {"messages": HELLO})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert (
        r.json()["error"]["code"] == "model_loading" and "'Slow' is loading on node n2" in r.json()["error"]["message"]
    )
    r = loading.post("/v1/messages", {"model": "auto", "max_tokens": 4, "messages": HELLO})
    assert r.status_code == 503 and r.json()["type"] == "error", "Anthropic's shape under /v1/messages"


def test_models_lists_auto_last_as_a_pseudo_model_never_serving() -> None:
    data = Api().get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["Tiny-Chat", "Big-Chat", "Small-Coder", "Huge-Loading", "auto"]
    pseudo = data[-1]
    assert pseudo["owned_by"] == "mesh-llm" and pseudo["object"] == "model" and pseudo["pseudo"] is True
    assert pseudo["state"] == "auto" and pseudo["nodes"] == [] and "per request" in pseudo["description"]
    assert pseudo["capabilities"] == {"tools": True, "reasoning": True}, "Small-Coder calls tools, Tiny-Chat thinks"
    no_tools = LlamaTwin((LlamaTwin.MODELS[0], LlamaTwin.MODELS[3]))  # the tool-capable one is only loading
    assert Api(no_tools).get("/v1/models").json()["data"][-1]["capabilities"] == {"tools": False, "reasoning": True}
    assert Api().get("/v1/models/auto").json() == pseudo
    assert Api(LlamaTwin(())).get("/v1/models").json()["data"] == [], "nothing to pick from: no auto either"


def test_the_official_sdks_ask_auto() -> None:
    async def go() -> None:
        api = Api()
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=api.app), base_url="http://node")
        oa = openai.AsyncOpenAI(base_url="http://node/v1", api_key="unused", http_client=http, max_retries=0)
        raw = await oa.chat.completions.with_raw_response.create(model="auto", messages=HELLO, max_tokens=8)
        assert raw.headers["x-mesh-model"] == "Big-Chat" and raw.parse().model == "Big-Chat"
        stream = await oa.chat.completions.create(model="auto", messages=HELLO, stream=True)
        assert {chunk.model async for chunk in stream} == {"Big-Chat"}
        assert "auto" in [m.id async for m in oa.models.list()]
        an = anthropic.AsyncAnthropic(base_url="http://node", api_key="unused", http_client=http, max_retries=0)
        msg = await an.messages.with_raw_response.create(model="auto", max_tokens=8, messages=HELLO)
        assert msg.headers["x-mesh-model"] == "Big-Chat" and (await msg.parse()).model == "Big-Chat"
        assert [(n, t, a["model"]) for n, t, a in api.twin.asked][-1] == ("n3", "/v1/messages", "Big-Chat")
        await http.aclose()

    anyio.run(go)


def test_a_thinking_request_reaches_a_thinking_peer_with_one_control() -> None:
    """The entry node reads the request's thinking control (api/reasoning.py), picks a thinking model for `auto`, and
    the peer gets the control written as llama-server reads it; a request that says nothing is passed as it came."""
    api = Api()
    with_effort = {"model": "auto", "messages": HELLO, "max_tokens": 8, "reasoning_effort": "high"}
    r = api.post("/v1/chat/completions", with_effort)
    assert r.status_code == 200 and r.headers["x-mesh-model"] == "Tiny-Chat"
    node, _, asked = api.twin.asked[-1]
    assert node == "n2" and asked["chat_template_kwargs"] == {"enable_thinking": True}
    assert asked["reasoning_budget_tokens"] == 2**31 - 1 and asked["reasoning_effort"] == "high"
    r = api.post(
        "/v1/messages", {**with_effort, "reasoning_effort": None, "thinking": {"type": "enabled", "budget_tokens": 9}}
    )
    assert r.status_code == 200 and api.twin.asked[-1][2]["thinking"] == {"type": "enabled", "budget_tokens": 9}
    assert api.twin.asked[-1][2]["chat_template_kwargs"] == {"enable_thinking": True}
    api.post("/v1/chat/completions", {"model": "Big-Chat", "messages": HELLO, "max_tokens": 8})
    assert set(api.twin.asked[-1][2]) == {"model", "messages", "max_tokens"}, "nothing said: nothing written"
    bad = api.post("/v1/chat/completions", {**with_effort, "reasoning_effort": "maximum"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_effort"


# --- one real node --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(llama: object, smollm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with serving_node(tmp_path_factory.mktemp("auto"), SMOLLM, smollm.parent) as n:
        yield n


@pytest.mark.slow
def test_a_real_node_answers_auto_and_no_model_with_smollm(node: NodeProcess) -> None:
    with (
        openai.OpenAI(base_url=node.api + "/v1", api_key="unused", max_retries=0, timeout=60) as oa,
        anthropic.Anthropic(base_url=node.api, api_key="unused", max_retries=0, timeout=60) as an,
    ):  # closed: their connection pools would leak sockets
        raw = oa.chat.completions.with_raw_response.create(model="auto", messages=HELLO, max_tokens=4, temperature=0)
        resp = raw.parse()
        assert raw.headers["x-mesh-model"] == SMOLLM and resp.model == SMOLLM and resp.choices[0].message.content
        r = httpx2.post(node.api + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == SMOLLM and r.headers["x-mesh-model"] == SMOLLM
        stream = oa.chat.completions.create(model="auto", messages=HELLO, max_tokens=4, stream=True)
        assert {chunk.model for chunk in stream} == {SMOLLM}
        assert [m.id for m in oa.models.list().data] == [SMOLLM, "auto"]
        msg = an.messages.with_raw_response.create(model="auto", max_tokens=4, messages=HELLO)
        assert msg.headers["x-mesh-model"] == SMOLLM and msg.parse().model == SMOLLM
        demand = {d["model"]: d for d in node.status().get("demand", [])}
        assert SMOLLM in demand and "auto" not in demand, demand

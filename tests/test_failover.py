"""Issue 18: a streamed answer survives the death of the node generating it. Real processes: A and B serve SmolLM2
(two replicas, one thread each), C is a client that takes the request; the node C routed the stream to is killed
with SIGKILL mid-answer, and C goes on on the other server from the text already sent (api/resume.py). At
temperature 0 the client's text is the uninterrupted run's — over the official openai and anthropic SDKs. A client
that hangs up while its stream goes on elsewhere leaves nothing running for it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import SMOLLM
from tests.harness import NodeProcess
from tests.security.test_dead_peer import _llama_port, _metric, kill_node
from tests.test_mesh import Spawn, mesh_node, token_of, wait_models

pytestmark = pytest.mark.slow

PROMPT = "Count from 1 to 80, separated by commas."
MAX_TOKENS = 200
KILL_AT = 40  # content events the client has read when the serving node is killed


def servers(node: NodeProcess) -> int:
    rows = [m for m in node.status()["mesh"]["models"] if m["name"] == SMOLLM]
    return len(rows[0]["servers"]) if rows else 0


def replica(spawn: Spawn, name: str, ip: str, token: str) -> NodeProcess:
    node = mesh_node(spawn, name, ip, "--model", SMOLLM, "--threads", "1", "--join", token)
    node.wait_model_state(SMOLLM, "serving", timeout=240)
    return node


def node_named(nodes: list[NodeProcess], node_id: str) -> NodeProcess:
    return next(n for n in nodes if n.status()["node_id"] == node_id)


def openai_stream(c: NodeProcess, kill: list[NodeProcess] | None = None) -> tuple[str, int, str]:
    """(text, content events, serving node id) of one streamed chat through C; with `kill`, the serving node
    among them is killed after `KILL_AT` content events."""
    client = openai.OpenAI(base_url=c.api + "/v1", api_key="unused", max_retries=0, timeout=180)
    raw = client.chat.completions.with_raw_response.create(
        model=SMOLLM,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    served_by = raw.headers["x-mesh-node"]
    text, events, ids = "", 0, set()
    for chunk in raw.parse():
        ids.add(chunk.id)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            events += 1
            if kill is not None and events == KILL_AT:
                kill_node(node_named(kill, served_by))
    assert len(ids) == 1, f"one answer, one id: {ids}"
    return text, events, served_by


def anthropic_stream(c: NodeProcess, kill: list[NodeProcess] | None = None) -> tuple[str, Any]:
    client = anthropic.Anthropic(base_url=c.api, api_key="unused", max_retries=0, timeout=180)
    text, events = "", 0
    with client.messages.stream(
        model=SMOLLM,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": PROMPT}],
        extra_body={"temperature": 0},  # the SDK (2.x) no longer takes it as an argument; the API does
    ) as stream:
        served_by = stream.response.headers["x-mesh-node"]
        for delta in stream.text_stream:
            text += delta
            events += 1
            if kill is not None and events == KILL_AT:
                kill_node(node_named(kill, served_by))
        final = stream.get_final_message()
    return text, final


def test_a_stream_goes_on_when_its_server_is_killed(spawn: Spawn, smollm: object) -> None:
    a = mesh_node(spawn, "a", "127.0.0.2", "--model", SMOLLM, "--threads", "1")
    a.wait_model_state(SMOLLM, "serving", timeout=240)
    token = token_of(a)
    b = replica(spawn, "b", "127.0.0.3", token)
    c = mesh_node(spawn, "c", "127.0.0.4", "--client", "--join", token)
    c.wait_for("C up", lambda s: True, timeout=60)
    wait_models(c, {SMOLLM}, timeout=60)
    c.wait_for("C sees two servers", lambda s: servers(c) == 2, timeout=120)

    # The uninterrupted run, then the same request with its server killed mid-answer.
    reference, length, _ = openai_stream(c)
    assert length > KILL_AT + 10, f"the answer is long enough to be cut: {reference!r}"
    text, _, _ = openai_stream(c, kill=[a, b])
    assert text == reference
    c.wait_log(r"a stream of .* goes on on node [0-9a-f]{16} after \d+ tokens", timeout=5)

    # A new replica joins (through the survivor: the token's address may be the dead node's); the same over
    # Anthropic's API and SDK.
    survivor = next(n for n in (a, b) if n.proc is not None and n.proc.poll() is None)
    d = replica(spawn, "d", "127.0.0.5", token_of(survivor))
    c.wait_for("C sees two servers again", lambda s: servers(c) == 2, timeout=180)
    reference_text, reference_final = anthropic_stream(c)
    alive = [n for n in (a, b, d) if n.proc is not None and n.proc.poll() is None]
    text, final = anthropic_stream(c, kill=alive)
    assert text == reference_text
    assert final.stop_reason == reference_final.stop_reason
    assert final.usage.output_tokens == reference_final.usage.output_tokens


LONG_TOKENS = 3000  # ~30 s of decoding with one thread: a continuation left running for a gone client shows


def llama_url(node: NodeProcess) -> str:
    """The node's own llama-server (it runs with --metrics)."""
    return f"http://127.0.0.1:{_llama_port(node.model(node.status(), SMOLLM)['pid'])}"  # type: ignore[index]


def mesh_metrics(node: NodeProcess) -> list[Sample]:
    return [s for f in text_string_to_metric_families(httpx2.get(node.console + "/metrics", timeout=10).text)
            for s in f.samples]  # fmt: skip


def total(found: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in found if s.name == name and labels.items() <= s.labels.items())


def has_content(line: str) -> bool:
    """An SSE line of a chat stream that carries answer text."""
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


def test_a_client_gone_during_the_failover_cancels_the_continuation(spawn: Spawn, smollm: object) -> None:
    """The client hangs up just after C went on on the survivor: the survivor's llama-server stops generating for
    it (far short of max_tokens), and C counts the request as cancelled, with nothing left in flight."""
    args = ("--model", SMOLLM, "--threads", "1", "--ctx-size", "4096", "--parallel", "1")
    a = mesh_node(spawn, "a", "127.0.0.2", *args)
    a.wait_model_state(SMOLLM, "serving", timeout=240)
    token = token_of(a)
    b = mesh_node(spawn, "b", "127.0.0.3", *args, "--join", token)
    b.wait_model_state(SMOLLM, "serving", timeout=240)
    c = mesh_node(spawn, "c", "127.0.0.4", "--client", "--join", token)
    c.wait_for("C up", lambda s: True, timeout=60)
    wait_models(c, {SMOLLM}, timeout=60)
    c.wait_for("C sees two servers", lambda s: servers(c) == 2, timeout=120)
    ids = {a.status()["node_id"]: a, b.status()["node_id"]: b}
    upstreams = {node_id: llama_url(n) for node_id, n in ids.items()}
    decoded = {node_id: _metric(url, "n_decode_total") for node_id, url in upstreams.items()}
    before = mesh_metrics(c)

    body = {
        "model": SMOLLM,
        "messages": [{"role": "user", "content": "Count from one to ten thousand."}],
        "max_tokens": LONG_TOKENS,
        "temperature": 0,
        "ignore_eos": True,  # llama-server's extension: an uncancelled continuation runs to max_tokens
        "stream": True,
    }
    with httpx2.stream("POST", c.api + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        victim_id = r.headers["x-mesh-node"]
        survivor_id = next(i for i in ids if i != victim_id)
        lines = r.iter_lines()  # held: dropping the iterator would close the connection early
        events = 0
        while events < KILL_AT:
            events += has_content(next(lines))
        kill_node(ids[victim_id])
        went_on = c.wait_log(rf"a stream of .* goes on on node {survivor_id} after (\d+) tokens", timeout=60)
        while events < int(went_on.group(1)) + 5:  # the client reads some of the continuation, then hangs up
            events += has_content(next(lines))
        survivor = upstreams[survivor_id]
        assert _metric(survivor, "requests_processing") == 1, "the survivor generates the continuation"
    # leaving the block closed the client's connection while the survivor was generating for it
    hung_up = time.monotonic()
    survivor_node = ids[survivor_id]
    survivor_node.wait_for("the survivor idle", lambda s: _metric(survivor, "requests_processing") == 0, timeout=60)
    done = _metric(survivor, "n_decode_total") - decoded[survivor_id]
    print(f"\nhung up during the failover → the survivor idle after {time.monotonic() - hung_up:.2f} s, "
          f"{done:.0f}/{LONG_TOKENS} decoded there")  # fmt: skip
    assert done < LONG_TOKENS / 2, f"the survivor decoded {done:.0f} tokens for a client that had gone"
    survivor_node.wait_for("nothing in flight", lambda s: survivor_node.model(s, SMOLLM)["in_flight"] == 0, timeout=30)  # type: ignore[index]
    c.wait_for("C counts it", lambda s: total(mesh_metrics(c), "mesh_llm_requests_total", result="cancelled")
               > total(before, "mesh_llm_requests_total", result="cancelled"), timeout=30)  # fmt: skip
    after = mesh_metrics(c)
    assert total(after, "mesh_llm_requests_in_flight", model=SMOLLM) == 0
    assert total(after, "mesh_llm_requests_total", model=SMOLLM, result="cancelled") == 1
    assert total(after, "mesh_llm_requests_total", model=SMOLLM, result="ok") == total(
        before, "mesh_llm_requests_total", model=SMOLLM, result="ok"
    )
    assert total(after, "mesh_llm_failovers_total", model=SMOLLM, stage="mid_stream") == 1
    settled = _metric(survivor, "n_decode_total")  # and nothing more is decoded afterwards
    assert _metric(survivor, "requests_processing") == 0 and _metric(survivor, "n_decode_total") == settled

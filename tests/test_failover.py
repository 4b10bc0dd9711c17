"""Issue 18: a streamed answer survives the death of the node generating it. Real processes: A and B serve SmolLM2
(two replicas, one thread each), C is a client that takes the request; the node C routed the stream to is killed
with SIGKILL mid-answer, and C goes on on the other server from the text already sent (api/resume.py). At
temperature 0 the client's text is the uninterrupted run's — over the official openai and anthropic SDKs.
"""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import SMOLLM
from tests.harness import NodeProcess
from tests.security.test_dead_peer import kill_node
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

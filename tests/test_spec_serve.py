"""Speculative decoding end to end with real nodes and llama-servers (issue 21): SmolLM2 drafting for itself (the
same vocabulary: nearly every proposal accepted) gives, at temperature 0, the answers of a node without a draft —
solo and through a 2-node split whose draft runs on the host, not over RPC; llama-server's draft counts
(`timings.draft_n`, `draft_n_accepted`) reach the client through the proxy and through another node's tunnel; a
draft with another tokenizer is refused before launch and the model serves without it; and the controller, left to
itself, measures every mode and keeps the one that measured fastest, with its numbers in `/api/status`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import SMOLLM
from tests.ggufgen import write_dense
from tests.harness import NodeProcess, post_served

pytestmark = pytest.mark.slow
Spawn = Callable[..., NodeProcess]
PROMPTS = ["Write a Python function that adds two numbers.", "Name three colours.", "What is a lighthouse?"]
TOKENS = 32
FORCE = {"MESH_LLM_SPEC_FORCE": "1"}
NO_REPACK = "--llama-arg=--no-repack"  # solo and split compute alike (see test_split's reference)


def chat(node: NodeProcess, prompt: str) -> dict[str, Any]:
    body = {"model": SMOLLM, "messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS}
    body |= {"temperature": 0, "cache_prompt": False}
    r = post_served(node.api + "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def text(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"])


def streamed_timings(node: NodeProcess, prompt: str) -> dict[str, Any]:
    body = {"model": SMOLLM, "messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS}
    body |= {"temperature": 0, "stream": True}
    with httpx2.stream("POST", node.api + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return next(e["timings"] for e in reversed(events) if "timings" in e)


def cmdline(node: NodeProcess) -> list[str]:
    """The command line of the llama-server serving SmolLM2 on `node` now."""
    pid = node.wait_model_state(SMOLLM, "serving")["pid"]
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def drafted_well(timings: dict[str, Any]) -> bool:
    """The draft proposed tokens and (the target itself drafting) nearly all were accepted."""
    return timings.get("draft_n", 0) > 0 and timings["draft_n_accepted"] >= 0.8 * timings["draft_n"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, test_models_dir: Path) -> list[str]:
    """The reference: SmolLM2 solo, no speculation."""
    node = NodeProcess(
        home=tmp_path_factory.mktemp("plain"),
        args=["--model", SMOLLM, "--no-draft", NO_REPACK],
        env={"MESH_LLM_MODELS": str(test_models_dir)},
    ).start()
    try:
        model = node.wait_model_state(SMOLLM, "serving", timeout=240)
        assert model["speculation"]["why"] == "off: --no-draft"
        return [text(chat(node, p)) for p in PROMPTS]
    finally:
        node.stop()


def test_drafting_solo_answers_as_without_and_its_counts_reach_clients_through_the_tunnel(
    spawn: Spawn, smollm: Path, plain: list[str]
) -> None:
    host = spawn("--mesh-host", "127.0.0.2", "--model", SMOLLM, "--draft", str(smollm), NO_REPACK, env=FORCE)
    model = host.wait_model_state(SMOLLM, "serving", timeout=240)
    assert model["speculation"]["mode"] == "draft" and model["speculation"]["on"] is True
    args = cmdline(host)
    assert args[args.index("--spec-type") + 1] == "draft-simple" and str(smollm) in args
    answers = [chat(host, p) for p in PROMPTS]
    assert [text(a) for a in answers] == plain  # greedy verification is lossless
    assert all(drafted_well(a["timings"]) for a in answers), [a["timings"] for a in answers]
    # through another node: its proxy, the mesh tunnel, the host's proxy, llama-server — and back
    token = host.wait_for("token", lambda s: bool(s.get("invite_token")))["invite_token"]
    client = spawn("--mesh-host", "127.0.0.3", "--client", "--join", token, name="client")
    client.wait_for("the host's model", lambda s: any(m["name"] == SMOLLM for m in s["mesh"]["models"]), 60)
    through = chat(client, PROMPTS[0])
    assert text(through) == plain[0] and drafted_well(through["timings"]), through
    assert drafted_well(streamed_timings(client, PROMPTS[1]))


def test_a_split_drafts_on_its_host_and_answers_as_without(spawn: Spawn, smollm: Path, plain: list[str]) -> None:
    host = spawn("--mesh-host", "127.0.0.2", "--model", SMOLLM, "--split", "2", "--draft", str(smollm), env=FORCE)
    token = host.wait_for("token", lambda s: bool(s.get("invite_token")), timeout=60)["invite_token"]
    spawn("--mesh-host", "127.0.0.3", "--join", token, "--name", "w1", name="w1")
    model = host.wait_model_state(SMOLLM, "serving", timeout=240)
    assert model["placement"]["kind"] == "split" and model["speculation"]["mode"] == "draft"
    args = cmdline(host)
    assert "--rpc" in args and args[args.index("--spec-draft-device") + 1] == "none"  # the draft stays on the host
    answers = [chat(host, p) for p in PROMPTS]
    assert [text(a) for a in answers] == plain
    assert all(drafted_well(a["timings"]) for a in answers), [a["timings"] for a in answers]


def test_a_split_host_switches_modes_by_relaunching_and_ends_serving_its_choice(spawn: Spawn, smollm: Path) -> None:
    """The controller on a split: each switch drains the host's llama-server and relaunches it on the same workers
    (their rpc-servers and the relays stay); the model serves again after every one, in the mode it chose."""
    host = spawn("--mesh-host", "127.0.0.2", "--model", SMOLLM, "--split", "2", "--draft", str(smollm))
    token = host.wait_for("token", lambda s: bool(s.get("invite_token")), timeout=60)["invite_token"]
    spawn("--mesh-host", "127.0.0.3", "--join", token, "--name", "w1", name="w1")

    def settled(s: dict[str, Any]) -> bool:
        m = host.model(s, SMOLLM) or {}
        spec = m.get("speculation") or {}
        return m.get("state") == "serving" and bool(spec.get("chosen")) and spec["mode"] == spec["chosen"]

    model = host.model(host.wait_for("a decision, served", settled, timeout=400), SMOLLM) or {}
    assert model["placement"]["kind"] == "split" and set(model["speculation"]["decided_on"]) == {
        "off",
        "draft",
        "ngram",
    }
    host.wait_log(f"speculation for {SMOLLM}: off -> draft")
    host.wait_log(f"speculation for {SMOLLM}: draft -> ngram")
    # the relaunches reused the worker's lease: fewer leases than launches (a re-plan under load leases again, and
    # calibrates again, launching three servers)
    log = host.log()
    assert log.count(" holds layers ") < len(re.findall(r"llama-server pid \d+ serving with", log))
    args = cmdline(host)
    assert "--rpc" in args and ("--spec-type" in args) is (model["speculation"]["chosen"] != "off")
    assert text(chat(host, PROMPTS[0]))


def test_a_draft_with_another_tokenizer_is_refused_and_the_model_serves_without(
    spawn: Spawn, tmp_path: Path, plain: list[str]
) -> None:
    other = write_dense(tmp_path / "other-vocab.gguf", 1, 64)
    node = spawn("--model", SMOLLM, "--draft", str(other), NO_REPACK)
    model = node.wait_model_state(SMOLLM, "serving", timeout=240)
    why = model["speculation"]["why"]
    assert model["speculation"]["on"] is False and "does not share the tokenizer" in why and "other-vocab" in why
    assert "--spec-type" not in cmdline(node)
    node.wait_log("speculation for .*does not share the tokenizer")
    answer = chat(node, PROMPTS[0])
    assert text(answer) == plain[0] and "draft_n" not in answer["timings"]
    # a hostile client asking for speculation (llama.cpp's per-request fields) changes nothing: this llama-server
    # compiles them out, and the node's decision stays the node's
    body = {"model": SMOLLM, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": TOKENS}
    body |= {"temperature": 0, "cache_prompt": False, "speculative.type": "ngram-simple", "speculative.n_max": 1 << 30}
    r = post_served(node.api + "/v1/chat/completions", body)
    assert r.status_code == 200 and text(r.json()) == plain[0] and "draft_n" not in r.json()["timings"]
    assert (node.model(node.status(), SMOLLM) or {})["speculation"]["on"] is False


def test_the_controller_measures_every_mode_and_serves_the_fastest(spawn: Spawn, smollm: Path) -> None:
    node = spawn("--model", SMOLLM, "--draft", str(smollm))
    decided = node.wait_for(
        "a decision", lambda s: bool(((node.model(s, SMOLLM) or {}).get("speculation") or {}).get("chosen")), 400
    )
    spec = (node.model(decided, SMOLLM) or {})["speculation"]
    basis, chosen = spec["decided_on"], spec["chosen"]
    assert set(basis) == {"off", "draft", "ngram"}, spec  # each measured by the calibration, none assumed
    assert spec["acceptance"]["draft"] >= 0.8, spec  # the target drafting for itself
    if chosen == "off":
        assert spec["why"].startswith("off:") and all(basis[m] < 1.03 * basis["off"] for m in ("draft", "ngram"))
    else:
        assert basis[chosen] >= 1.03 * basis["off"] and basis[chosen] == max(basis.values()), spec
    served = node.wait_for(
        "the chosen mode serving",
        lambda s: (
            (m := node.model(s, SMOLLM)) is not None and m["state"] == "serving" and m["speculation"]["mode"] == chosen
        ),
    )
    assert (node.model(served, SMOLLM) or {})["speculation"]["on"] is (chosen != "off")
    args = cmdline(node)
    kind = {"off": None, "draft": "draft-simple", "ngram": "ngram-simple"}[chosen]
    assert (args[args.index("--spec-type") + 1] if "--spec-type" in args else None) == kind
    node.wait_log(f"speculation for {SMOLLM}: .* -> ")  # the switches are logged with the reason

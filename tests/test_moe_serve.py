"""Expert shards end to end on one machine: a generated mixture-of-experts model forced (`--split 3`) over three
real nodes with capped capacity, so each shard holds half the experts. Every shard is scored against the full model
before anything is routed to it; sessions are hashed to one shard and stay there; a generated token moves no byte
between nodes; a model whose shards fail the quality gate is served as a pipeline split instead; a stream whose
shard node dies goes on on another shard."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference.gguf_facts import read_facts
from inference.llamacpp import LlamaCpp
from inference.moe_plan import expert_bytes
from tests.ggufgen import write_skewed_moe
from tests.harness import NodeProcess, post_served
from tests.test_moe_shard import PROMPTS, completions, tiny

pytestmark = pytest.mark.slow
Spawn = Callable[..., NodeProcess]
CTX, SLOTS = 256, 1
PROMPT, STREAM_CTX, STREAM_TOKENS = "the thin", 512, 448
KILL_AT, KILL_TICKS = 8, 5  # a shard frozen after KILL_AT text events or 5 ticks of CPU (~15 of its ~450 tokens)


def capacity_gb(model: Path, experts: int, ctx: int = CTX) -> str:
    """--max-vram (GiB) under which a node holds exactly `experts` experts per layer of `model`."""
    sizes = expert_bytes(read_facts(model), ctx, SLOTS)
    cap = sizes.shard_need(experts) + sizes.expert_bytes // 2
    assert sizes.experts_that_fit(cap) == experts
    return f"{cap / 2**30:.9f}"


def node_args(models: Path, model: Path, experts: int, ctx: int = CTX) -> list[str]:
    return [
        "--models-dir", str(models), "--max-vram", capacity_gb(model, experts, ctx), "--threads", "1",
        "--ctx-size", str(ctx), "--parallel", str(SLOTS),
    ]  # fmt: skip


def start_mesh(
    spawn: Spawn, model: Path, n: int, experts: int, split: int | None = None, ctx: int = CTX
) -> tuple[NodeProcess, list[NodeProcess]]:
    """A coordinator serving `model` with `--split` (default n) and n − 1 members, all capped to hold `experts`."""
    args = node_args(model.parent, model, experts, ctx)
    forced = str(split or n)
    host = spawn(
        "--mesh-host", "127.0.0.2", "--model", str(model), "--split", forced, *args, "--name", "host", name="host"
    )
    token = host.wait_for("token", lambda s: bool(s.get("invite_token")), timeout=60)["invite_token"]
    workers = []
    for i in range(1, n):
        w = spawn("--mesh-host", f"127.0.0.{2 + i}", "--join", token, *args, "--name", f"w{i}", name=f"w{i}")
        workers.append(w)
    for w in workers:
        w.wait_for("joined", lambda s: len(s.get("peers", [])) >= n, timeout=60)
    return host, workers


def complete(node: NodeProcess, prompt: str, user: str, n: int = 24) -> tuple[str, str]:
    """(text, the node that answered) — the same request `completions` makes, with a session key."""
    body = {"model": "moe", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "user": user}
    r = post_served(node.api + "/v1/completions", body)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"]), r.headers["x-mesh-node"]


def status(node: NodeProcess) -> dict[str, Any]:
    with urllib.request.urlopen(node.console + "/api/status", timeout=10) as r:
        return dict(json.load(r))


def test_three_expert_shards_answer_like_the_full_model_with_no_traffic_per_token(
    spawn: Spawn, llama: LlamaCpp, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    m = tiny(models / "moe.gguf", "qwen3moe")  # 16 experts per layer, top-2, 4 hot ones that win every routing
    full = completions(llama, m.path)
    host, workers = start_mesh(spawn, m.path, 3, experts=8)
    model = host.wait_model_state("moe", "serving", timeout=300)
    placement = model["placement"]
    assert placement["kind"] == "expert-shards" and placement["experts_per_shard"] == 8
    shards = placement["shards"]
    ids = {n.status()["node_id"]: n for n in [host, *workers]}
    assert shards[0]["node_id"] == host.status()["node_id"] and {s["node_id"] for s in shards} == set(ids)
    for s in shards:  # every shard was scored against the full model before serving, and passed
        assert s["passed"] and s["quality"]["agreement"] == 1.0 and s["quality"]["positions"] > 0, s
    for w in workers:
        mine = w.model(w.status(), "moe")
        assert mine is not None and mine["state"] == "serving" and mine["placement"]["kind"] == "expert-shard"
        assert w.wait_log(r"expert shard \d/3 of moe for \w+: top-1 agreement 100\.0%")
    host.wait_log(r"shard 3/3 on \w+: top-1 agreement")
    for n in (host, *workers):  # measured once, on the coordinator; every shard node keeps a copy
        cached = {p.name.split(".", 1)[1] for p in (n.home / "moe-stats").glob("*.json")}
        assert cached == {"json", "reference.json"}, cached
    for n in (host, *workers):  # every node sees every shard serving (gossip), so all rank the same servers
        n.wait_for("3 shards", lambda s: sum("moe" in p.get("serving", []) for p in s["peers"]) == 3, timeout=30)
    # the coordinator kept the hot experts (the most-used) on every shard: each answers like the full model
    seen: dict[str, str] = {}
    for i, (prompt, (text, _)) in enumerate(zip(PROMPTS * 3, full * 3, strict=True)):
        got, served_by = complete(workers[i % 2], prompt, user=f"user{i}")
        assert got == text, f"{prompt!r} on {served_by}"
        seen[f"user{i}"] = served_by
    assert len(set(seen.values())) >= 2, f"sessions are spread over the shards: {seen}"
    # a session stays on its shard, whichever node it enters by
    for user, node_id in seen.items():
        for entry in (host, *workers):
            assert complete(entry, "abc", user=user, n=2)[1] == node_id
    # nothing crosses the network per token: a long answer served where it enters moves no more than a short one
    host_id = host.status()["node_id"]
    local_user = next((u for u, n in seen.items() if n == host_id), None)
    assert local_user is not None, seen
    before = status(host)["traffic"]
    text, by = complete(host, "the thin", user=local_user, n=192)
    after = status(host)["traffic"]
    assert by == host_id and len(text) > 0
    moved = after["quic_bytes_in"] + after["quic_bytes_out"] - before["quic_bytes_in"] - before["quic_bytes_out"]
    n_embd = read_facts(m.path).n_embd
    assert moved < 192 * n_embd * 4 / 4, f"{moved} bytes crossed while generating 192 tokens (gossip only expected)"
    for n in (host, *workers):
        t = status(n)["traffic"]
        assert t.get("rpc_bytes_in", 0) == 0 and t.get("rpc_bytes_out", 0) == 0, t


def test_shards_below_the_quality_gate_are_never_served_and_the_model_is_split_by_layers(
    spawn: Spawn, tmp_path: Path
) -> None:
    """Two shards of 9 of 16 experts leave room to replicate only 2 of the 4 hot experts every token uses: each lacks
    some of them and answers differently from the full model — the gate refuses both, the node falls back."""
    models = tmp_path / "models"
    models.mkdir()
    m = tiny(models / "moe.gguf", "qwen3moe")
    host, workers = start_mesh(spawn, m.path, 2, experts=9)
    model = host.wait_model_state("moe", "serving", timeout=300)
    assert model["placement"]["kind"] == "split", model["placement"]
    host.wait_log(r"fails the quality gate .*; serving it as a pipeline split instead")
    for w in workers:
        assert w.wait_log(r"expert shard 2/2 of moe for \w+: .* REFUSED")
        assert "serving sessions the mesh routes here" not in w.log()
    assert complete(workers[0], "the thin", user="u", n=4)[0]


def test_a_dead_shard_node_is_replaced_while_the_other_shards_keep_serving(spawn: Spawn, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    m = tiny(models / "moe.gguf", "qwen3moe")
    host, workers = start_mesh(spawn, m.path, 3, experts=10, split=2)  # 2 shards of 10: the 4 hot ones on both
    shards = host.wait_model_state("moe", "serving", timeout=300)["placement"]["shards"]
    host_id = host.status()["node_id"]
    host_pid = host.model(host.status(), "moe")["pid"]  # type: ignore[index]
    by_id = {w.status()["node_id"]: w for w in workers}
    victim_id = shards[1]["node_id"]
    spare_id = next(i for i in by_id if i != victim_id)
    victim = by_id[victim_id]
    assert victim.proc is not None
    os.killpg(victim.proc.pid, signal.SIGKILL)
    # sessions keep being answered meanwhile: the dead shard is skipped (then forgotten), by the coordinator's shard
    # or, once it has taken over, the spare's
    for i in range(6):
        assert complete(host, "the thin", user=f"during{i}", n=4)[1] in (host_id, spare_id)
    host.wait_log(rf"shard node {victim_id} \(shard 2/2\) is gone; its sessions move to the other shards", timeout=30)
    host.wait_log(rf"shard 2/2 now on {spare_id} \(top-1 agreement 1\.000", timeout=120)
    model = host.model(host.status(), "moe")
    assert model is not None and model["state"] == "serving" and model["pid"] == host_pid, "the host's shard stayed up"
    assert [s["node_id"] for s in model["placement"]["shards"]] == [host_id, spare_id]
    assert all(s["passed"] for s in model["placement"]["shards"])
    by_id[spare_id].wait_for("2 shards", lambda s: sum("moe" in p.get("serving", []) for p in s["peers"]) == 2, 30)
    served_by = {complete(by_id[spare_id], "the thin", user=f"after{i}", n=4)[1] for i in range(8)}
    assert served_by <= {spare_id, host_id} and spare_id in served_by, served_by


def cpu_ticks(pid: int) -> int:
    """CPU time a process has used, in clock ticks (user + system: /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class MidAnswerKill:
    """Kills `node` (kill -9, its llama-server with it) while its llama-server is in the middle of an answer: frozen
    (SIGSTOP) once it has worked `ticks` clock ticks of CPU on it (a few tokens; the whole answer takes far more)
    or the client has read `after` text events, whichever comes first; killed once the client has read one. The
    freeze makes the answer's end impossible before the kill: timed by the client's events alone, on a loaded
    machine the kill can come after the server had finished and the entry node had every byte (the nodes relay
    faster than a starved client reads). The server's own CPU time, not its answers, tells its progress: a frozen
    server answers nothing. The CPU budget counts from the client's first text event: counted from before, a loaded
    server's idle threads (its poll after the previous answer, a metrics scrape) could spend it before the server
    sent a token, and the node was killed before the client had read any of the answer."""

    def __init__(self, node: NodeProcess, after: int, ticks: int) -> None:
        assert node.proc is not None
        self.node, self.after = node, after
        self.pid = node.model(node.status(), "moe")["pid"]  # type: ignore[index]
        self.ticks = ticks
        self.read = 0  # text events the client has read
        self.started = threading.Event()  # it has read one
        self.lock = threading.Lock()
        self.frozen = False
        self.events = -1  # text events the client had read when the node was killed
        self.killed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def saw(self, events: int) -> None:
        """The client has read `events` text events."""
        self.read = events
        self.started.set()
        if events >= self.after:
            self._freeze()
        if self.frozen:
            self._kill(events)

    def _kill(self, events: int) -> None:
        with self.lock:
            if self.events < 0:
                self.events = events
                os.killpg(self.node.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
                self.killed.set()

    def _freeze(self) -> None:
        with self.lock:
            if not self.frozen:
                os.kill(self.pid, signal.SIGSTOP)
                self.frozen = True

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        self.started.wait(60)
        until = cpu_ticks(self.pid) + self.ticks
        while not self.frozen and cpu_ticks(self.pid) < until and time.monotonic() < deadline:
            time.sleep(0.001)  # a poll of the server's CPU time, ~1 ms apart
        self._freeze()
        if not self.killed.wait(30):  # the client read nothing more: killed all the same, with what it has
            self._kill(self.read)


def stream(node: NodeProcess, prompt: str, user: str, n: int, kill: MidAnswerKill | None = None) -> tuple[str, str]:
    """(text, the node that answered) of a streamed greedy completion through `node`, told to `kill` as it reads.
    One answer: one id, closed by `[DONE]`."""
    body = {"model": "moe", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "user": user,
            "stream": True}  # fmt: skip
    text, events, ids, done = "", 0, set(), False
    with httpx2.stream("POST", node.api + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        served_by = r.headers["x-mesh-node"]
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            assert not done, f"data after [DONE]: {line!r}"
            if line == "data: [DONE]":
                done = True
                continue
            obj = json.loads(line[6:])
            assert "error" not in obj, obj
            ids.add(obj["id"])
            if piece := obj["choices"][0]["text"]:
                text += piece
                events += 1
                if kill is not None:
                    kill.saw(events)
    assert done and len(ids) == 1, (done, ids)
    return text, served_by


def test_a_stream_goes_on_when_its_expert_shard_node_is_killed(spawn: Spawn, tmp_path: Path) -> None:
    """A session's shard node dies mid-answer: the entry node goes on from the text already sent, on the shard that
    remains (the coordinator's) or on the dead shard's replacement — each answers like the full model, so the client's
    text is the uninterrupted run's."""
    models = tmp_path / "models"
    models.mkdir()
    # Wider than `tiny`, so that its answer takes seconds (~300 tokens/s with one thread, against thousands): the
    # shard node is caught mid-answer (`MidAnswerKill`). A seed whose greedy answer to PROMPT one llama-server
    # continues from its first 5 to 100 tokens' text to the same 448 tokens: a continuation is asked with the text
    # so far, so a byte token ("\ufffd") or a near-tie that batched prompt processing flips would make even a
    # server's own continuation differ (seeds 1 and 5 do: not the mesh's doing)
    m = write_skewed_moe(models / "moe.gguf", "qwen3moe", 6, 512, 16, n_ff=128, seed=3)
    # 2 shards of 10 (the 4 hot ones on both)
    host, workers = start_mesh(spawn, m.path, 3, experts=10, split=2, ctx=STREAM_CTX)
    shards = host.wait_model_state("moe", "serving", timeout=300)["placement"]["shards"]
    by_id = {w.status()["node_id"]: w for w in workers}
    victim_id = shards[1]["node_id"]
    host.wait_for("2 shards", lambda s: sum("moe" in p.get("serving", []) for p in s["peers"]) == 2, timeout=30)
    user = next(u for u in (f"user{i}" for i in range(64)) if complete(host, "abc", user=u, n=2)[1] == victim_id)
    reference, first = stream(host, PROMPT, user, STREAM_TOKENS)  # the uninterrupted run, on the victim's shard
    assert first == victim_id and len(reference) > 4 * KILL_AT
    kill = MidAnswerKill(by_id[victim_id], after=KILL_AT, ticks=KILL_TICKS)
    text, served_by = stream(host, PROMPT, user, STREAM_TOKENS, kill)
    assert kill.events > 0, "the shard node was killed once the client had read some of the answer"
    # It goes on where the session's shard is now: on the coordinator (it holds the other shard), or on the spare
    # node when the dead shard was re-placed there first (both answer like the full model; under load either wins).
    went_on = host.wait_log(r"a stream of moe goes on on node ([0-9a-f]{16}) after (\d+) tokens", 5)
    assert went_on.group(1) in {host.status()["node_id"], *by_id} - {victim_id}, went_on.group(0)
    print(
        f"\nshard node killed after {kill.events} text events read; the stream went on on {went_on.group(1)} after "
        f"{went_on.group(2)} tokens"
    )
    assert served_by == victim_id
    at = next(
        (i for i, (x, y) in enumerate(zip(text, reference, strict=False)) if x != y), min(len(text), len(reference))
    )
    assert text == reference, (
        f"differs at {at} of {len(reference)}: {text[at - 20 : at + 20]!r} != {reference[at - 20 : at + 20]!r}"
    )
    with urllib.request.urlopen(host.console + "/metrics", timeout=10) as r:
        found = [s for f in text_string_to_metric_families(r.read().decode()) for s in f.samples]
    assert [s.value for s in found if s.name == "mesh_llm_failovers_total" and s.labels["stage"] == "mid_stream"] == [1]

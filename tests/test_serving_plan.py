"""The serving planner (`mesh_mcp/serving/plan.py`): which way a node serves a model, from facts it is given —
table-driven over the outcomes, and properties over random capacities (hypothesis)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.gguf_facts import GGUFFacts, read_facts
from inference.memory_model import memory_need
from inference.placement import NodeCap
from mesh_mcp.serving.plan import ExpertShards, Flags, PipelineSplit, Solo, Standby, ThisNode, decide
from tests.ggufgen import write_dense, write_moe

FLAGS = Flags(ctx_per_slot=512, slots=1)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> GGUFFacts:
    return read_facts(write_dense(tmp_path_factory.mktemp("plan") / "dense.gguf", 8, 64, 1000))


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> GGUFFacts:
    """Weights outweigh compute buffers: two nodes of 3/4 of the need can split it."""
    return read_facts(write_dense(tmp_path_factory.mktemp("plan") / "wide.gguf", 12, 384, 1000))


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> GGUFFacts:
    return read_facts(write_moe(tmp_path_factory.mktemp("plan") / "moe.gguf", 4, 64, n_expert=4))


def need(facts: GGUFFacts, flags: Flags = FLAGS) -> int:
    return memory_need(facts, flags.ctx_per_slot, flags.slots).total


def node(capacity: int, *, in_mesh: bool = True, gpus: int = 0, backend: str = "cpu", client: bool = False) -> ThisNode:
    return ThisNode("a" * 16, capacity, gpus=gpus, backend=backend, in_mesh=in_mesh, client=client)


def peer(node_id: str, capacity: int, rtt_ms: float = 5.0) -> NodeCap:
    return NodeCap(node_id, capacity, rtt_ms={"a" * 16: rtt_ms})


@pytest.mark.parametrize(
    ("case", "kind"),
    [
        ("fits, in a mesh", Solo),
        ("fits, alone", Solo),
        ("too big, alone", Solo),  # nobody to share it with: try here, llama-server says if it cannot load
        ("too big, in a mesh", PipelineSplit),
        ("fits, --split 2", PipelineSplit),
        ("moe too big", ExpertShards),
        ("moe --split 2", ExpertShards),
        ("moe too big, shards refused", PipelineSplit),
        ("no model, member", Standby),
        ("no model, alone", Standby),
        ("client", Standby),
    ],
)
def test_outcomes(case: str, kind: type, dense: GGUFFacts, moe: GGUFFacts) -> None:
    big, small = 10 * need(dense), need(dense) // 2
    moe_small = need(moe) // 2
    cases = {
        "fits, in a mesh": lambda: decide("d", dense, node(big), FLAGS),
        "fits, alone": lambda: decide("d", dense, node(big, in_mesh=False), FLAGS),
        "too big, alone": lambda: decide("d", dense, node(small, in_mesh=False), FLAGS),
        "too big, in a mesh": lambda: decide("d", dense, node(small), FLAGS),
        "fits, --split 2": lambda: decide("d", dense, node(big), Flags(split=2, ctx_per_slot=512, slots=1)),
        "moe too big": lambda: decide("m", moe, node(moe_small), FLAGS),
        "moe --split 2": lambda: decide("m", moe, node(10 * need(moe)), Flags(split=2, ctx_per_slot=512, slots=1)),
        "moe too big, shards refused": lambda: decide("m", moe, node(moe_small), FLAGS, shards_refused="gate"),
        "no model, member": lambda: decide(None, None, node(big), FLAGS),
        "no model, alone": lambda: decide(None, None, node(big, in_mesh=False), FLAGS),
        "client": lambda: decide("d", dense, node(big, client=True), FLAGS),
    }
    plan = cases[case]()
    assert isinstance(plan, kind), (case, plan)
    assert plan.reasons and all(isinstance(r, str) and r for r in plan.reasons)


def test_solo_says_why_and_predicts(dense: GGUFFacts) -> None:
    plan = decide("d", dense, node(10 * need(dense)), FLAGS)
    assert isinstance(plan, Solo)
    assert plan.reasons[0].startswith("solo on this node: it needs")
    assert plan.predicted_tok_s is not None and plan.predicted_tok_s > 0
    assert plan.gpu_layers == 0


def test_gpu_layers_need_gpus_and_a_gpu_build(dense: GGUFFacts) -> None:
    cap = 10 * need(dense)
    on_gpu = decide("d", dense, node(cap, gpus=1, backend="cuda"), FLAGS)
    assert isinstance(on_gpu, Solo) and on_gpu.gpu_layers == 999 and "1 GPU(s)" in on_gpu.reasons[0]
    gpu_on_cpu_build = decide("d", dense, node(cap, gpus=1, backend="cpu"), FLAGS)
    assert isinstance(gpu_on_cpu_build, Solo) and gpu_on_cpu_build.gpu_layers == 0


def test_too_big_alone_says_so(dense: GGUFFacts) -> None:
    plan = decide("d", dense, node(need(dense) // 2, in_mesh=False), FLAGS)
    assert isinstance(plan, Solo) and "in no mesh" in plan.reasons[0]
    assert plan.predicted_tok_s is None  # placement finds no fit: no estimate


def test_split_predicts_from_the_mesh_view(wide: GGUFFacts) -> None:
    dense, half = wide, need(wide) * 3 // 4
    alone = decide("d", dense, node(half), FLAGS)
    assert isinstance(alone, PipelineSplit) and alone.predicted_tok_s is None  # nobody to split with yet
    assert alone.reasons[0].startswith("too big for this node")
    with_peer = decide("d", dense, node(half), FLAGS, [peer("b" * 16, half)])
    assert isinstance(with_peer, PipelineSplit) and with_peer.predicted_tok_s is not None
    far = decide("d", dense, node(half), FLAGS, [peer("b" * 16, half, rtt_ms=500)])
    assert isinstance(far, PipelineSplit) and far.predicted_tok_s is None  # beyond the RTT cap


def test_refused_shards_carry_the_reason(moe: GGUFFacts) -> None:
    plan = decide("m", moe, node(need(moe) // 2), FLAGS, shards_refused="shard 1 failed the quality gate")
    assert isinstance(plan, PipelineSplit)
    assert plan.reasons[-1] == "expert shards refused: shard 1 failed the quality gate"


def test_standby_says_what_it_lends(dense: GGUFFacts) -> None:
    member = decide(None, None, node(1), FLAGS)
    assert isinstance(member, Standby) and member.lends_capacity
    assert "offering this node's capacity" in member.reasons[0]
    client = decide("d", dense, node(1, client=True), FLAGS)
    assert isinstance(client, Standby) and not client.lends_capacity
    alone = decide(None, None, node(1, in_mesh=False), FLAGS)
    assert isinstance(alone, Standby) and not alone.lends_capacity


@settings(max_examples=60, deadline=None)
@given(
    cap_frac=st.floats(0.05, 20),
    in_mesh=st.booleans(),
    split=st.sampled_from([None, 2, 3]),
    peers=st.lists(st.tuples(st.floats(0.05, 5), st.floats(0.1, 200)), max_size=5),
)
def test_properties(
    dense: GGUFFacts, cap_frac: float, in_mesh: bool, split: int | None, peers: list[tuple[float, float]]
) -> None:
    """Whatever the capacities: a dense model is never expert-sharded; it is solo exactly when there is no mesh or
    it fits with no --split; a split's prediction never beats the same model alone on a node that fits it; the
    decision does not depend on the order of the view."""
    total = need(dense)
    flags = Flags(split=split, ctx_per_slot=512, slots=1)
    me = node(int(total * cap_frac), in_mesh=in_mesh)
    view = [peer(f"{i:016x}", int(total * f), rtt) for i, (f, rtt) in enumerate(peers, start=1)]
    plan = decide("d", dense, me, flags, view)
    assert not isinstance(plan, (ExpertShards, Standby))
    fits = total <= me.capacity_bytes
    assert isinstance(plan, Solo) == (not in_mesh or (split is None and fits))
    assert decide("d", dense, me, flags, list(reversed(view))) == plan
    if isinstance(plan, PipelineSplit) and plan.predicted_tok_s is not None:
        alone = decide("d", dense, node(10 * total), FLAGS)
        assert alone.predicted_tok_s is not None and plan.predicted_tok_s <= alone.predicted_tok_s


def test_moe_is_sharded_only_when_too_big_or_forced(moe: GGUFFacts) -> None:
    fits = decide("m", moe, node(10 * need(moe)), FLAGS)
    assert isinstance(fits, Solo)


def test_the_view_may_hold_this_node(wide: GGUFFacts) -> None:
    """The view may hold this node (the split runner's does, with the RTTs it measured): its capacity is ThisNode's,
    its RTT map is used."""
    half = need(wide) * 3 // 4
    me_in_view = NodeCap("a" * 16, 1, rtt_ms={"b" * 16: 5.0})
    plan = decide("d", wide, node(half), FLAGS, [me_in_view, NodeCap("b" * 16, half)])
    assert isinstance(plan, PipelineSplit) and plan.predicted_tok_s is not None


def test_paths_are_not_read(tmp_path: Path, dense: GGUFFacts) -> None:
    """Pure: the decision reads the facts it is given, not the file behind them."""
    from dataclasses import replace

    gone = replace(dense, path=tmp_path / "deleted.gguf")
    assert decide("d", gone, node(10 * need(dense)), FLAGS) == decide("d", dense, node(10 * need(dense)), FLAGS)

"""Expert-shard placement (inference/moe_plan.py): pure, from sizes and gossiped node capacities."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference.gguf_facts import read_facts
from inference.moe_plan import ExpertBytes, expert_bytes, plan_shards, spare_for
from inference.moe_shard import write_shard
from inference.placement import NodeCap
from tests.ggufgen import write_skewed_moe

MiB = 1 << 20
# 16 experts, top-2; the trunk + KV + compute need 100 MiB, each expert adds 10 MiB: the whole model 260 MiB.
SIZES = ExpertBytes(n_expert=16, n_expert_used=2, expert_bytes=10 * MiB, full_need=260 * MiB)


def node(node_id: str, mib: int, **kw: object) -> NodeCap:
    return NodeCap(node_id, mib * MiB, has_file=kw.pop("has_file", True), **kw)  # type: ignore[arg-type]


def test_experts_that_fit_follow_capacity() -> None:
    assert SIZES.experts_that_fit(99 * MiB) == 0
    assert SIZES.experts_that_fit(120 * MiB) == 2
    assert SIZES.experts_that_fit(185 * MiB) == 8
    assert SIZES.experts_that_fit(10_000 * MiB) == 16
    assert SIZES.shard_need(8) == 180 * MiB


def test_the_fewest_shards_that_place_every_expert_are_chosen() -> None:
    nodes = [node("me", 180), node("b", 180), node("c", 180), node("d", 180)]
    p = plan_shards("m", SIZES, nodes, me="me")
    assert p.kind == "shards" and p.nodes == ("me", "b") and p.per_shard == 8
    assert p.shard_bytes == 180 * MiB
    assert "2 expert shards of 8/16 experts per layer" in p.reasons[-1]


def test_k_is_the_least_any_chosen_node_holds_and_larger_nodes_come_first() -> None:
    nodes = [node("me", 160), node("small", 130), node("big", 220)]
    p = plan_shards("m", SIZES, nodes, me="me")
    # me holds 6, big 12, small 3: {me, big} gives 2 × 6 < 16; {me, big, small} gives 3 × 3 < 16: no plan.
    assert p.kind == "none"
    nodes = [node("me", 160), node("b", 160), node("big", 220)]
    p = plan_shards("m", SIZES, nodes, me="me")
    assert p.nodes == ("me", "big", "b") and p.per_shard == 6


def test_force_takes_exactly_n_shards_and_the_coordinator_is_first() -> None:
    nodes = [node("a", 500), node("me", 500), node("c", 500)]
    p = plan_shards("m", SIZES, nodes, me="me", force=3)
    assert p.nodes[0] == "me" and len(p.nodes) == 3 and p.per_shard == 16
    p = plan_shards("m", SIZES, nodes, me="me", force=4)
    assert p.kind == "none" and "4 shards asked, 3 node(s)" in p.reasons[-1]


def test_nodes_without_the_file_clients_and_other_builds_are_left_out() -> None:
    nodes = [
        node("me", 180, llama_cpp="A"),
        node("nofile", 900, has_file=False),
        node("client", 900, client=True),
        node("other", 900, llama_cpp="B"),
        node("ok", 180, llama_cpp="A"),
    ]
    p = plan_shards("m", SIZES, nodes, me="me", build="A")
    assert p.nodes == ("me", "ok")
    text = " ".join(p.reasons)
    assert "nofile does not have the model file" in text and "other runs llama.cpp B" in text
    assert "client" not in p.nodes


def test_too_few_experts_per_node_for_top_k_is_no_plan() -> None:
    nodes = [node("me", 110), node("b", 110), node("c", 110)]  # 1 expert each, 2 used per token
    p = plan_shards("m", SIZES, nodes, me="me")
    assert p.kind == "none" and "below the 2 used per token" in " ".join(p.reasons)


@given(
    caps=st.lists(st.integers(0, 400), min_size=1, max_size=8),
    force=st.one_of(st.none(), st.integers(1, 9)),
)
def test_a_plan_always_places_every_expert_within_capacity(caps: list[int], force: int | None) -> None:
    nodes = [node(f"n{i}", c) for i, c in enumerate(caps)]
    p = plan_shards("m", SIZES, nodes, me="n0", force=force)
    if p.kind == "none":
        return
    assert p.nodes[0] == "n0" and len(set(p.nodes)) == p.n_shards
    assert p.per_shard >= SIZES.n_expert_used and p.per_shard * p.n_shards >= SIZES.n_expert
    by_id = {n.node_id: n for n in nodes}
    assert all(SIZES.shard_need(p.per_shard) <= by_id[n].capacity_bytes for n in p.nodes)
    if force is not None:
        assert p.n_shards == force


def test_expert_bytes_from_a_real_gguf_match_what_the_shard_writer_removes(tmp_path: Path) -> None:
    m = write_skewed_moe(tmp_path / "m.gguf", "qwen3moe", 3, 64, 16, n_ff=64)
    facts = read_facts(m.path)
    sizes = expert_bytes(facts, 256, 1)
    assert sizes.n_expert == m.n_expert and sizes.n_expert_used == m.n_expert_used
    half = write_shard(m.path, [range(m.n_expert // 2)] * m.n_layers, tmp_path / "half.gguf")
    removed = facts.file_size - half.n_bytes
    # What the writer drops is (n − K) experts' bytes, up to per-tensor alignment padding.
    assert abs(removed - (m.n_expert // 2) * sizes.expert_bytes) <= 64 * 4 * m.n_layers


@pytest.mark.parametrize("force", [None, 2])
def test_the_coordinator_must_be_a_node(force: int | None) -> None:
    with pytest.raises(ValueError):
        plan_shards("m", SIZES, [node("a", 500)], me="me", force=force)


def test_a_spare_takes_over_a_shard_only_if_it_can_hold_it() -> None:
    nodes = [
        node("me", 180),
        node("b", 180),
        node("small", 120),
        node("nofile", 900, has_file=False),
        node("client", 900, client=True),
        node("other", 900, llama_cpp="B"),
        node("c", 200),
        node("d", 200),
    ]
    assert spare_for(SIZES, 8, nodes, taken={"me", "b"}, build="A") == "c"  # largest that fits, ties by id
    assert spare_for(SIZES, 8, nodes, taken={"me", "b", "c", "d"}, build="A") is None  # small holds 2, not 8
    assert spare_for(SIZES, 2, nodes, taken={"me", "b", "c", "d"}, build="A") == "small"

"""Expert assignment: worked examples, expert groups, infeasible requests, and properties over random routing
statistics (hypothesis): every expert somewhere, equal counts, top-k fits, the core everywhere, groups whole,
deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.moe_assign import Assignment, AssignmentError, assign
from mesh_mcp.errors import ModelError

MASS = np.array(
    [
        [90, 80, 5, 4, 3, 2, 1, 0],  # two experts take most of the mass
        [0, 1, 2, 3, 4, 5, 60, 70],
    ],
    dtype=float,
)


def covered(a: Assignment, layer: int) -> set[int]:
    return {e for shard in a.shards for e in shard[layer]}


def test_capacity_gives_the_largest_core_that_still_places_every_expert() -> None:
    a = assign(8, 2, MASS, 2, capacity=5)
    # 2 shards × 5 slots: a core of C leaves 2 × (5 − C) ≥ 8 − C → C = 2
    assert (a.per_shard, a.core) == (5, 2)
    assert all(set(shard[0]) >= {0, 1} and set(shard[1]) >= {6, 7} for shard in a.shards)
    assert covered(a, 0) == covered(a, 1) == set(range(8))
    # the rest is dealt heaviest first to the lighter shard: 2→s0, 3→s1, 4→s1 (4 < 5), 5→s0, 6→s0/… balanced
    assert a.shards[0][0] == (0, 1, 2, 5, 6) and a.shards[1][0] == (0, 1, 3, 4, 7)
    assert a.kept_mass[0][0] == pytest.approx((90 + 80 + 5 + 2 + 1) / 185)
    assert "the 2 most-used replicated on every shard, 6 dealt out (3 slots per shard)" in a.summary()


def test_core_gives_the_smallest_shard_that_places_every_expert() -> None:
    a = assign(8, 2, MASS, 3, core=2)
    assert (a.per_shard, a.core) == (4, 2)  # 2 + ⌈6 / 3⌉
    assert all(len(layer) == 4 for shard in a.shards for layer in shard)
    assert covered(a, 0) == set(range(8))


def test_spare_slots_take_the_next_most_used_experts() -> None:
    a = assign(8, 2, MASS, 2, capacity=6, core=2)  # 2 × 4 slots for 6 experts: 2 spare slots
    assert covered(a, 0) == set(range(8))
    for shard in a.shards:
        assert len(shard[0]) == 6 and {0, 1} <= set(shard[0])
    # dealt: s0 {2, 5, 6}, s1 {3, 4, 7}; each spare slot takes the heaviest non-core expert its shard lacks
    assert a.shards[0][0] == (0, 1, 2, 3, 5, 6) and a.shards[1][0] == (0, 1, 2, 3, 4, 7)


def test_one_shard_keeps_everything() -> None:
    a = assign(8, 2, MASS, 1, capacity=100)
    assert a.shards == ((tuple(range(8)), tuple(range(8))),) and a.core == 8


def test_expert_groups_are_ranked_replicated_and_dealt_whole() -> None:
    mass = np.zeros((1, 16))
    mass[0, 4:8] = 10  # group 1 is the hottest
    mass[0, 12:16] = 5  # then group 3
    a = assign(16, 4, mass, 2, capacity=12, n_group=4)  # 3 groups per shard: core 2 groups
    assert (a.per_shard, a.core) == (12, 8)
    for shard in a.shards:
        ids = shard[0]
        assert set(range(4, 8)) <= set(ids) and set(range(12, 16)) <= set(ids)
        assert {e // 4 for e in ids} == {e // 4 for e in ids} and len(ids) == 4 * len({e // 4 for e in ids})
    assert covered(a, 0) == set(range(16))


@pytest.mark.parametrize(
    ("n_shards", "kwargs", "message"),
    [
        (8, {"capacity": 1}, "each shard would keep 1 experts per layer, fewer than the 2 every token uses"),
        (2, {"capacity": 3, "core": 2}, "cannot hold all 8 experts: each shard needs room for 5"),
        (2, {"capacity": 3, "core": 4}, "a core of 4 experts does not fit a shard of 3"),
        (1, {"capacity": 6}, "1 shard\\(s\\) of 6 experts with a core of 6 cannot hold all 8 experts"),
    ],
)
def test_infeasible_requests_say_what_would_fit(n_shards: int, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(AssignmentError, match=message) as err:
        assign(8, 2, MASS, n_shards, **kwargs)
    assert isinstance(err.value, ModelError)


def test_group_sizes_must_be_whole() -> None:
    with pytest.raises(AssignmentError, match="capacity 6 is not a whole number of expert groups"):
        assign(16, 2, np.ones((1, 16)), 2, capacity=6, n_group=4)


@pytest.mark.parametrize(
    ("mass", "kwargs"),
    [
        (np.ones((2, 7)), {"capacity": 4}),  # wrong expert count
        (np.ones(8), {"capacity": 4}),  # not per layer
        (-np.ones((1, 8)), {"capacity": 4}),
        (np.full((1, 8), np.nan), {"capacity": 4}),
        (np.ones((1, 8)), {}),  # neither capacity nor core
        (np.ones((1, 8)), {"capacity": 0}),
    ],
)
def test_malformed_inputs_are_value_errors(mass: np.ndarray, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        assign(8, 2, mass, 2, **kwargs)


def test_nested_tuples_equal_numpy_and_zero_mass_ranks_by_id() -> None:
    rows = ((0.0,) * 8, tuple(float(x) for x in MASS[1]))
    a, b = assign(8, 2, rows, 2, capacity=5), assign(8, 2, np.array(rows), 2, capacity=5)
    assert a == b
    assert all({0, 1} <= set(shard[0]) for shard in a.shards), "ties go to the lower id"
    assert "no routing mass in layer(s) [0]" in a.summary()
    assert a.kept_mass[0][0] == 5 / 8


@st.composite
def problems(draw: st.DrawFn) -> tuple[int, int, np.ndarray, int, dict[str, int]]:
    n_group = draw(st.sampled_from([1, 1, 2, 4]))
    size = draw(st.integers(1, 8)) if n_group > 1 else 1
    n_expert = n_group * size if n_group > 1 else draw(st.integers(2, 40))
    units = n_expert // size
    used = draw(st.integers(1, n_expert))
    n_layers = draw(st.integers(1, 4))
    values = st.one_of(st.just(0.0), st.integers(0, 5).map(float), st.floats(0, 1e6))
    mass = np.array(
        draw(st.lists(st.lists(values, min_size=n_expert, max_size=n_expert), min_size=n_layers, max_size=n_layers))
    )
    n_shards = draw(st.integers(1, 6))
    min_k = -(-units // n_shards)  # room for every unit with no core
    k = draw(st.integers(max(min_k, -(-used // size)), units))
    if draw(st.booleans()):
        kwargs = {"capacity": k * size}
    else:
        kwargs = {"core": draw(st.integers(0, k)) * size}
    return n_expert, used, mass, n_shards, kwargs | {"n_group": n_group}


@settings(max_examples=300, deadline=None)
@given(problems())
def test_properties(problem: tuple[int, int, np.ndarray, int, dict[str, int]]) -> None:
    n_expert, used, mass, n_shards, kwargs = problem
    try:
        a = assign(n_expert, used, mass, n_shards, **kwargs)
    except AssignmentError as exc:  # only a core-given request may end below top-k
        assert "core" in kwargs and "every token uses" in str(exc)
        return
    assert a == assign(n_expert, used, mass.copy(), n_shards, **kwargs), "deterministic"
    size = n_expert // kwargs["n_group"] if kwargs["n_group"] > 1 else 1
    assert len(a.shards) == n_shards and a.per_shard >= used
    for layer in range(mass.shape[0]):
        order = sorted(range(n_expert // size), key=lambda u: (-mass[layer, u * size : (u + 1) * size].sum(), u))
        core = {u * size + j for u in order[: a.core // size] for j in range(size)}
        for shard in a.shards:
            ids = shard[layer]
            assert len(ids) == a.per_shard, "the same count in every layer of every shard"
            assert list(ids) == sorted(set(ids)) and 0 <= ids[0] and ids[-1] < n_expert
            assert core <= set(ids), "the core is on every shard"
            groups = {e // size for e in ids}
            assert len(ids) == len(groups) * size, "groups whole"
        assert covered(a, layer) == set(range(n_expert)), "every expert lives somewhere"
    assert all(0.0 <= f <= 1.0 + 1e-9 for row in a.kept_mass for f in row)

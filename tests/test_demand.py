"""The demand map (mesh_mcp/serving/demand.py): decay, TTL, bounds, the predicate, the wire form and its strictness,
and the CRDT laws of the merge (hypothesis)."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_mcp.errors import ProtocolError
from mesh_mcp.mesh.records import MAX_NAME
from mesh_mcp.serving import demand
from mesh_mcp.serving.demand import (
    HALF_LIFE_S,
    MAX_PINS,
    MAX_SKEW_S,
    MAX_WIRE,
    PER_REQUEST,
    PUBLISH_K,
    TTL_S,
    DemandMap,
    Entry,
    NodeDemand,
    from_wire,
    join,
    merge,
    to_wire,
)

T0 = 1_700_000_000.0


def anything(name: str) -> bool:
    return True


def node(**kw: Any) -> NodeDemand:
    return NodeDemand(anything, **kw)


# ------------------------------------------------------------------------------------------------ decay and rate


@pytest.mark.parametrize(
    ("after_s", "expected"),
    [(0, 10.0), (HALF_LIFE_S, 5.0), (2 * HALF_LIFE_S, 2.5), (10 * HALF_LIFE_S, 10 / 1024), (-60, 10.0)],
)
def test_rate_decays_with_the_half_life_and_never_grows_backwards(after_s: float, expected: float) -> None:
    assert Entry(10.0, T0, T0).rate_at(T0 + after_s) == pytest.approx(expected)


def test_one_request_adds_the_unit_step_and_a_steady_stream_converges_to_its_rate() -> None:
    d = node()
    assert d.observe("m", T0) == ""
    assert d.known().rate("m", T0) == pytest.approx(PER_REQUEST)
    for i in range(1, 14 * 120):  # 14 req/min for two hours
        d.observe("m", T0 + i * 60 / 14)
    assert d.known().rate("m", T0 + 7200) == pytest.approx(14.0, rel=0.01)


def test_a_clock_that_went_back_still_counts_the_request_without_growing_the_rate() -> None:
    d = node()
    d.observe("m", T0)
    d.observe("m", T0 - 100)
    e = d.known().entries["m"]
    assert e == Entry(2 * PER_REQUEST, T0, T0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_entries_refuse_nan_infinite_and_negative_numbers(bad: float) -> None:
    for args in ((bad, T0, T0), (1.0, bad, T0), (1.0, T0, bad)):
        with pytest.raises(ValueError, match="finite and >= 0"):
            Entry(*args)
    with pytest.raises(ValueError, match="as_of <= last_wanted"):
        Entry(1.0, T0 + 1, T0)


# ------------------------------------------------------------------------------------------------------ TTL


@pytest.mark.parametrize(
    ("after_s", "pinned", "active"),
    [(0, False, True), (TTL_S, False, True), (TTL_S + 1, False, False), (10 * TTL_S, True, True)],
)
def test_active_within_the_ttl_or_while_pinned(after_s: float, pinned: bool, active: bool) -> None:
    d = node()
    d.observe("m", T0)
    if pinned:
        d.pin("m")
    m = d.mesh_map([], T0 + after_s)
    assert m.is_active("m", T0 + after_s) is active
    assert [w.name for w in m.wanted(T0 + after_s)] == (["m"] if active else [])


def test_expired_entries_are_dropped_from_the_node_and_unpin_ends_a_pin() -> None:
    d = node()
    d.observe("old", T0)
    d.pin("served")
    d.observe("new", T0 + TTL_S + 1)  # any observation prunes
    assert set(d.known().entries) == {"new"}
    assert d.mesh_map([], T0 + TTL_S + 1).is_active("served", T0 + TTL_S + 1)
    d.unpin("served")
    assert not d.mesh_map([], T0 + TTL_S + 1).is_active("served", T0 + TTL_S + 1)


def test_wanted_is_hottest_first_with_numbers() -> None:
    d = node()
    for i in range(5):
        d.observe("hot", T0 + i)
    d.observe("warm", T0)
    d.pin("pinned-only")
    now = T0 + 10
    wanted = d.mesh_map([], now).wanted(now)
    assert [w.name for w in wanted] == ["hot", "warm", "pinned-only"]
    assert wanted[0].rate == pytest.approx(5 * PER_REQUEST, rel=0.03)
    assert wanted[2].rate == 0.0 and wanted[2].last_wanted == 0.0 and wanted[2].pinned
    assert wanted[1].describe(now) == "warm: 0.1 req/min, last wanted 10 s ago"
    assert wanted[2].describe(now) == "pinned-only: 0.0 req/min, not requested yet, pinned by a node"
    assert d.mesh_map([], now).rate("nobody-asked", now) == 0.0


# --------------------------------------------------------------------------------------- bounds and predicate


@pytest.mark.parametrize(
    ("name", "counted"),
    [
        ("Qwen2.5-Coder-1.5B-Instruct-Q4_K_M", True),
        ("x" * MAX_NAME, True),
        ("x" * (MAX_NAME + 1), False),
        ("", False),
        ("bad\nname", False),
        (" padded", False),
        ("tab\tname", False),
        ("junk-unknown", False),  # the predicate refuses it
    ],
)
def test_names_within_the_records_limits_and_accepted_by_the_predicate_count(name: str, counted: bool) -> None:
    d = NodeDemand(lambda n: not n.startswith("junk"))
    reason = d.observe(name, T0)
    assert (reason == "") is counted
    assert (name in d.known().entries) is counted
    if not counted:
        assert reason.startswith("not counted as demand: ")


def test_the_map_keeps_the_hottest_max_entries() -> None:
    d = node(max_entries=4)
    for i, name in enumerate(["f", "e", "d", "c", "b", "a"]):
        for _ in range(6 - i):  # f is hottest, a coldest
            d.observe(name, T0)
    assert set(d.known().entries) == {"c", "d", "e", "f"}
    d.observe("new", T0)  # one request ranks below every kept name at the same instant: not kept
    assert "new" not in d.known().entries
    d.observe("recent", T0 + 3 * HALF_LIFE_S)  # all old heat has decayed below one fresh request
    assert set(d.known().entries) == {"recent", "d", "e", "f"}


def test_publish_is_the_top_k_plus_pins_and_fits_the_wire() -> None:
    d = node()
    for i in range(PUBLISH_K + 10):
        for _ in range(i + 1):
            d.observe(f"m{i:02}", T0)
    d.pin("m00")  # coldest, but pinned: published with its entry
    for i in range(MAX_PINS - 1):
        d.pin(f"p{i}")
    view = d.publish(T0)
    hottest = {f"m{i:02}" for i in range(10, PUBLISH_K + 10)}
    assert set(view.entries) == hottest | {"m00"}
    assert view.pins == {"m00"} | {f"p{i}" for i in range(MAX_PINS - 1)}
    assert len(to_wire(view)) <= MAX_WIRE
    with pytest.raises(ValueError, match=f"at most {MAX_PINS} models"):
        d.pin("one-too-many")


def test_absorb_refuses_junk_names_and_times_from_the_future() -> None:
    d = NodeDemand(lambda n: n != "junk")
    view = DemandMap(
        {
            "good": Entry(3.0, T0, T0),
            "junk": Entry(3.0, T0, T0),
            "future": Entry(3.0, T0, T0 + MAX_SKEW_S + 1),
            "skewed-ok": Entry(3.0, T0, T0 + MAX_SKEW_S),
        },
        frozenset({"junk", "good"}),
    )
    refused = d.absorb(view, T0)
    assert set(d.known().entries) == {"good", "skewed-ok"}
    assert d.known().pins == frozenset()  # a peer's pins are not kept
    assert any("'junk' is not a model the mesh knows" in r for r in refused)
    assert any("future" in r and "301 s ahead" in r for r in refused)
    assert d.mesh_map([view], T0).pins == {"good"}  # a live member's pins count, junk ones do not


def test_a_dead_members_demand_outlives_it_until_the_ttl_but_its_pins_do_not() -> None:
    a, b = node(), node()
    a.observe("m", T0)
    a.pin("m")
    b.absorb(a.publish(T0), T0)
    now = T0 + 60  # a died: its view is no longer passed
    assert b.mesh_map([], now).is_active("m", now)
    assert "m" not in b.mesh_map([], now).pins
    assert not b.mesh_map([], T0 + TTL_S + 1).is_active("m", T0 + TTL_S + 1)


def test_max_not_sum_echoes_do_not_double() -> None:
    a, b = node(), node()
    for i in range(10):
        a.observe("m", T0 + i)
    before = a.known()
    b.absorb(a.publish(T0 + 10), T0 + 10)
    a.absorb(b.publish(T0 + 10), T0 + 10)
    a.absorb(from_wire(to_wire(b.publish(T0 + 10))), T0 + 10)
    assert a.known().rate("m", T0 + 20) == pytest.approx(before.rate("m", T0 + 20), rel=1e-3)


# ------------------------------------------------------------------------------------------------------ wire


def test_wire_round_trip_and_canonical_form() -> None:
    view = DemandMap({"a": Entry(14.0, T0, T0), "b": Entry(0.5, T0 - 30.75, T0 - 30.5)}, frozenset({"b", "c"}))
    wire = to_wire(view)
    assert wire == [
        ["a", 14000, int(T0), int(T0), False],
        ["b", round(0.5 * 2 ** (0.25 / HALF_LIFE_S) * 1000), int(T0) - 31, int(T0) - 31, True],
        ["c", 0, 0, 0, True],
    ]
    back = from_wire(json.loads(json.dumps(wire)))
    assert back.pins == {"b", "c"} and set(back.entries) == {"a", "b"}
    assert back.rate("a", T0 + HALF_LIFE_S) == pytest.approx(7.0)
    assert to_wire(back) == wire


GOOD: list[object] = ["m", 1000, 1_700_000_000, 1_700_000_000, False]


def with_(i: int, value: object) -> list[object]:
    item: list[object] = list(GOOD)
    item[i] = value
    return item


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"m": 1}, "must be a list"),
        ("m", "must be a list"),
        ([GOOD] * 2, "appears twice"),
        ([[f"m{i}", 1, 1, 1, False] for i in range(MAX_WIRE + 1)], "more than the 24 allowed"),
        ([[f"m{i}", 1, 1, 1, True] for i in range(MAX_PINS + 1)], "pins, more than the 8 allowed"),
        ([GOOD[:4]], "each entry must be"),
        ([[*GOOD, 1]], "each entry must be"),
        ([{"name": "m"}], "each entry must be"),
        ([with_(0, "")], "1 to 128 characters"),
        ([with_(0, "x" * (MAX_NAME + 1))], "1 to 128 characters"),
        ([with_(0, 7)], "1 to 128 characters"),
        ([with_(0, "a\x00b")], "control characters"),
        ([with_(1, 1.5)], "rate must be an integer"),
        ([with_(1, math.nan)], "rate must be an integer"),
        ([with_(1, -1)], "rate must be an integer"),
        ([with_(1, 10**12)], "rate must be an integer"),
        ([with_(1, True)], "rate must be an integer"),
        ([with_(1, "5")], "rate must be an integer"),
        ([with_(2, math.inf)], "as_of must be an integer"),
        ([with_(2, 10**11)], "as_of must be an integer"),
        ([with_(2, -5)], "as_of must be an integer"),
        ([with_(3, 1e9)], "last_wanted must be an integer"),
        ([with_(3, 10**400)], "last_wanted must be an integer"),
        ([with_(4, 1)], "pinned must be a boolean"),
        ([with_(4, None)], "pinned must be a boolean"),
        ([["m", 0, 0, 0, False]], "says nothing"),
        ([with_(2, 1_700_000_001)], "is after last_wanted"),
    ],
)
def test_from_wire_is_strict(obj: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        from_wire(obj)


def test_to_wire_refuses_views_over_the_limits() -> None:
    with pytest.raises(ValueError, match="at most 24 names"):
        to_wire(DemandMap({f"m{i}": Entry(1, T0, T0) for i in range(MAX_WIRE + 1)}))
    with pytest.raises(ValueError, match="control characters"):
        to_wire(DemandMap({"a\nb": Entry(1, T0, T0)}))


# ------------------------------------------------------------------------------------------ the CRDT (hypothesis)

NAMES = st.sampled_from(["a", "b", "c", "d"])
TIMES = st.floats(min_value=T0, max_value=T0 + 4 * TTL_S, allow_nan=False)
ENTRIES = st.builds(
    lambda rate, times: Entry(rate, *sorted(times)),
    st.floats(min_value=0, max_value=1e5, allow_nan=False),
    st.tuples(TIMES, TIMES),
)
MAPS = st.builds(
    DemandMap, st.dictionaries(NAMES, ENTRIES, max_size=4), st.frozensets(NAMES, max_size=2).map(frozenset)
)


@settings(max_examples=300, deadline=None)
@given(MAPS, MAPS, MAPS)
def test_merge_is_commutative_associative_and_idempotent(a: DemandMap, b: DemandMap, c: DemandMap) -> None:
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))
    assert merge(a, a) == a and merge(a, b, a, b) == merge(a, b)


@settings(max_examples=300, deadline=None)
@given(ENTRIES, ENTRIES, st.floats(min_value=0, max_value=4 * TTL_S))
def test_join_keeps_the_larger_rate_at_any_common_time(x: Entry, y: Entry, later: float) -> None:
    now = max(x.as_of, y.as_of) + later
    assert join(x, y).rate_at(now) == pytest.approx(max(x.rate_at(now), y.rate_at(now)), rel=1e-9, abs=1e-300)
    assert join(x, y).last_wanted == max(x.last_wanted, y.last_wanted)


@settings(max_examples=200, deadline=None)
@given(MAPS, MAPS, TIMES)
def test_expiry_commutes_with_merge_but_for_stale_rates(a: DemandMap, b: DemandMap, now: float) -> None:
    """Which names are active, their last_wanted and pins do not depend on when expiry ran; a rate may differ by a
    pair whose entry had expired, decayed by 2**(TTL/half-life) = 64x at least."""
    first, later = merge(a, b).expire(now), merge(a.expire(now), b.expire(now))
    assert first.pins == later.pins and first.entries.keys() == later.entries.keys()
    stale = max((e.rate for e in [*a.entries.values(), *b.entries.values()]), default=0) * 2 ** (-TTL_S / HALF_LIFE_S)
    for name, e in first.entries.items():
        assert e.last_wanted == later.entries[name].last_wanted
        assert 0 <= e.rate_at(now) - later.rate(name, now) <= stale * (1 + 1e-9)


OBSERVATIONS = st.lists(st.tuples(NAMES, st.floats(min_value=0, max_value=TTL_S), st.integers(0, 2)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(OBSERVATIONS, st.permutations(list(itertools.product(range(3), range(3)))))
def test_merge_order_does_not_matter_over_observations_split_across_nodes(
    observations: list[tuple[str, float, int]], exchanges: list[tuple[int, int]]
) -> None:
    nodes = [node(), node(), node()]
    for name, dt, who in sorted(observations, key=lambda o: o[1]):
        nodes[who].observe(name, T0 + dt)
    now = T0 + TTL_S
    expected = merge(*(n.known() for n in nodes))
    for src, dst in exchanges + exchanges:  # any order, repeated: each node hears every other at least once
        if src != dst:
            nodes[dst].absorb(nodes[src].known(), now)
    for n in nodes:
        assert n.known() == expected.expire(now, TTL_S)
        assert n.mesh_map([m.publish(now) for m in nodes], now) == expected.expire(now)


def test_the_constants_are_what_the_docstring_says() -> None:
    assert demand.PER_REQUEST == pytest.approx(60 * math.log(2) / HALF_LIFE_S)
    assert (HALF_LIFE_S, TTL_S, demand.MAX_ENTRIES, PUBLISH_K, MAX_PINS) == (300.0, 1800.0, 256, 16, 8)

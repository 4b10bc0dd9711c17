"""mesh/rtt.py: which peers to measure, smoothing, the nearest peers, when an RTT map is worth
re-publishing, and when a split partner has been too far for too long."""

from __future__ import annotations

import itertools
import math

from hypothesis import given
from hypothesis import strategies as st

from mesh_mcp.mesh import rtt as r
from mesh_mcp.mesh.records import MAX_RTT
from mesh_mcp.mesh.rtt import OverCap, RttTable, as_ms, publish_period, worse

A, B, C = "a" * 16, "b" * 16, "c" * 16


def test_first_samples_publish_at_once_then_smooth() -> None:
    t = RttTable()
    assert t.report(0.0) is None, "nothing measured: nothing to publish"
    t.observe(A, 10.0, 0.0)
    assert t.report(0.0) == ((A, 100),)
    t.observe(A, 20.0, 1.0)
    assert t.get(A) == 10.0 * (1 - r.ALPHA) + 20.0 * r.ALPHA


def test_jitter_is_not_republished_a_real_change_is_after_the_period() -> None:
    t = RttTable()
    t.observe(A, 10.0, 0.0)
    assert t.report(0.0) is not None
    t.observe(A, 10.5, 11.0)  # 0.15 ms smoothed change: below 1 ms and 20 %
    assert t.report(11.0) is None
    t.published_at = 5.0  # as if last published at 5 s
    for i in range(10):
        t.observe(A, 40.0, 12.0 + i / 10)
    assert t.report(12.9) is None, "a real change waits for the period"
    out = t.report(15.0)
    assert out is not None and dict(out)[A] > 300


def test_new_and_vanished_peers_are_changes() -> None:
    t = RttTable()
    t.observe(A, 1.0, 0.0)
    t.report(0.0)
    t.observe(B, 1.0, 20.0)
    t.observe(A, 1.0, 20.0)
    assert dict(t.report(20.0) or ()) == {A: 10, B: 10}
    t.prune([A])
    assert dict(t.report(40.0) or ()) == {A: 10}
    assert t.get(B) is None and B not in t.tried


def test_stale_peers_leave_the_map() -> None:
    t = RttTable()
    t.observe(A, 1.0, 0.0)
    t.observe(B, 1.0, r.FORGET_S + 1)
    assert set(t.nearest(r.FORGET_S + 1)) == {B}


def test_the_publish_period_grows_with_the_mesh() -> None:
    assert publish_period(3) == r.MIN_PUBLISH_S
    assert publish_period(1000) == 1000 * r.RECORD_BYTES / r.BUDGET_BYTES_S == 409.6, "7 min at 1000 nodes"


def test_bad_samples_are_ignored() -> None:
    t = RttTable()
    for bad in (math.nan, math.inf, -1.0):
        t.observe(A, bad, 0.0)
    assert t.get(A) is None


@given(st.dictionaries(st.text("0123456789abcdef", min_size=16, max_size=16), st.floats(0, 1e5), max_size=80))
def test_reports_are_bounded_sorted_and_valid_for_records(samples: dict[str, float]) -> None:
    t = RttTable()
    for peer, ms in samples.items():
        t.observe(peer, ms, 0.0)
    out = t.report(0.0) or ()
    assert len(out) <= MAX_RTT and list(out) == sorted(out)
    assert all(type(v) is int and v >= 0 for _, v in out)
    # the nearest ones are kept
    if out:
        kept = max(as_ms(out).values())
        assert all(ms * 10 >= round(kept * 10) - 1 for peer, ms in samples.items() if peer not in dict(out))


def ids(n: int, prefix: str = "") -> list[str]:
    return [f"{prefix}{i:x}".rjust(16, "0") for i in range(n)]


def test_new_members_are_measured_at_the_next_tick_then_every_few_seconds() -> None:
    t = RttTable()
    assert t.due([A, B], connected={A, B}, now=0.0) == [A, B]
    assert t.due([A, B, C], connected={A, B, C}, now=1.0) == [C], "A and B were just tried"
    for peer in (A, B, C):
        t.observe(peer, 1.0, 1.0)
    assert t.due([A, B, C], connected={A, B, C}, now=r.KEEP_EVERY_S) == [A, B], "C was tried at 1 s"
    assert t.due([A, B, C], connected={A, B, C}, now=1.0 + r.KEEP_EVERY_S) == [C]


def test_a_large_mesh_is_not_dialled_all_at_once() -> None:
    """1000 members, 20 connected: each tick pings at most PER_TICK peers and opens at most
    NEW_PER_TICK new connections; peers outside the nearest are revisited only every REVISIT_S."""
    members, connected = ids(1000), set(ids(20))
    t = RttTable()
    dialled: list[str] = []
    for tick in range(120):
        now = float(tick)
        batch = t.due(members, connected, now)
        assert len(batch) <= r.PER_TICK
        new = [p for p in batch if p not in connected and p not in t.nearest(now)]
        assert len(new) <= r.NEW_PER_TICK
        dialled += new
        for peer in batch:
            t.observe(peer, 5.0 + int(peer, 16) % 50, now)
    assert len(dialled) <= 120 * r.NEW_PER_TICK
    assert len(t.nearest(119.0)) == r.MAX_PEERS
    # a connected peer that is not among the nearest is not pinged every few seconds (our pings
    # would keep its connection open forever)
    far = max(connected, key=lambda p: t.get(p) or 0)
    assert far not in t.nearest(119.0)
    pinged = [tick for tick in range(120, 240) if far in t.due(members, connected, float(tick))]
    assert len(pinged) <= 120 / r.REVISIT_S + 1


def test_peers_a_split_keeps_are_measured_first_and_often() -> None:
    members = ids(100)
    t = RttTable()
    for now in range(0, 30):
        for peer in t.due(members, set(), float(now), keep=[members[-1]]):
            t.observe(peer, 200.0 if peer == members[-1] else 1.0, float(now))
    times = [now for now in range(30, 60) if members[-1] in t.due(members, set(), float(now), keep=[members[-1]])]
    assert len(times) >= 5 and all(b - a <= r.KEEP_EVERY_S for a, b in itertools.pairwise(times))


def test_failed_pings_do_not_starve_the_others() -> None:
    """A member that never answers is tried, then left for REVISIT_S like any other."""
    t = RttTable()
    assert t.due([A], connected=set(), now=0.0) == [A]
    assert t.due([A, B], connected=set(), now=1.0) == [B]


def test_over_cap_needs_two_consecutive_checks() -> None:
    watch = OverCap(80.0)
    assert watch.check({A: 120.0, B: 10.0}) == []
    assert watch.check({A: 60.0, B: 10.0}) == [], "back under the cap: the streak starts over"
    assert watch.check({A: 81.0, B: None}) == []
    assert watch.check({A: 95.0, B: None}) == [A]
    assert watch.check({A: None}) == [], "no value breaks the streak"


def test_worse_direction() -> None:
    assert worse(None, 3.0, 7.5) == 7.5
    assert worse(None, math.nan, -1.0) is None

"""Issue 14's rules at scale, small: `bench.p14_sim` drives the pure assignment rules over a churning mesh (30 nodes,
6 models with Zipf demand, 20 simulated minutes, a demand shift half-way), and the behaviour is checked: every
demanded model that fits is served at the end, no node flaps, the hysteresis holds, and without the hysteresis the
same mesh flaps. Two known misbehaviours of `serving/assign.py` are pinned as strict xfails named after them.
"""

from __future__ import annotations

import pytest

from bench.p14_sim import Config, Report, simulate
from mesh_mcp.serving.assign import Rules

DEFAULT = Rules()
NO_HYSTERESIS = Rules(hot_ratio=1.0, min_dwell_s=0.0, model_interval_s=0.0)


def small(seed: int, rules: Rules = DEFAULT) -> Report:
    spare_s = 0.0 if rules is NO_HYSTERESIS else Config.spare_s  # a donor judged on one snapshot
    return simulate(Config(nodes=30, models=6, hours=1 / 3, seed=seed, rules=rules, spare_s=spare_s))


@pytest.mark.parametrize("seed", [3, 4, 7, 8])
def test_every_demanded_model_is_served_and_the_hysteresis_holds(seed: int) -> None:
    rep = small(seed)
    assert rep.all_served_at is not None  # (load times: up to ~7 min for a 40 GB download)
    assert rep.unserved_end == []
    assert rep.node_flaps == []
    assert rep.dwell_violations == [] and rep.interval_violations == []
    assert rep.double_loads == []
    assert rep.starts.get("replica", 0) > 0  # the queue rule really ran: the hot models got replicas
    decided = [g[2] for g in rep.gaps if g[2] is not None]
    assert decided and max(decided) <= 10  # the target: a decision within 10 s (here 2 looks + 4 s lag)


def test_the_simulation_is_deterministic() -> None:
    a, b = small(3), small(3)
    assert (a.moves, a.replicas, a.gaps, a.starts) == (b.moves, b.replicas, b.gaps, b.starts)


def test_without_the_hysteresis_the_same_mesh_flaps() -> None:
    """The dwell time, the per-model interval and the 3× ratio are what keep these meshes steady."""
    steady, loose = small(8), small(8, NO_HYSTERESIS)
    assert steady.model_flaps == [] and len(loose.model_flaps) >= 5, loose.model_flaps
    steady, loose = small(5), small(5, NO_HYSTERESIS)
    assert steady.node_flaps == [] and loose.node_flaps, loose.node_flaps


def test_a_demanded_model_that_no_idle_standby_can_hold_is_served() -> None:
    """Seed 2: after the demand shift two 31–32 GB models are wanted; every node that can hold them serves a spare
    replica of another model (one nobody asks for any more), no idle standby is large enough, so `elect` finds no
    winner: `plan_moves` gives each a spare server of another model (the stranded rule)."""
    assert small(2).unserved_end == []


def test_no_model_gains_and_loses_a_server_within_10_minutes_on_a_steady_mesh() -> None:
    """Seed 1: a model queued on one server gets a replica; the hotness rule (per-server req/min, blind to how long a
    request takes) could pull that replica to a small fast model whose servers are idle; a donor must have been able
    to spare a server for `SPARE_S` (not one snapshot), and a joiner's replica waits for a sustained queue."""
    assert small(1).model_flaps == []

"""The assignment rules (issue 14): joining, promotion by election, replicas and rebalancing — pure, on plain views."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_mcp.serving.assign import (
    CLIENT,
    FAILED,
    HOST,
    LOADING,
    SERVING,
    STANDBY,
    Demand,
    Member,
    Recent,
    Serve,
    Served,
    Stay,
    View,
    _Model,
    elect,
    pick_on_join,
    plan_moves,
    promotion,
    rebalance,
)

GB = 10**9
NOW = 10_000.0


def node(nid: str, cap: float = 10, role: str = STANDBY, served: tuple[Served, ...] = (), disk: str = "") -> Member:
    return Member(nid, int(cap * GB), role, served, frozenset(disk.split()))


def srv(model: str, in_flight: int = 0, slots: int = 4) -> Served:
    return Served(model, SERVING, in_flight, slots)


def view(
    members: list[Member], demand: dict[str, float], sizes: dict[str, float] | None = None, catalog: dict | None = None
) -> View:
    """A view in GB and req/min (a rate of 0: not demanded)."""
    gb = {k: int(v * GB) for k, v in (sizes or {}).items()}
    cat = {k: int(v * GB) for k, v in (catalog or {}).items()}
    return View(tuple(members), gb, {k: Demand(v, v > 0) for k, v in demand.items()}, cat)


# --- the underserved definition ---


@pytest.mark.parametrize(
    ("servers", "queued", "spare"),
    [
        ([(5, 4), (3, 4)], 0, False),  # a free slot on one server: nobody waits long
        ([(5, 4), (6, 4)], 3, False),  # every server queued: 1 + 2 beyond slots
        ([(4, 4)], 0, False),  # full but not queued
        ([(4, 4), (6, 4)], 0, False),  # one server full but not queued: the next request waits there least
        ([(2, 4), (1, 4)], 0, True),  # 3 in flight fit the other server's 4 slots
        ([(3, 4), (3, 4)], 0, False),  # 6 do not
    ],
)
def test_queued_and_spare(servers: list[tuple[int, int]], queued: int, spare: bool) -> None:
    m = _Model(servers=tuple((f"n{i}", Served("x", SERVING, f, s)) for i, (f, s) in enumerate(servers)))
    assert (m.queued, m.can_spare()) == (queued, spare)


# --- joining ---


def test_join_prefers_unserved_on_disk_with_its_numbers() -> None:
    v = view(
        [node("me", 18.5, disk="A"), node("h1", 20, HOST, (srv("B", 9),)), node("h2", 20, HOST, (srv("C"),))],
        {"A": 14, "B": 50, "C": 1, "D": 5},
        {"A": 1.1, "B": 2, "C": 2},
        catalog={"D": 3},
    )
    d = pick_on_join(v, "me", NOW)
    assert isinstance(d, Serve) and (d.model, d.source) == ("A", "disk")
    assert "0 server(s), demand 14.0 req/min, on disk, fits 1.1 GB of 18.5 GB" in d.reasons[0]


def test_join_order_underserved_then_catalog_then_standby() -> None:
    members = [node("me", 10), node("h1", 20, HOST, (srv("B", 9),)), node("h2", 20, HOST, (srv("C", 5),))]
    demand = {"B": 50, "C": 30, "D": 5}
    v = view(members, demand, {"B": 2, "C": 2}, catalog={"B": 2, "D": 3})
    d = pick_on_join(v, "me", NOW)
    assert isinstance(d, Serve) and (d.model, d.source) == ("B", "peer")  # its server holds the file
    assert "5 requests are queued" in d.reasons[1]
    # B no longer queued: the catalog model D (nobody serves it) is next
    v2 = view([members[0], node("h1", 20, HOST, (srv("B", 4),)), members[2]], demand, {"B": 2}, catalog={"D": 3})
    d2 = pick_on_join(v2, "me", NOW)
    assert isinstance(d2, Serve) and (d2.model, d2.source) == ("D", "catalog")
    # D served too: standby, and why
    v3 = replace(v2, members=(*v2.members, node("h3", 20, HOST, (srv("D"),))))
    d3 = pick_on_join(v3, "me", NOW)
    assert isinstance(d3, Stay) and "3 demanded model(s)" in d3.reasons[0] and "lending 10.0 GB" in d3.reasons[0]


@pytest.mark.parametrize(
    ("sizes", "catalog", "why"),
    [
        ({"A": 40}, {}, "A needs 40.0 GB and node me offers 10.0 GB"),
        ({}, {}, "A's size is not known"),
        ({"A": 1}, {}, "A is on no node's disk and not in the catalog"),
    ],
)
def test_join_stays_standby_and_says_why(sizes: dict[str, float], catalog: dict[str, float], why: str) -> None:
    d = pick_on_join(view([node("me", 10)], {"A": 5}, sizes, catalog=catalog), "me", NOW)
    assert isinstance(d, Stay) and any(why in r for r in d.reasons), d.reasons


def test_join_skips_a_model_being_loaded_and_clients() -> None:
    loading = Served("A", LOADING, since=NOW - 10)
    v = view([node("me", disk="A"), node("o", served=(loading,))], {"A": 5}, {"A": 1})
    assert isinstance(pick_on_join(v, "me", NOW), Stay)
    assert isinstance(pick_on_join(v, "me", NOW + 90), Serve)  # the intent went stale: A is unserved again
    v2 = view([node("me", role=CLIENT, disk="A")], {"A": 5}, {"A": 1})
    assert pick_on_join(v2, "me", NOW).reasons == ("a client: this node serves no model",)


def test_nodes_joining_together_spread_out() -> None:
    models = [f"m{i}" for i in range(4)]
    joiners = [node(f"j{i:02d}", disk=" ".join(models)) for i in range(24)]
    v = view(joiners, dict.fromkeys(models, 5.0), dict.fromkeys(models, 1.0))
    picks = [pick_on_join(v, j.node_id, NOW) for j in joiners]
    chosen = {p.model for p in picks if isinstance(p, Serve)}
    assert chosen == set(models)


# --- promotion ---


def test_promotion_elects_on_disk_then_headroom() -> None:
    v = view([node("big", 40, disk=""), node("small", 4, disk="A"), node("mid", 8, disk="A")], {"A": 14}, {"A": 1.1})
    assert elect(v, NOW)["A"].winner == "mid"  # on disk beats headroom; then headroom: 8 GB beats 4 GB
    d = promotion(v, "mid", NOW)
    assert isinstance(d, Serve) and d.model == "A" and d.source == "disk"
    assert "0 server(s), demand 14.0 req/min, on disk, fits 1.1 GB of 8.0 GB" in d.reasons[0]
    assert "elected over 2 other standby(s)" in d.reasons[1]
    lost = promotion(v, "big", NOW)
    assert isinstance(lost, Stay) and "A goes to node mid" in lost.reasons[0]


@pytest.mark.parametrize(
    ("others", "winner"),
    [
        ([node("a", 8, disk="A")], "a"),
        ([node("a", 8, HOST, disk="A")], "b"),  # a host is not a standby
        ([node("a", 8, served=(Served("Z", LOADING, since=NOW),), disk="A")], "b"),  # busy loading Z
        ([node("a", 8, served=(Served("A", FAILED),), disk="A")], "b"),  # failed to load A: hands it on
        ([node("a", 0.5, disk="A")], "b"),  # does not fit
    ],
)
def test_promotion_candidates(others: list[Member], winner: str) -> None:
    v = view([*others, node("b", 6)], {"A": 3}, {"A": 1}, catalog={"A": 1})
    assert elect(v, NOW)["A"].winner == winner


def test_a_fresh_intent_blocks_promotion_and_a_stale_one_hands_on() -> None:
    loader = node("a", 8, STANDBY, (Served("A", LOADING, since=NOW),), "A")
    v = view([loader, node("b", 6, disk="A")], {"A": 3}, {"A": 1})
    assert elect(v, NOW + 89) == {}
    stay = promotion(v, "b", NOW + 89)
    assert isinstance(stay, Stay) and "or a loader: A (node a)" in stay.reasons[0]
    d = promotion(v, "b", NOW + 90)
    assert isinstance(d, Serve) and d.model == "A"
    assert any("node a announced loading A 90 s ago" in r and "handing the job on" in r for r in d.reasons)
    assert isinstance(promotion(v, "a", NOW + 90), Stay)


def test_promotion_hottest_first_and_inactive_or_unfetchable_models_wait() -> None:
    v = view([node("s", disk="A B")], {"A": 3, "B": 30, "C": 0}, {"A": 1, "B": 1, "C": 1})
    e = elect(v, NOW)
    assert (e["B"].winner, e["A"].winner, "C" in e) == ("s", None, False)
    assert "no idle standby can fetch and hold 1.0 GB" in e["A"].reasons[0]
    assert elect(view([node("s")], {"X": 3}, {"X": 1}), NOW)["X"].winner is None  # nowhere to fetch it from


# --- rebalancing ---


def _pair(a: tuple[float, int], b: tuple[float, int], extra: tuple[Member, ...] = ()) -> tuple[View, dict[str, bool]]:
    """A hot model A on one server and a model B on two; (rate, in flight per server)."""
    members = [
        node("a1", 10, HOST, (srv("A", a[1]),), "A"),
        node("b1", 10, HOST, (srv("B", b[1]),), "B"),
        node("b2", 10, HOST, (srv("B", b[1]),), "B"),
        *extra,
    ]
    return view(members, {"A": a[0], "B": b[0]}, {"A": 1, "B": 1}), {"A": a[1] > 4}


def test_a_sustained_queue_takes_a_standby_first() -> None:
    v, sustained = _pair((60, 9), (10, 0), extra=(node("s", 10, disk="A"),))
    d = rebalance(v, "s", NOW, Recent(sustained, {}, {}))
    assert isinstance(d, Serve) and (d.model, d.replaces) == ("A", None)
    assert "adds a replica of A (5 requests queued beyond the slots of all 1 servers)" in d.reasons[0]
    assert isinstance(rebalance(v, "s", NOW, Recent({"A": False}, {}, {})), Stay)  # not sustained: A's queue is a burst


def test_without_a_standby_a_spare_replica_moves() -> None:
    v, sustained = _pair((60, 9), (10, 1))
    moves = plan_moves(v, NOW, Recent(sustained, {}, {}))
    assert len(moves) == 1 and moves[0].replaces == "B" and moves[0].model == "A"
    assert "giving up B (2 servers, 5.0 req/min each)" in moves[0].reasons[0]


@pytest.mark.parametrize(
    ("a_rate", "b_rate", "moved", "model_moved", "moves"),
    [
        (60, 10, {}, {}, 1),  # 60 per server ≥ 3 × 5 and ≥ 10
        (8, 1, {}, {}, 0),  # under 10 req/min: nobody waits
        (30, 24, {}, {}, 0),  # 30 < 3 × 12
        (60, 10, {"b1": NOW - 100, "b2": NOW - 599}, {}, 0),  # both donors moved within the dwell time
        (60, 10, {"b1": NOW - 100, "b2": NOW - 600}, {}, 1),
        (60, 10, {}, {"A": NOW - 60}, 0),  # A gained a server within the interval
        (60, 10, {}, {"B": NOW - 119}, 0),
        (60, 10, {}, {"B": NOW - 120}, 1),
    ],
)
def test_hotness_rule(
    a_rate: float, b_rate: float, moved: dict[str, float], model_moved: dict[str, float], moves: int
) -> None:
    v, _ = _pair((a_rate, 2), (b_rate, 0))
    found = plan_moves(v, NOW, Recent({}, moved, model_moved))
    assert len(found) == moves
    if moves:
        assert found[0].model == "A" and found[0].replaces == "B" and "≥ 3× B's" in found[0].reasons[0]


def test_never_the_last_server_never_a_split() -> None:
    lone = view([node("a1", 10, HOST, (srv("A", 2),)), node("b1", 10, HOST, (srv("B"),))], {"A": 90, "B": 1})
    assert plan_moves(replace(lone, sizes={"A": GB, "B": GB}), NOW, Recent({}, {}, {})) == ()  # B's only server
    v, _ = _pair((60, 2), (10, 0))
    assert plan_moves(replace(v, sizes={"A": 20 * GB, "B": GB}), NOW, Recent({}, {}, {})) == ()  # A fits no donor solo


# --- properties: determinism, one winner per needed server, convergence ---

MODELS = ["m0", "m1", "m2", "m3", "m4"]


@st.composite
def views(draw: st.DrawFn) -> View:
    n = draw(st.integers(1, 10))
    members = []
    for i in range(n):
        role = draw(st.sampled_from([STANDBY, STANDBY, HOST, CLIENT]))
        served: tuple[Served, ...] = ()
        if role == HOST:
            m = draw(st.sampled_from(MODELS))
            state = draw(st.sampled_from([SERVING, SERVING, LOADING, FAILED]))
            served = (Served(m, state, draw(st.integers(0, 10)), 4, NOW - draw(st.sampled_from([0, 50, 200]))),)
        disk = frozenset(draw(st.lists(st.sampled_from(MODELS), max_size=3)))
        members.append(Member(f"n{i:02d}", draw(st.integers(1, 12)) * GB, role, served, disk))
    sizes = {m: draw(st.one_of(st.none(), st.integers(1, 10).map(lambda g: g * GB))) for m in MODELS}
    demand = {m: Demand(r, r > 0) for m in MODELS if (r := draw(st.sampled_from([0.0, 2.0, 12.0, 40.0]))) or True}
    catalog = {m: 2 * GB for m in draw(st.lists(st.sampled_from(MODELS), max_size=2))}
    return View(tuple(members), sizes, demand, catalog)


def _shuffled(v: View, seed: int) -> View:
    members = list(v.members)
    random.Random(seed).shuffle(members)
    return replace(v, members=tuple(members), demand=dict(reversed(list(v.demand.items()))))


@settings(max_examples=150, deadline=None)
@given(views(), st.integers(0, 1000))
def test_every_node_decides_the_same_from_any_order(v: View, seed: int) -> None:
    w = _shuffled(v, seed)
    sustained = dict.fromkeys(MODELS, True)
    for m in v.members:
        assert pick_on_join(v, m.node_id, NOW) == pick_on_join(w, m.node_id, NOW)
        assert promotion(v, m.node_id, NOW) == promotion(w, m.node_id, NOW)
    assert plan_moves(v, NOW, Recent(sustained, {}, {})) == plan_moves(w, NOW, Recent(sustained, {}, {}))


@settings(max_examples=200, deadline=None)
@given(views())
def test_exactly_one_winner_per_needed_server(v: View) -> None:
    serves = [(m.node_id, d) for m in v.members if isinstance(d := promotion(v, m.node_id, NOW), Serve)]
    by_model = [d.model for _, d in serves]
    assert len(by_model) == len(set(by_model))  # never two loaders of one model
    elections = elect(v, NOW)
    assert sorted(by_model) == sorted(m for m, e in elections.items() if e.winner)
    winners = {e.winner for e in elections.values() if e.winner}
    for nid, d in serves:  # each winner is an idle standby that can hold the model, and the model needs a server
        mem = next(m for m in v.members if m.node_id == nid)
        assert mem.role == STANDBY and not any(s.state in (SERVING, LOADING) for s in mem.served)
        size = v.sizes.get(d.model) or v.catalog[d.model]
        assert size <= mem.capacity_bytes and v.demand[d.model].active
        assert not any(s.model == d.model and s.state == SERVING for m in v.members for s in m.served)
    for model, e in elections.items():  # a model left without a winner: every idle standby that could hold it won
        if e.winner is None:  # another, hotter model
            for m in v.members:
                fits = (size := v.sizes.get(model) or v.catalog.get(model)) is not None and size <= m.capacity_bytes
                fetchable = any(model in o.on_disk for o in v.members) or model in v.catalog
                idle = m.role == STANDBY and not any(s.state in (SERVING, LOADING) for s in m.served)
                failed = any(s.model == model and s.state == FAILED for s in m.served)
                if idle and fits and fetchable and not failed:
                    assert m.node_id in winners


def _apply(v: View, moves: tuple, now: float, moved: dict, model_moved: dict, conc: dict[str, int]) -> View:
    members = {m.node_id: m for m in v.members}
    for mv in moves:
        members[mv.node_id] = replace(members[mv.node_id], role=HOST, served=(srv(mv.model),))
        moved[mv.node_id] = now
        model_moved[mv.model] = now
        if mv.replaces:
            model_moved[mv.replaces] = now
    return _spread(replace(v, members=tuple(members.values())), conc)


def _spread(v: View, conc: dict[str, int]) -> View:
    """Each model's concurrent requests dealt evenly over its servers (what the router does)."""
    out, seen = [], dict.fromkeys(conc, 0)
    counts = {m: sum(1 for x in v.members for s in x.served if s.model == m) for m in conc}
    for mem in v.members:
        served = []
        for s in mem.served:
            n, i = counts[s.model], seen[s.model]
            seen[s.model] += 1
            served.append(replace(s, in_flight=conc[s.model] // n + (1 if i < conc[s.model] % n else 0)))
        out.append(replace(mem, served=tuple(served)))
    return replace(v, members=tuple(out))


@settings(max_examples=80, deadline=None)
@given(
    st.integers(3, 14),
    st.lists(st.integers(0, 200), min_size=2, max_size=5),
    st.lists(st.integers(0, 30), min_size=5, max_size=5),
    st.integers(0, 1000),
)
def test_static_demand_converges_without_flapping(nodes: int, rates: list[int], concs: list[int], seed: int) -> None:
    rng = random.Random(seed)
    models = MODELS[: len(rates)]
    members = []
    for i in range(nodes):
        m = models[i % len(models)] if i < 2 * len(models) and rng.random() < 0.8 else None
        members.append(node(f"n{i:02d}", rng.choice([4, 8, 16]), HOST if m else STANDBY, (srv(m),) if m else ()))
    conc = dict(zip(models, concs, strict=False))
    v = _spread(view(members, dict(zip(models, map(float, rates), strict=True)), dict.fromkeys(models, 2)), conc)
    moved: dict[str, float] = {}
    model_moved: dict[str, float] = {}
    history: list[tuple[str, str | None, str]] = []
    now, rounds = NOW, 120
    last_move = -1
    for r in range(rounds):  # one round a minute: two hours of static demand
        sustained = {
            m: bool(_Model(tuple((x.node_id, s) for x in v.members for s in x.served if s.model == m)).queued)
            for m in models
        }
        moves = plan_moves(v, now, Recent(sustained, moved, model_moved))
        if moves:
            last_move = r
        history += [(mv.node_id, mv.replaces, mv.model) for mv in moves]
        v = _apply(v, moves, now, moved, model_moved, conc)
        now += 60
    assert last_move < rounds - 20, history  # moves stopped well before the end: converged
    assert len(history) <= nodes * len(models), history
    for nid, gave, took in history:  # no node went back to what it gave up (no A → B → A)
        later = history[history.index((nid, gave, took)) + 1 :]
        assert (nid, took, gave) not in later, history


def test_a_hot_model_gains_servers_until_the_rule_stops_then_nothing_moves() -> None:
    """A at 120 req/min on one server, B at 12 req/min on six: servers move one per interval while A's demand per
    server is ≥ 3 × B's, then stop; the rule never moves one back."""
    members = [node("a0", role=HOST, served=(srv("A"),))]
    members += [node(f"b{i}", role=HOST, served=(srv("B"),)) for i in range(6)]
    v = view(members, {"A": 120, "B": 12}, {"A": 1, "B": 1})
    moved: dict[str, float] = {}
    model_moved: dict[str, float] = {}
    history = []
    now = NOW
    for _ in range(60):
        moves = plan_moves(v, now, Recent({}, moved, model_moved))
        history.append(len(moves))
        v = _apply(v, moves, now, moved, model_moved, {"A": 0, "B": 0})
        now += 60
    servers = {m: sum(1 for x in v.members for s in x.served if s.model == m) for m in "AB"}
    # 120/1 vs 12/6=2 → move; 60 vs 2.4 → move; 40 vs 3 → move; 30 vs 4 → move; 24 vs 6: 24 ≥ 18 → move;
    # 20 vs 12 (one B server left, which can give no more): stop
    assert servers == {"A": 6, "B": 1}
    assert sum(history) == 5 and all(n <= 1 for n in history)
    assert history.index(1) == 0 and [i for i, n in enumerate(history) if n][1] == 2  # one move per 120 s interval


@pytest.mark.parametrize(("a_rate", "moves"), [(33, 1), (32.9, 0)])
def test_hot_ratio_boundary(a_rate: float, moves: int) -> None:
    """B: 33 req/min on three servers, 11 each; A moves a server over at exactly 3 × 11."""
    members = [node("a1", role=HOST, served=(srv("A"),))]
    members += [node(f"b{i}", role=HOST, served=(srv("B"),)) for i in range(3)]
    v = view(members, {"A": a_rate, "B": 33}, {"A": 1, "B": 1})
    assert len(plan_moves(v, NOW, Recent({}, {}, {}))) == moves


def test_a_queued_model_gains_one_replica_per_interval() -> None:
    v, sustained = _pair((60, 9), (10, 0), extra=(node("s", 10, disk="A"),))
    assert isinstance(rebalance(v, "s", NOW, Recent(sustained, {}, {"A": NOW - 119})), Stay)
    assert isinstance(rebalance(v, "s", NOW, Recent(sustained, {}, {"A": NOW - 120})), Serve)


def test_a_donor_that_would_become_the_hot_one_stays() -> None:
    """A queued on one server at 12 req/min; B at 100 req/min on two idle servers could spare one, but alone it would
    carry 100 req/min against A's 6 per server — the hotness rule would pull it straight back."""
    v, sustained = _pair((12, 9), (100, 0))
    assert plan_moves(v, NOW, Recent(sustained, {}, {})) == ()
    v2, sustained2 = _pair((12, 9), (15, 0))  # B alone at 15 < 3 × 6: the replica moves
    assert [m.replaces for m in plan_moves(v2, NOW, Recent(sustained2, {}, {}))] == ["B"]

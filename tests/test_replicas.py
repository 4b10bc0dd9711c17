"""Replicas and releases (issue 14, item 5): the release rule, the watch's memory (loads past their deadline,
sustained queues, moves), a standby adding a replica of a model queued on every server, the replica watcher on the
fake clock, and a member announcing "loading" forever passed over in an in-memory mesh."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.hardware import Hardware
from inference.llama_server import ServerSettings
from mesh_mcp.mesh.records import NodeRecord, ServedModel
from mesh_mcp.serving import assign
from mesh_mcp.serving.assign import Demand, Member, Recent, Release, Serve, Served, Stay, View
from mesh_mcp.serving.replicas import (
    LOAD_FORGET_S,
    MAX_MOVES,
    SUSTAIN_S,
    ReplicaWatcher,
    Watch,
    demand_view,
    load_deadline_s,
)
from mesh_mcp.serving.standby import CHECK_S, StandbyRunner, build_view, decide, member
from mesh_mcp.serving.supervisor import DRAIN_S, Serving, ServingSetup
from mesh_mcp.state import NodeState
from mesh_mcp.testing import FakeClock
from tests.test_standby import DECIDE_S, Stub, cluster, record, wants_a

GB = 10**9
NOW = 1_700_000_000.0
IDLE = {"A": Demand(0.1, True, requested=False)}  # pinned or decaying, but no request within the TTL


def serving(nid: str, model: str = "A", flight: int = 0, slots: int = 4, pinned: bool = False) -> Member:
    return Member(
        nid,
        8 * GB,
        assign.HOST,
        (Served(model, assign.SERVING, flight, slots),),
        pinned=frozenset({model} if pinned else ()),
    )


def v(members: list[Member], demand: dict[str, Demand]) -> View:
    return View(tuple(members), {name: GB for name in demand}, demand)


# --- the release rule -----------------------------------------------------------------------------------


def test_a_replica_of_a_model_still_requested_stays() -> None:
    got = assign.release(v([serving("r1"), serving("r2")], {"A": Demand(2.0, True)}), "r1", "A", NOW)
    assert isinstance(got, Stay) and "requests still name it (2.0 req/min" in got.reasons[0]


def test_the_only_server_never_releases_even_idle() -> None:
    got = assign.release(v([serving("r1")], IDLE), "r1", "A", NOW)
    assert isinstance(got, Stay) and "only server" in got.reasons[0]
    assert isinstance(assign.release(v([serving("r1")], {}), "r1", "A", NOW), Stay)  # expired from the map too


def test_an_idle_replica_beside_an_operators_server_releases() -> None:
    got = assign.release(v([serving("host", pinned=True), serving("r1")], IDLE), "r1", "A", NOW)
    assert isinstance(got, Release) and got.model == "A"
    assert "node host was started to serve it" in got.reasons[0] and "2 servers" in got.reasons[0]


@settings(max_examples=60, deadline=None)
@given(st.sets(st.text("0123456789abcdef", min_size=4, max_size=8), min_size=2, max_size=6), st.booleans())
def test_of_idle_unpinned_replicas_exactly_one_stays(ids: set[str], loading_too: bool) -> None:
    members = [serving(nid) for nid in sorted(ids)]
    if loading_too:  # a loader is not a server: it does not keep the model
        members.append(Member("loader", 8 * GB, assign.HOST, (Served("A", assign.LOADING, since=NOW),)))
    view = v(members, IDLE)
    stays = [nid for nid in ids if isinstance(assign.release(view, nid, "A", NOW), Stay)]
    assert len(stays) == 1


# --- records carry what the rules need -------------------------------------------------------------------


def test_a_record_gives_slots_pins_and_overdue_loads_to_the_rules() -> None:
    r = record(
        "n1",
        "host",
        (ServedModel("A", "serving", in_flight=3, slots=1), ServedModel("B", "loading")),
        demand=(("A", 0, 0, 0, True), ("C", 1000, 1, 2, False)),
    )
    m = member(r, overdue=["B"])
    assert m.pinned == frozenset({"A"})
    assert [(s.model, s.state, s.in_flight, s.slots) for s in m.served] == [
        ("A", assign.SERVING, 3, 1),
        ("B", assign.FAILED, 0, assign.DEFAULT_SLOTS),  # loading past its deadline: failed, the job passes on
    ]


def test_requested_means_a_request_within_the_ttl_not_a_pin() -> None:
    got = demand_view([("A", 3.0, NOW - 10), ("B", 0.0, 0.0), ("C", 0.5, NOW - 100)], NOW, 60.0)
    assert {n: d.requested for n, d in got.items()} == {"A": True, "B": False, "C": False}
    assert all(d.active for d in got.values())


# --- the watch -------------------------------------------------------------------------------------------


def rec(nid: str, *served: ServedModel, role: str = "host") -> NodeRecord:
    return record(nid, role, tuple(served))


def test_the_watch_times_loads_from_their_first_sighting_whatever_the_loader_re_signs() -> None:
    w = Watch()
    sizes = {"A": GB}.get
    deadline = load_deadline_s(GB)
    assert deadline == 300 + GB / 5e6
    for t in range(0, int(deadline) + 2, 2):  # the loader re-signs every look: its records are always fresh
        w.see([record("l", "host", (ServedModel("A", "loading"),), version=int((NOW + t) * 1000))], NOW + t)
        late = w.overdue(NOW + t, sizes)
        assert late == ({"l": ["A"]} if t >= deadline else {}), t
    w.see([rec("l", ServedModel("A", "serving"))], NOW + deadline + 4)  # loaded after all: nothing overdue
    assert w.overdue(NOW + deadline + 4, sizes) == {} and w.loading_since == {}


def test_the_watch_says_a_queue_is_sustained_only_after_it_lasted_and_every_server_queued() -> None:
    w = Watch()
    both_queued = [rec("a", ServedModel("A", "serving", 3, slots=1)), rec("b", ServedModel("A", "serving", 6))]
    one_free = [rec("a", ServedModel("A", "serving", 3, slots=1)), rec("b", ServedModel("A", "serving", 2))]
    w.see(both_queued, NOW)
    assert w.recent(NOW).sustained == {"A": False}
    w.see(both_queued, NOW + SUSTAIN_S)
    assert w.recent(NOW + SUSTAIN_S).sustained == {"A": True}
    w.see(one_free, NOW + SUSTAIN_S + 2)  # a free slot anywhere: nobody waits long
    assert w.recent(NOW + SUSTAIN_S + 2).sustained == {}
    w.see(both_queued, NOW + SUSTAIN_S + 4)
    assert w.recent(NOW + SUSTAIN_S + 4).sustained == {"A": False}  # the clock starts again


def test_the_watch_remembers_moves_of_nodes_and_models_and_forgets_dead_nodes() -> None:
    w = Watch()
    w.see([rec("a", ServedModel("A", "serving")), rec("s", role="standby")], NOW)
    assert w.recent(NOW).node_moved_at == {} and w.recent(NOW).model_moved_at == {}  # history before the first look
    w.see([rec("a", ServedModel("A", "serving")), rec("s", ServedModel("B", "loading"))], NOW + 2)
    assert w.node_moved_at == {"s": NOW + 2} and w.model_moved_at == {"B": NOW + 2}
    w.see([rec("s", ServedModel("B", "serving"))], NOW + 4)  # a died; loading → serving is no move
    assert w.node_moved_at == {"s": NOW + 2} and w.model_moved_at == {"A": NOW + 4, "B": NOW + 2}


# --- a standby adds a replica --------------------------------------------------------------------------


def queued_view(flight: int = 3) -> View:
    return v(
        [serving("h", flight=flight, slots=1, pinned=True), Member("s", 8 * GB, on_disk=frozenset({"A"}))],
        {"A": Demand(30.0, True)},
    )


def test_a_standby_adds_a_replica_of_a_model_queued_on_every_server_once_the_queue_is_sustained() -> None:
    sustained = Recent(sustained={"A": True})
    got = decide(queued_view(), "s", NOW, joining=False, recent=sustained)
    assert isinstance(got, Serve) and (got.model, got.source, got.replaces) == ("A", "disk", None)
    assert "adds a replica of A (2 requests queued beyond the slots of all 1 servers)" in got.reasons[0]
    assert isinstance(decide(queued_view(), "s", NOW, joining=False, recent=Recent(sustained={"A": False})), Stay)
    assert isinstance(decide(queued_view(flight=1), "s", NOW, joining=False, recent=sustained), Stay)


def test_the_standby_runner_adds_the_replica_after_the_queue_lasted() -> None:
    async def main() -> None:
        clock = FakeClock(NOW)
        host = rec("h", ServedModel("A", "serving", 1, slots=1))
        stub = Stub([record("me", disk="A"), host])
        stub.joined.set()
        promoted: list[str] = []

        async def promote(model: str, source: str) -> None:
            promoted.append(model)

        r = StandbyRunner(stub, "me", wants_a, lambda n: GB, dict, promote, clock)
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.run)
            await clock.run_for(5 * CHECK_S, step=0.5)
            assert not promoted  # served, nothing queued
            stub.records = [stub.records[0], rec("h", ServedModel("A", "serving", 4, slots=1))]
            queued_at = clock.monotonic()
            await clock.run_until(lambda: bool(promoted), within=SUSTAIN_S + DECIDE_S + CHECK_S, step=0.5)
        assert promoted == ["A"] and clock.monotonic() - queued_at >= SUSTAIN_S

    anyio.run(main)


# --- the replica watcher ----------------------------------------------------------------------------------


def test_the_watcher_releases_an_idle_replica_after_confirming_and_keeps_a_wanted_one() -> None:
    async def main() -> None:
        clock = FakeClock(NOW)
        state: dict[str, Any] = {"demand": {"A": Demand(5.0, True)}}

        def look() -> tuple[View, Recent]:
            return v([serving("host", pinned=True), serving("me")], state["demand"]), Recent()

        w = ReplicaWatcher("me", "A", look, clock)
        got: list[Any] = []

        async def run() -> None:
            got.append(await w.run())

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await clock.run_for(10 * CHECK_S, step=0.5)
            assert not got and isinstance(w.decision, Stay)
            state["demand"] = IDLE
            idle_at = clock.monotonic()
            await clock.run_until(lambda: bool(got), within=2 * CHECK_S + 0.5, step=0.5)
        assert isinstance(got[0], Release) and clock.monotonic() - idle_at >= CHECK_S  # two looks agreed
        assert w.status()["decision"] == "release"

    anyio.run(main)


def test_the_watcher_moves_to_a_much_hotter_model_when_its_own_has_replicas_to_spare() -> None:
    clock = FakeClock(NOW)
    hot = Member("h2", 8 * GB, assign.HOST, (Served("B", assign.SERVING, 2),), pinned=frozenset({"B"}))
    view = View(
        (serving("h1", pinned=True), serving("me"), hot, Member("x", 1, assign.HOST)),
        {"A": GB, "B": GB},
        {"A": Demand(1.0, True), "B": Demand(60.0, True)},
    )
    w = ReplicaWatcher("me", "A", lambda: (view, Recent()), clock)
    assert w.check() is None  # the first look only
    got = w.check()
    assert isinstance(got, Serve) and (got.model, got.replaces) == ("B", "A")


# --- a loader that never finishes ---------------------------------------------------------------------------


def test_a_member_announcing_loading_forever_is_passed_over_at_its_deadline(tmp_path: Path) -> None:
    """A hostile (or hung) member announces "loading A" and re-signs its record as a live loader does: the intent
    never goes stale. The standby passes it over once the load outlived `load_deadline_s`, not before."""

    async def main() -> None:
        async with cluster(tmp_path) as c:
            await c.node("host", "host")
            loader = await c.node("loader", "host")
            await c.node("s1", "standby", disk=("A",))
            await c.converge()
            loader.state.update_model("A", state="loading")
            await c.clock.run_until(c.sees("s1", "A", "loading"), within=10, step=0.1)
            seen = c.clock.monotonic()
            c.standby("s1", wants_a)
            deadline = load_deadline_s(GB)  # the cluster's sizes: every model 1 GB
            await c.clock.run_until(lambda: c.clock.monotonic() >= seen + deadline - 2 * CHECK_S, within=600, step=1)
            assert not c.promoted, "a standby took over before the load's deadline"
            await c.clock.run_until(lambda: bool(c.promoted), within=4 * CHECK_S + DECIDE_S + 4, step=0.5)
        assert [p[:3] for p in c.promoted] == [("s1", "A", "disk")]

    anyio.run(main)


def test_build_view_marks_overdue_loads_failed_so_the_election_moves_on() -> None:
    recs = [rec("l", ServedModel("A", "loading")), record("s", disk="A")]
    demand = {"A": Demand(5.0, True)}
    fresh = build_view(recs, "s", demand, lambda n: GB, {})
    late = build_view(recs, "s", demand, lambda n: GB, {}, overdue={"l": ["A"]})
    assert isinstance(assign.promotion(fresh, "s", NOW), Stay)
    assert isinstance(assign.promotion(late, "s", NOW), Serve)


def test_a_loader_that_drops_its_intent_for_a_moment_does_not_restart_its_deadline() -> None:
    """A hostile member announces "loading A", drops it for one record, announces it again, just before each
    deadline: the deadline runs from the first sighting all the same (until it serves A, or LOAD_FORGET_S passes)."""
    w = Watch()
    sizes = {"A": GB}.get
    deadline = load_deadline_s(GB)
    loading, idle = [rec("l", ServedModel("A", "loading"))], [rec("l")]
    t = 0.0
    while t < deadline:
        w.see(idle if int(t) % 100 == 98 else loading, NOW + t)  # off for one look every 100 s
        t += 2
    w.see(loading, NOW + t)
    assert w.overdue(NOW + t, sizes) == {"l": ["A"]}
    w2 = Watch()
    w2.see(loading, NOW)
    w2.see(idle, NOW + 2)
    w2.see(idle, NOW + 2 + LOAD_FORGET_S)  # gone long enough: a new load gets a fresh deadline
    w2.see(loading, NOW + 4 + LOAD_FORGET_S)
    assert w2.loading_since == {("l", "A"): NOW + 4 + LOAD_FORGET_S}


def test_the_watch_stays_bounded_whatever_names_a_hostile_member_rotates() -> None:
    w = Watch()
    for i in range(3 * MAX_MOVES // 256):
        served = tuple(ServedModel(f"m{i}-{k}", "loading") for k in range(256))
        w.see([record("h", "host", served)], NOW + i)
    assert len(w.model_moved_at) <= MAX_MOVES and len(w.loading_since) <= MAX_MOVES


def test_a_replica_with_requests_in_flight_here_is_not_released() -> None:
    got = assign.release(v([serving("host", pinned=True), serving("r1", flight=1)], IDLE), "r1", "A", NOW)
    assert isinstance(got, Stay) and "1 request(s) in flight here" in got.reasons[0]


def test_a_released_model_drains_its_requests_in_flight_before_its_server_stops(tmp_path: Path) -> None:
    """The release announces the model stopped at once (nothing new is routed here), waits for the requests in flight
    to finish, and only then drops it — at most DRAIN_S."""
    state = NodeState(node_id="0123456789abcdef", name="n", version="0", api_url="", console_url="")
    clock = FakeClock(NOW)
    setup = ServingSetup(state, Hardware(cpu_cores=2, ram_bytes=8 << 30), tmp_path, tmp_path, ServerSettings())
    setup.clock = clock
    serving = Serving(setup)

    async def main() -> None:
        for in_flight, stopped_after in ((2, 5.0), (1, DRAIN_S)):
            state.update_model("A", state="serving", in_flight=in_flight, detail="")
            dropped: list[float] = []

            async def release(dropped: list[float] = dropped, began: float = clock.monotonic()) -> None:
                await serving._drain("A", "idle")
                dropped.append(clock.monotonic() - began)

            async with anyio.create_task_group() as tg:
                tg.start_soon(release)
                await clock.run_for(1.0, step=0.1)
                assert state.models["A"].state == "stopped" and state.models["A"].detail == "draining: idle"
                assert not dropped  # still draining
                if stopped_after < DRAIN_S:
                    await clock.run_for(stopped_after - 1.0 - 0.5, step=0.1)
                    state.update_model("A", in_flight=0)  # the last request finished
                await clock.run_until(lambda d=dropped: bool(d), within=DRAIN_S + 1, step=0.1)
            assert state.models["A"].detail == "idle"
            assert stopped_after - 1 <= dropped[0] <= stopped_after + 0.5

    anyio.run(main)

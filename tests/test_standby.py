"""The standby runner (issue 14, items 2–3): records → the rules' view, the join rule deferring to the election, and
the runner on the fake clock — over a stub membership, then over in-memory meshes: promotion from disk within the
confirm window, one winner of two, a dead server replaced within seconds of its death being known, and a loading
intent that blocks until it goes stale."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_mcp.errors import ModelError
from mesh_mcp.mesh import meshfile, tokens
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.mesh.records import NodeRecord, ServedModel
from mesh_mcp.mesh.runtime import INTENT_REFRESH_S, Mesh, MeshSettings
from mesh_mcp.serving import assign
from mesh_mcp.serving.assign import Demand, Member, Recent, Serve, Served, Stay, View
from mesh_mcp.serving.standby import (
    CHECK_S,
    CONFIRM_CHECKS,
    ELECTED_GRACE_S,
    StandbyRunner,
    build_view,
    decide,
    describe,
    member,
)
from mesh_mcp.state import NodeState
from mesh_mcp.testing import FakeClock, MemoryNetwork

GB = 10**9
NOW = 1_700_000_000.0
DECIDE_S = CHECK_S * CONFIRM_CHECKS  # the promise: a decision this long after the view says "unserved"


def record(
    nid: str, role: str = "standby", served: tuple[ServedModel, ...] = (), disk: str = "", **kw: Any
) -> NodeRecord:
    base: dict[str, Any] = {"capacity_bytes": 8 * GB, "version": int(NOW * 1000)} | kw
    return NodeRecord(nid, b"", nid, (), role, models_served=served, models_on_disk=tuple(disk.split()), **base)


# --- records → members ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "state", "want_role", "want_state"),
    [
        ("standby", "serving", assign.STANDBY, assign.SERVING),
        ("host", "loading", assign.HOST, assign.LOADING),
        ("host", "downloading", assign.HOST, assign.LOADING),  # a download is an intent to serve
        ("client", "failed", assign.CLIENT, assign.FAILED),
        ("worker", "serving", assign.HOST, assign.SERVING),  # lends to a split: not an idle standby
        ("standby", "stopped", assign.STANDBY, None),  # dropped
    ],
)
def test_a_record_becomes_a_member(role: str, state: str, want_role: str, want_state: str | None) -> None:
    r = record("n1", role, (ServedModel("A", state, in_flight=3),), "A B", version=1_700_000_123_456)
    m = member(r)
    assert (m.node_id, m.role, m.capacity_bytes, m.on_disk) == ("n1", want_role, 8 * GB, frozenset({"A", "B"}))
    want = () if want_state is None else (Served("A", want_state, 3, since=1_700_000_123.456),)
    assert m.served == want  # `since` is the record's version in seconds: its last re-sign


def test_the_view_has_this_nodes_sizes_for_the_demanded_models_and_its_own_failures() -> None:
    asked: list[str] = []

    def sizes(name: str) -> int | None:
        asked.append(name)
        return {"A": GB}.get(name)

    v = build_view([record("me"), record("o")], "me", {"A": Demand(3, True), "B": Demand(1, False)}, sizes, {}, {"A"})
    assert dict(v.sizes) == {"A": GB, "B": None} and sorted(asked) == ["A", "B"]
    assert v.members[0].served == (Served("A", assign.FAILED),) and v.members[1].served == ()


# --- the join rule defers to the election ---------------------------------------------------------------


def view(members: list[Member], demand: dict[str, float], sizes: dict[str, float]) -> View:
    gb = {k: int(v * GB) for k, v in sizes.items()}
    return View(tuple(members), gb, {k: Demand(v, v > 0) for k, v in demand.items()})


def test_two_standbys_joining_together_do_not_both_load_one_model() -> None:
    disk = frozenset({"A"})
    v = view([Member("s1", 8 * GB, on_disk=disk), Member("s2", 8 * GB, on_disk=disk)], {"A": 14}, {"A": 1})
    picks = {nid: assign.pick_on_join(v, nid, NOW) for nid in ("s1", "s2")}
    assert all(isinstance(p, Serve) and p.model == "A" for p in picks.values())  # the join rule alone collides
    got = {nid: decide(v, nid, NOW, joining=True) for nid in ("s1", "s2")}
    winner = assign.elect(v, NOW)["A"].winner
    loser = next(n for n in got if n != winner)
    assert isinstance(got[winner], Serve) and isinstance(got[loser], Stay)
    assert f"joining would serve A, but the election every node computes gives it to node {winner}" in describe(
        got[loser]
    )


def test_a_host_with_no_model_and_an_underserved_pick_keep_the_join_rule() -> None:
    queued = Member("h", 20 * GB, assign.HOST, (Served("B", assign.SERVING, 9, 4),))
    v = view([Member("s", 8 * GB), queued], {"B": 30}, {"B": 1})
    d = decide(v, "s", NOW, joining=True, recent=Recent(sustained={"B": True}))
    assert isinstance(d, Serve) and d.model == "B" and "queued" in d.reasons[1]  # a replica: no election for it
    burst = decide(v, "s", NOW, joining=True)  # queued on this look only: a burst, not yet a trend
    assert isinstance(burst, Stay) and "the queue has not lasted yet" in burst.reasons[0]
    assert isinstance(decide(v, "s", NOW, joining=False), Stay)  # promotion covers unserved models only
    v2 = view([Member("h0", 8 * GB, assign.HOST, on_disk=frozenset({"A"}))], {"A": 5}, {"A": 1})
    d2 = decide(v2, "h0", NOW, joining=True)
    assert isinstance(d2, Serve) and d2.model == "A"  # not a standby: never elected, so the join rule alone


MODELS = ("A", "B", "C")


@st.composite
def views(draw: st.DrawFn) -> View:
    members = []
    for i in range(draw(st.integers(1, 8))):
        role = draw(st.sampled_from([assign.STANDBY, assign.STANDBY, assign.HOST, assign.CLIENT]))
        served: tuple[Served, ...] = ()
        if role == assign.HOST and draw(st.booleans()):
            state = draw(st.sampled_from([assign.SERVING, assign.LOADING, assign.FAILED]))
            served = (Served(draw(st.sampled_from(MODELS)), state, draw(st.integers(0, 9)), 4, NOW - 100),)
        disk = frozenset(draw(st.lists(st.sampled_from(MODELS), max_size=3)))
        members.append(Member(f"n{i}", draw(st.integers(1, 10)) * GB, role, served, disk))
    sizes = {m: draw(st.sampled_from([None, 1 * GB, 4 * GB])) for m in MODELS}
    demand = {m: Demand(r, r > 0) for m in MODELS for r in [draw(st.sampled_from([0.0, 3.0, 20.0]))]}
    return View(tuple(members), sizes, demand, {m: 2 * GB for m in draw(st.lists(st.sampled_from(MODELS)))})


@settings(max_examples=300, deadline=None)
@given(views(), st.lists(st.booleans(), min_size=8, max_size=8))
def test_at_most_one_standby_starts_each_unserved_model_joining_or_not(v: View, joining: list[bool]) -> None:
    unserved = set(assign.elect(v, NOW))
    starts: dict[str, list[str]] = {}
    for i, m in enumerate(v.members):
        if m.role != assign.STANDBY:
            continue
        d = decide(v, m.node_id, NOW, joining[i])
        assert d.reasons and all(isinstance(r, str) and r for r in d.reasons)
        if isinstance(d, Serve) and d.model in unserved:
            starts.setdefault(d.model, []).append(m.node_id)
    assert all(len(nodes) == 1 for nodes in starts.values()), starts


# --- the runner over a stub membership ------------------------------------------------------------------


@dataclass
class Stub:
    records: list[NodeRecord]
    joined: anyio.Event = field(default_factory=anyio.Event)

    def members(self) -> list[NodeRecord]:
        return list(self.records)


def runner(
    mesh: Any, clock: FakeClock, promoted: list[tuple[str, str, float]], me: str = "me", **kw: Any
) -> StandbyRunner:
    async def promote(model: str, source: str) -> None:
        promoted.append((model, source, clock.monotonic()))

    args: dict[str, Any] = {
        "demand": lambda now: {"A": Demand(14.0, True)},
        "sizes": lambda name: GB,
        "catalog": dict,
        "promote": promote,
    } | kw
    return StandbyRunner(mesh, me, clock=clock, **args)


def test_the_runner_waits_for_joining_confirms_logs_once_and_survives_a_bad_look(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        clock = FakeClock(NOW)
        stub = Stub([record("me", disk="A"), record("h", "host", (ServedModel("A", "serving"),))])
        calls = {"n": 0}

        def demand(now: float) -> Mapping[str, Demand]:
            calls["n"] += 1
            if calls["n"] == 3:
                raise ValueError("a malformed view")
            return {"A": Demand(14.0 - calls["n"] / 10, True)}  # decaying: the log line must not repeat

        promoted: list[tuple[str, str, float]] = []
        r = runner(stub, clock, promoted, demand=demand)
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.run)
            await clock.run_for(10, step=0.5)
            assert calls["n"] == 0  # not joined: no look
            stub.joined.set()
            await clock.run_for(4 * CHECK_S, step=0.5)  # looks 1, 2, 3 (raises), 4: A has a server
            assert isinstance(r.decision, Stay) and not promoted
            stub.records = stub.records[:1]  # the server is gone
            gone = clock.monotonic()
            await clock.run_until(lambda: bool(promoted), within=DECIDE_S + 0.01, step=0.1)
            assert not tg.cancel_scope.cancel_called
        assert promoted == [("A", "disk", promoted[0][2])] and promoted[0][2] - gone <= DECIDE_S
        assert r.promoted == ("A", "disk") and r.status()["role"] == "promoted"
        lines = [rec.getMessage() for rec in caplog.records if rec.name == "mesh_llm.serving"]
        assert sum("every demanded model has a server" in ln for ln in lines) == 1, lines
        assert any("standby check failed (ValueError: a malformed view); checking again in 2 s" in ln for ln in lines)
        assert sum(ln.startswith("promoting to serve A from disk: 0 server(s), demand 13.") for ln in lines) == 1, lines

    with caplog.at_level(logging.INFO, "mesh_llm.serving"):
        anyio.run(main)


def test_a_server_missing_from_one_look_only_starts_nothing() -> None:
    async def main() -> None:
        clock = FakeClock(NOW)
        server = record("h", "host", (ServedModel("A", "serving"),))
        stub = Stub([record("me", disk="A"), server])
        stub.joined.set()
        promoted: list[tuple[str, str, float]] = []
        r = runner(stub, clock, promoted)
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.run)
            await clock.run_for(3 * CHECK_S, step=0.5)
            for _ in range(3):  # a heartbeat at the edge of fail_after: gone for one look, back before the next
                stub.records = stub.records[:1]
                await clock.run_for(CHECK_S, step=0.5)
                assert isinstance(r.decision, Serve)
                stub.records = [*stub.records, server]
                await clock.run_for(CHECK_S, step=0.5)
                assert isinstance(r.decision, Stay)
            tg.cancel_scope.cancel()
        assert promoted == []

    anyio.run(main)


def test_a_promote_that_fails_hands_the_job_on() -> None:
    async def main() -> None:
        clock = FakeClock(NOW)
        stub = Stub([record("me", disk="A"), record("zz", disk="A", capacity_bytes=4 * GB)])
        stub.joined.set()
        tries: list[str] = []

        async def promote(model: str, source: str) -> None:
            tries.append(model)
            raise ModelError(f"{model}: the file on disk is truncated")

        r = runner(stub, clock, [], promote=promote)
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.run)
            await clock.run_for(10 * CHECK_S, step=0.5)
            tg.cancel_scope.cancel()
        assert tries == ["A"] and r.failed == {"A"}  # tried once, then never elected for A again here
        assert isinstance(r.decision, Stay) and "A goes to node zz" in r.decision.reasons[0]

    anyio.run(main)


# --- the runner over in-memory meshes -------------------------------------------------------------------


@dataclass
class Cluster:
    tmp: Path
    tg: anyio.abc.TaskGroup
    clock: FakeClock = field(default_factory=FakeClock)
    network: MemoryNetwork = field(init=False)
    meshes: dict[str, Mesh] = field(default_factory=dict)  # by name
    scopes: dict[str, anyio.CancelScope] = field(default_factory=dict)
    token: tokens.InviteToken | None = None
    promoted: list[tuple[str, str, str, float]] = field(default_factory=list)  # (node name, model, source, fake s)
    runners: dict[str, StandbyRunner] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.network = MemoryNetwork(self.clock, latency_s=0.002)

    async def node(self, name: str, role: str, disk: tuple[str, ...] = (), cap: float = 8) -> Mesh:
        home = self.tmp / name
        ident = load_or_create(home)
        state = NodeState(node_id=ident.node_id, name=name, version="0", api_url="", console_url="")
        state.hardware, state.models_on_disk = {"capacity_bytes": int(cap * GB)}, disk
        if self.token is None:
            config, joins = meshfile.create(owner=ident.public_bytes), ()
        else:
            config, joins = meshfile.from_token(self.token), (self.token,)
        mesh = Mesh(ident, config, home, state, MeshSettings(host="127.0.0.1", role=role, joins=joins),
                    clock=self.clock, transport=self.network.transport)  # fmt: skip
        scope = anyio.CancelScope()

        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with scope:
                await mesh.run(task_status=task_status)

        await self.tg.start(run)
        self.token = self.token or tokens.decode(mesh.invite_token())
        self.meshes[name], self.scopes[name] = mesh, scope
        return mesh

    def standby(self, name: str, demand: Callable[[float], Mapping[str, Demand]]) -> StandbyRunner:
        mesh = self.meshes[name]

        async def promote(model: str, source: str) -> None:
            self.promoted.append((name, model, source, self.clock.monotonic()))
            mesh.state.update_model(model, state="loading")  # what the supervisor's serve announces first

        r = StandbyRunner(mesh, mesh.identity.node_id, demand, lambda m: GB, dict, promote, self.clock)
        self.runners[name] = r
        self.tg.start_soon(r.run)
        return r

    async def converge(self) -> None:
        ids = {m.identity.node_id for m in self.meshes.values()}
        await self.clock.run_until(
            lambda: all({r.node_id for r in m.members()} == ids for m in self.meshes.values()), within=30, step=0.25
        )

    def sees(self, name: str, model: str, state: str) -> Callable[[], bool]:
        return lambda: all(
            any(s.name == model and s.state == state for r in m.members() for s in r.models_served)
            for m in self.meshes.values()
        )


@asynccontextmanager
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with anyio.create_task_group() as tg:
        yield Cluster(tmp_path, tg)
        tg.cancel_scope.cancel()


def wants_a(now: float) -> Mapping[str, Demand]:
    return {"A": Demand(14.0, True)}


def test_a_standby_with_the_demanded_model_on_disk_promotes_within_the_confirm_window(tmp_path: Path) -> None:
    async def main() -> None:
        async with cluster(tmp_path) as c:
            await c.node("host", "host")
            await c.node("s1", "standby", disk=("A",))
            await c.converge()
            c.standby("s1", wants_a)
            took = await c.clock.run_until(lambda: bool(c.promoted), within=DECIDE_S, step=0.1)
            await c.clock.run_for(3 * CHECK_S)
        assert [p[:3] for p in c.promoted] == [("s1", "A", "disk")] and took <= DECIDE_S
        reasons = c.runners["s1"].decision.reasons  # type: ignore[union-attr]
        assert "0 server(s), demand 14.0 req/min, on disk, fits 1.0 GB of 8.0 GB" in reasons[0]

    anyio.run(main)


def test_two_standbys_one_unserved_model_exactly_one_promotes_and_the_other_says_why(tmp_path: Path) -> None:
    async def main() -> None:
        async with cluster(tmp_path) as c:
            await c.node("host", "host")
            for name in ("s1", "s2"):
                await c.node(name, "standby", disk=("A",))
            await c.converge()
            demand: dict[str, Demand] = {}
            for name in ("s1", "s2"):
                c.standby(name, lambda now: demand)
            await c.clock.run_for(3 * CHECK_S)  # both past the join rule: nothing is demanded yet
            assert all(isinstance(r.decision, Stay) for r in c.runners.values()) and not c.promoted
            demand["A"] = Demand(14.0, True)
            await c.clock.run_until(lambda: bool(c.promoted), within=DECIDE_S, step=0.1)
            await c.clock.run_for(60, step=0.5)  # long enough for a second promotion, were there one
        assert len(c.promoted) == 1, c.promoted
        winner = c.promoted[0][0]
        loser = c.runners["s2" if winner == "s1" else "s1"]
        assert loser.promoted is None and isinstance(loser.decision, Stay)
        wid = c.meshes[winner].identity.node_id
        assert describe(loser.decision) == (
            f"staying standby: not promoting: every demanded model has a server or a loader: A (node {wid})"
        )

    anyio.run(main)


def test_when_the_last_server_dies_a_standby_promotes_within_seconds_of_the_death_being_known(tmp_path: Path) -> None:
    async def main() -> None:
        async with cluster(tmp_path) as c:
            await c.node("host", "host")
            server = await c.node("server", "host")
            await c.node("s1", "standby", disk=("A",))
            await c.node("s2", "standby", disk=("A",), cap=4)
            server.state.update_model("A", state="serving")
            await c.converge()
            await c.clock.run_until(c.sees("s1", "A", "serving"), within=10, step=0.25)
            for name in ("s1", "s2"):
                c.standby(name, wants_a)
            await c.clock.run_for(30, step=0.5)
            assert not c.promoted  # a server exists: nobody promotes
            assert "every demanded model has a server" in describe(c.runners["s1"].decision)  # type: ignore[arg-type]
            sid = server.identity.node_id
            c.network.kill(sid)
            killed = c.clock.monotonic()
            s1 = c.meshes["s1"]
            await c.clock.run_until(lambda: s1.is_gone(sid), within=30, step=0.1)
            declared = c.clock.monotonic()
            c.scopes["server"].cancel()
            await c.clock.run_until(lambda: bool(c.promoted), within=DECIDE_S + 0.5, step=0.1)
            await c.clock.run_for(30, step=0.5)
        at = c.promoted[0][3]
        print(
            f"\nP6 on the fake clock: death declared {declared - killed:.1f} s after the kill; "
            f"promote called {at - declared:.1f} s after the death was declared (bound {DECIDE_S:g} s + 0.5 s)"
        )
        assert [p[:3] for p in c.promoted] == [("s1", "A", "disk")]  # one promotion: the bigger standby won
        assert 0 < at - declared <= DECIDE_S + 0.5

    anyio.run(main)


async def loading_a(c: Any) -> Mesh:
    """A host, a loader announcing "loading A", and a standby s1 with A on disk that has seen the intent."""
    await c.node("host", "host")
    loader = await c.node("loader", "host")
    # The intent's age is its record's age (`member`): any re-sign refreshes it. Measured RTTs (timed on the CPU
    # counter, so they jitter) would re-sign at random moments; the loader publishes none here.
    loader.rtt.report = lambda now, members: None
    await c.node("s1", "standby", disk=("A",))
    await c.converge()
    loader.state.update_model("A", state="loading")
    await c.clock.run_until(c.sees("s1", "A", "loading"), within=10, step=0.1)
    return loader


def test_a_loading_intent_blocks_promotion_until_it_goes_stale(tmp_path: Path) -> None:
    async def main() -> None:
        async with cluster(tmp_path) as c:
            loader = await loading_a(c)
            # A live loader re-signs its intent every INTENT_REFRESH_S; this one stops (a loader whose record is no
            # longer refreshed: the rule under test is what the others do about a stale intent).
            loader._sync_record = lambda now: None  # type: ignore[method-assign]
            lid = loader.identity.node_id

            def version() -> int:
                return next(r.version for r in c.meshes["s1"].members() if r.node_id == lid)

            signed = version()
            since = signed / 1000 - (c.clock.time() - c.clock.monotonic())  # on the monotonic reading
            c.standby("s1", wants_a)
            stale_at = since + assign.Rules().loading_stale_s
            await c.clock.run_until(lambda: c.clock.monotonic() >= stale_at - 0.5, within=200, step=0.5)
            assert not c.promoted and version() == signed
            reasons = describe(c.runners["s1"].decision)  # type: ignore[arg-type]
            assert f"every demanded model has a server or a loader: A (node {lid})" in reasons
            await c.clock.run_until(lambda: bool(c.promoted), within=DECIDE_S + 1, step=0.1)
        stale_for = c.promoted[0][3] - stale_at
        assert c.promoted[0][1:3] == ("A", "disk") and 0 <= stale_for <= DECIDE_S + 0.5
        assert "announced loading A" in " ".join(c.runners["s1"].decision.reasons)  # type: ignore[union-attr]

    anyio.run(main)


def test_a_live_loader_keeps_its_intent_fresh_so_nobody_takes_over(tmp_path: Path) -> None:
    async def main() -> None:
        async with cluster(tmp_path) as c:
            loader = await loading_a(c)
            lid = loader.identity.node_id
            c.standby("s1", wants_a)
            versions = set()
            for _ in range(int(3 * assign.Rules().loading_stale_s)):
                await c.clock.run_for(1.0, step=0.5)
                versions.add(next(r.version for r in c.meshes["s1"].members() if r.node_id == lid))
            assert not c.promoted, "a standby took over a model a live node is loading"
            refreshes = 3 * assign.Rules().loading_stale_s / INTENT_REFRESH_S
            assert len(versions) >= refreshes - 1, f"the intent was re-signed {len(versions)} times"

    anyio.run(main)


def test_a_member_that_always_wins_the_election_but_never_loads_is_passed_over(tmp_path: Path) -> None:
    """A hostile (or broken) member claims to be a standby with a huge capacity and the file on disk, so it wins
    every election, and never starts: the others pass it over after ELECTED_GRACE_S and the model is served."""

    async def main() -> None:
        async with cluster(tmp_path) as c:
            await c.node("host", "host")
            hostile = await c.node("hostile", "standby", disk=("A",), cap=1000)
            await c.node("s1", "standby", disk=("A",))
            await c.converge()
            c.standby("s1", wants_a)  # the hostile node runs no runner: it never announces loading
            await c.clock.run_for(ELECTED_GRACE_S - 2 * CHECK_S, step=0.5)
            assert not c.promoted, "s1 took over before the elected node's grace ran out"
            assert isinstance(c.runners["s1"].decision, Stay) and hostile.identity.node_id
            await c.clock.run_until(lambda: bool(c.promoted), within=2 * CHECK_S + DECIDE_S + 1, step=0.1)
        assert [p[:3] for p in c.promoted] == [("s1", "A", "disk")]

    anyio.run(main)

"""Clients' demand reaches the mesh (issue 14, item 1; mesh/demand_link.py): a client publishes no record, so it pushes
its demand view to the members it is connected to, and they absorb it into the map they publish.

In one process on the fake clock and the in-memory network: A created the mesh, B joined, C joined with the client
role. Requests at C become A's and B's demand; a flood of pushes from one client is rate-limited; malformed, oversized
or member-sent pushes are refused and the member goes on; a client's pins never pin. The pure parts (`admit`, `due`,
`PushGate`) directly, with hypothesis for the gate's bounds. The real-process end to end (a client's requests make a
standby serve the model) is at the bottom, marked slow.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_mcp.api.app import build_api
from mesh_mcp.api.mesh_directory import MeshDirectory
from mesh_mcp.errors import PeerUnreachable, ProtocolError
from mesh_mcp.mesh import meshfile, tokens
from mesh_mcp.mesh.demand_link import (
    DEMAND_PUSH_S,
    MIN_GAP_S,
    PUSH_FANOUT,
    REFRESH_S,
    DemandLink,
    PushGate,
    Sent,
    admit,
    due,
)
from mesh_mcp.mesh.demand_wire import MAX_WIRE, Item
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.mesh.runtime import Mesh, MeshSettings
from mesh_mcp.mesh.wire import close_quietly
from mesh_mcp.serving.demand import PER_REQUEST
from mesh_mcp.serving.mesh_demand import MeshDemand, connect
from mesh_mcp.state import NodeState
from mesh_mcp.testing import FakeClock, MemoryNetwork
from tests.test_promotion import until_served

GEMMA = "Gemma-3-270M-Q4_K_M"  # a catalog model nobody serves
QWEN = "Qwen2.5-0.5B-Instruct-Q4_K_M"  # another catalog model


class Node:
    """What node.py wires: a mesh, its demand map connected to it and the API, and the demand link."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh, self.state = mesh, mesh.state
        self.demand = MeshDemand(mesh.identity.node_id, mesh.members)
        self.on_demand = connect(self.demand, mesh, mesh.state)
        self.app = build_api(mesh.state, MeshDirectory(mesh), on_demand=self.on_demand)
        self.views: list[tuple[str, tuple[Item, ...]]] = []  # what the link handed on: (sender, items)
        self.link = DemandLink(mesh, self.demand.publish, self._on_view)

    def _on_view(self, sender: str, items: tuple[Item, ...], now: float) -> int:
        self.views.append((sender, items))
        return self.demand.absorb_client(sender, items, now)

    @property
    def node_id(self) -> str:
        return self.mesh.identity.node_id

    def wanted(self) -> dict[str, Any]:
        now = self.mesh.clock.time()
        return {w.name: w for w in self.demand.mesh_map(now).wanted(now)}

    def published(self) -> dict[str, Item]:
        assert self.mesh.gossip is not None
        return {item[0]: item for item in self.mesh.gossip.me.demand}


async def post(node: Node, model: str) -> httpx2.Response:
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=node.app), base_url="http://n") as c:
        return await c.post(
            "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}
        )


async def push(sender: Node, to: Node, items: object) -> None:
    """One raw `demand` push, as a hostile or buggy peer would send it."""
    _, writer = await sender.mesh.dial(to.node_id, "demand", items=items)
    close_quietly(writer)


Body = Callable[[FakeClock, Node, Node, Node], Any]


def scenario(tmp_path: Path, body: Body, *, client_pushes: bool = True) -> None:
    """A (created the mesh) and B members, C a client joined through A's token; C's link runs when `client_pushes`."""
    clock = FakeClock()
    network = MemoryNetwork(clock, latency_s=0.002)

    def mesh(i: int, config: meshfile.MeshConfig, role: str, joins: tuple[tokens.InviteToken, ...] = ()) -> Mesh:
        ident = load_or_create(tmp_path / f"n{i}")
        state = NodeState(node_id=ident.node_id, name=f"n{i}", version="0", api_url="", console_url="")
        settings_ = MeshSettings(role=role, host="127.0.0.1", joins=joins)
        return Mesh(ident, config, tmp_path / f"n{i}", state, settings_, clock=clock, transport=network.transport)

    async def main() -> None:
        async with anyio.create_task_group() as tg, AsyncExitStack() as apps:
            a = Node(mesh(0, meshfile.create(owner=load_or_create(tmp_path / "n0").public_bytes), "host"))
            await tg.start(a.mesh.run)
            token = tokens.decode(a.mesh.invite_token())
            b = Node(mesh(1, meshfile.from_token(token), "host", (token,)))
            c = Node(mesh(2, meshfile.from_token(token), "client", (token,)))
            for n in (b, c):
                await tg.start(n.mesh.run)
            for n in (a, b, c):
                await apps.enter_async_context(n.app.router.lifespan_context(n.app))
                tg.start_soon(n.link.run)  # returns at once on a member
            if client_pushes is False:
                c.link.view = lambda now: ()  # a client with nothing to push: the test pushes by hand
            members = {a.node_id, b.node_id}
            seen = lambda n: {r.node_id for r in n.mesh.members() if r.role != "client"}  # noqa: E731 (C lists itself)
            converged = lambda: all(seen(n) == members for n in (a, b, c))  # noqa: E731
            await clock.run_until(converged, within=60)
            await clock.run_until(lambda: members <= set(c.mesh.transport.connections), within=60)
            await body(clock, a, b, c)
            tg.cancel_scope.cancel()

    anyio.run(main)


# --- in the mesh ---------------------------------------------------------------------------------------------


def test_a_clients_requests_for_a_model_nobody_serves_become_the_members_demand(tmp_path: Path) -> None:
    async def body(clock: FakeClock, a: Node, b: Node, c: Node) -> None:
        for _ in range(5):
            assert (await post(c, GEMMA)).status_code == 404  # no standby in this mesh: nobody expected to serve it
        took = await clock.run_until(lambda: GEMMA in a.wanted() and GEMMA in b.wanted(), within=10, step=0.25)
        assert took <= DEMAND_PUSH_S + 1  # the next push round
        for member in (a, b):
            w = member.wanted()[GEMMA]
            assert w.rate == pytest.approx(5 * PER_REQUEST, rel=0.02) and not w.pinned
            assert {sender for sender, _ in member.views} == {c.node_id}
        # and the members publish it in their signed records, so every other member sees it
        await clock.run_until(lambda: GEMMA in a.published() and GEMMA in b.published(), within=5, step=0.25)
        assert a.published()[GEMMA][4] is False

    scenario(tmp_path, body)


def test_a_client_pushes_only_a_changed_view_or_a_refresh(tmp_path: Path) -> None:
    async def body(clock: FakeClock, a: Node, b: Node, c: Node) -> None:
        await clock.run_for(3 * REFRESH_S, step=0.5)
        assert a.views == [] and b.views == []  # nothing wanted: nothing pushed
        await post(c, GEMMA)
        await clock.run_until(lambda: len(a.views) == 1 and len(b.views) == 1, within=5, step=0.25)
        await clock.run_for(REFRESH_S - DEMAND_PUSH_S - 1, step=0.5)
        assert len(a.views) == 1  # unchanged: not pushed again yet (not every 2 s)
        await clock.run_for(DEMAND_PUSH_S + 2, step=0.5)
        assert len(a.views) == 2  # the refresh
        for _ in range(3):
            await post(c, GEMMA)
        await clock.run_for(DEMAND_PUSH_S + 0.5, step=0.25)
        assert len(a.views) == 3  # changed: pushed at the next round, once
        assert a.views[-1][1] == c.demand.publish(clock.time())

    scenario(tmp_path, body)


def test_a_flood_of_pushes_from_one_client_is_rate_limited(tmp_path: Path) -> None:
    async def body(clock: FakeClock, a: Node, b: Node, c: Node) -> None:
        t = int(clock.time())
        view = [[GEMMA, 1000, t, t, False]]
        async with anyio.create_task_group() as tg:
            for _ in range(50):  # all at one instant of the fake clock
                tg.start_soon(push, c, a, view)
        await clock.run_for(0.1, step=0.05)
        assert len(a.views) == 1 and a.link.refused == 49
        assert len(a.link.gate) == 1
        await clock.run_for(MIN_GAP_S, step=0.25)
        await push(c, a, [[GEMMA, 2000, t, t, False]])  # a gap later: accepted again
        await clock.run_until(lambda: len(a.views) == 2, within=2, step=0.05)
        assert a.wanted()[GEMMA].rate == pytest.approx(2.0, rel=0.02)

    scenario(tmp_path, body, client_pushes=False)


def test_malformed_oversized_and_member_pushes_are_refused_and_the_member_goes_on(tmp_path: Path) -> None:
    async def body(clock: FakeClock, a: Node, b: Node, c: Node) -> None:
        t = int(clock.time())
        bad: list[object] = [
            None,
            "not a list",
            [[GEMMA, 1000, t, t]],  # four fields
            [[GEMMA, 1.5, t, t, False]],  # a float rate
            [[GEMMA, -1, t, t, False]],
            [[GEMMA, 1000, t + 10, t, False]],  # as_of after last_wanted
            [[QWEN, 1000, t, t, False], [GEMMA, 1000, t, t, False]],  # unsorted
            [[GEMMA, 1000, t, t, False], [GEMMA, 1000, t, t, False]],  # twice
            [["x" * 129, 1000, t, t, False]],  # name too long
            [["bad\nname", 1000, t, t, False]],
            [[f"m{i:03d}", 1000, t, t, False] for i in range(MAX_WIRE + 1)],  # oversized
        ]
        for items in bad:
            await push(c, a, items)
            await clock.run_for(MIN_GAP_S, step=0.25)  # past the gate each time: refused for its content
        assert a.views == [] and a.link.refused == len(bad)
        assert GEMMA not in a.wanted()
        await push(b, a, [[GEMMA, 1000, t, t, False]])  # a member: its demand travels in its signed record
        await clock.run_for(0.5, step=0.25)
        assert a.views == [] and a.link.refused == len(bad) + 1
        # the member goes on: a good push is absorbed, gossip still runs
        await push(c, a, [[GEMMA, 1000, t, t, False]])
        await clock.run_until(lambda: GEMMA in a.wanted(), within=2, step=0.05)
        assert {r.node_id for r in a.mesh.members()} == {a.node_id, b.node_id}
        await clock.run_until(lambda: GEMMA in b.wanted(), within=5, step=0.25)  # through A's record

    scenario(tmp_path, body, client_pushes=False)


def test_pinned_entries_from_a_client_do_not_pin(tmp_path: Path) -> None:
    async def body(clock: FakeClock, a: Node, b: Node, c: Node) -> None:
        t = int(clock.time())
        await push(c, a, [[GEMMA, 0, 0, 0, True], [QWEN, 1500, t, t, True]])
        await clock.run_until(lambda: len(a.views) == 1, within=2, step=0.05)
        assert a.views[0][1] == ((QWEN, 1500, t, t, False),)  # the bare pin dropped, the other's flag stripped
        assert GEMMA not in a.wanted()
        assert not a.wanted()[QWEN].pinned and a.wanted()[QWEN].rate == pytest.approx(1.5, rel=0.02)
        await clock.run_until(lambda: QWEN in b.wanted(), within=5, step=0.25)
        assert not b.wanted()[QWEN].pinned and GEMMA not in b.wanted()
        assert a.demand.node.pins == frozenset()

    scenario(tmp_path, body, client_pushes=False)


def test_a_client_does_not_serve_pushes(tmp_path: Path) -> None:
    """A client registers no handler (it absorbs nobody's view): a push to it is refused by the transport."""

    async def body(clock: FakeClock, a: Node, b: Node, c: Node) -> None:
        t = int(clock.time())
        try:
            await push(a, c, [[GEMMA, 1000, t, t, False]])
        except PeerUnreachable:
            pass  # no route back to a client may also be how it ends
        await clock.run_for(1, step=0.25)
        assert c.views == [] and GEMMA not in c.demand.node.known().entries

    scenario(tmp_path, body, client_pushes=False)


# --- pure parts ----------------------------------------------------------------------------------------------


def test_admit_parses_strictly_and_strips_pins() -> None:
    assert admit([]) == ()
    assert admit([[GEMMA, 0, 0, 0, True]]) == ()
    assert admit([[GEMMA, 5, 1, 2, True]]) == ((GEMMA, 5, 1, 2, False),)
    bad: object
    for bad in (None, {}, [[GEMMA, 0, 0, 0, False]], [[GEMMA, True, 1, 2, False]]):
        with pytest.raises(ProtocolError):
            admit(bad)


def test_due_pushes_a_changed_view_a_refresh_and_at_most_the_fanout() -> None:
    view: tuple[Item, ...] = ((GEMMA, 1000, 10, 10, False),)
    other: tuple[Item, ...] = ((GEMMA, 2000, 11, 11, False),)
    assert due((), ["m1"], {}, 0.0) == []
    assert due(view, [], {}, 0.0) == []
    assert due(view, ["m2", "m1"], {}, 0.0) == ["m1", "m2"]
    sent = {"m1": Sent(view, 100.0)}
    assert due(view, ["m1"], sent, 100.0 + REFRESH_S - 0.1) == []
    assert due(view, ["m1"], sent, 100.0 + REFRESH_S) == ["m1"]
    assert due(other, ["m1"], sent, 100.1) == ["m1"]
    many = [f"m{i}" for i in range(10)]
    sticky = {"m9": Sent(view, 0.0)}
    chosen = due(other, many, sticky, 1.0)
    assert len(chosen) == PUSH_FANOUT and chosen[0] == "m9"  # those pushed to before stay chosen


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.floats(0, 2, allow_nan=False)), max_size=200),
    st.integers(1, 8),
)
def test_the_push_gate_keeps_one_push_a_gap_per_sender_and_a_bounded_table(
    events: list[tuple[int, float]], max_senders: int
) -> None:
    gate = PushGate(min_gap_s=1.0, max_senders=max_senders)
    now = 0.0
    accepted: dict[int, list[float]] = {}
    for sender, step in events:
        now += step
        if gate.allow(f"s{sender}", now) == "":
            accepted.setdefault(sender, []).append(now)
        assert len(gate) <= max_senders
    for times in accepted.values():
        assert all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    assert gate.allow("newcomer", now + 1.5) == ""  # once the gap passed, a full table makes room


# --- real processes ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_clients_requests_for_a_model_nobody_serves_make_a_standby_serve_it(spawn: Any, gemma: object) -> None:
    """B is a standby that created the mesh (`--blackboard` puts a model-less node in a mesh); C joins it as a client.
    Only C is asked for Gemma: its requests are answered 503 with Retry-After until B, which saw them through C's
    pushes, promotes itself and answers."""
    from tests.conftest import GEMMA as GEMMA_FILE
    from tests.test_mesh import mesh_node, token_of

    b = mesh_node(spawn, "b", "127.0.0.3", "--blackboard")
    b_id = b.wait_for("B watching as a standby", lambda s: (s.get("standby") or {}).get("decision") == "stay", 120)[
        "node_id"
    ]
    c = mesh_node(spawn, "c", "127.0.0.4", "--client", "--join", token_of(b))
    c.wait_for("C sees B", lambda s: any(p["node_id"] == b_id for p in s["peers"]), timeout=60)
    body = {"model": GEMMA_FILE, "prompt": "Hello", "max_tokens": 4}
    codes, r = until_served(c.api, body, b)
    assert r.headers["x-mesh-node"] == b_id
    assert codes[0] == 503, "a wanted model nobody serves is a 503 while a standby may take it"
    b.wait_log(r"promoting to serve " + GEMMA_FILE, timeout=5)
    print(f"\nC's requests: {codes.count(503)} x 503 before B answered")

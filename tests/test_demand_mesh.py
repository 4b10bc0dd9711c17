"""The demand map in a running mesh (issue 14, item 1), three nodes in one process on the fake clock and the
in-memory network: requests at one node for a model nobody serves (still a 404) show up in every node's map and
`/api/status` within seconds; junk names never do; a node serving a model pins it while it does; a left member's
demand lasts until the TTL; demand decays and expires; a record is re-signed for demand at most once a second."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from inference.hardware import Hardware
from inference.llama_server import ServerSettings
from mesh_mcp.api.app import build_api
from mesh_mcp.api.mesh_directory import MeshDirectory
from mesh_mcp.mesh import meshfile, tokens
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.mesh.runtime import Mesh, MeshSettings
from mesh_mcp.serving.demand import HALF_LIFE_S, PER_REQUEST, TTL_S
from mesh_mcp.serving.mesh_demand import MeshDemand, connect
from mesh_mcp.serving.supervisor import Serving, ServingSetup
from mesh_mcp.state import NodeState
from mesh_mcp.testing import FakeClock, MemoryNetwork

GEMMA = "Gemma-3-270M-Q4_K_M"  # a catalog model nobody serves
JUNK = "totally-not-a-model"
TINY = "tiny-local"  # a file only C holds: known to the mesh because C's record says it serves it


class Node:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh, self.state = mesh, mesh.state
        self.demand = MeshDemand(mesh.identity.node_id, mesh.members)
        self.on_demand = connect(self.demand, mesh, mesh.state)  # what node.py wires
        self.app = build_api(mesh.state, MeshDirectory(mesh), on_demand=self.on_demand)

    def wanted(self) -> dict[str, dict[str, Any]]:
        """This node's `/api/status` demand rows by model."""
        return {row["model"]: row for row in self.state.snapshot()["demand"]}

    def published(self) -> set[str]:
        assert self.mesh.gossip is not None
        return {item[0] for item in self.mesh.gossip.me.demand}


async def post(node: Node, model: str) -> httpx2.Response:
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=node.app), base_url="http://n") as c:
        return await c.post(
            "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}
        )


def scenario(tmp_path: Path, body: Callable[[FakeClock, list[Node], list[anyio.CancelScope]], Any]) -> None:
    """Three meshes (A created it, B and C joined) converged, each with its API and demand wired; then `body`."""
    clock = FakeClock()
    network = MemoryNetwork(clock, latency_s=0.002)

    def mesh(i: int, config: meshfile.MeshConfig, joins: tuple[tokens.InviteToken, ...] = ()) -> Mesh:
        ident = load_or_create(tmp_path / f"n{i}")
        state = NodeState(node_id=ident.node_id, name=f"n{i}", version="0", api_url="", console_url="")
        return Mesh(ident, config, tmp_path / f"n{i}", state, MeshSettings(host="127.0.0.1", joins=joins), clock=clock,
                    transport=network.transport)  # fmt: skip

    async def start(tg: anyio.abc.TaskGroup, m: Mesh) -> anyio.CancelScope:
        scope = anyio.CancelScope()

        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with scope:
                await m.run(task_status=task_status)

        await tg.start(run)
        return scope

    async def main() -> None:
        async with anyio.create_task_group() as tg, AsyncExitStack() as apps:
            first = mesh(0, meshfile.create(owner=load_or_create(tmp_path / "n0").public_bytes))
            nodes = [Node(first)]
            scopes = [await start(tg, first)]
            token = tokens.decode(first.invite_token())
            for i in (1, 2):
                nodes.append(Node(mesh(i, meshfile.from_token(token), (token,))))
                scopes.append(await start(tg, nodes[-1].mesh))
            for n in nodes:
                await apps.enter_async_context(n.app.router.lifespan_context(n.app))
            ids = {n.mesh.identity.node_id for n in nodes}
            await clock.run_until(lambda: all({r.node_id for r in n.mesh.members()} == ids for n in nodes), within=60)
            await body(clock, nodes, scopes)
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_requests_at_one_node_become_every_nodes_demand_junk_never_and_it_decays_and_expires(tmp_path: Path) -> None:
    async def body(clock: FakeClock, nodes: list[Node], scopes: list[anyio.CancelScope]) -> None:
        a, b, c = nodes
        for _ in range(5):  # named in another case: counted under the catalog's name
            r = await post(a, GEMMA.lower())
            assert r.status_code == 404 and "not served" in r.json()["error"]["message"]  # as before issue 14
        for _ in range(3):
            assert (await post(a, JUNK)).status_code == 404
        asked = clock.time()

        took = await clock.run_until(lambda: GEMMA in b.wanted() and GEMMA in c.wanted(), within=10, step=0.25)
        assert took <= 5  # one re-sign (<= 1 s) and a few gossip rounds
        for n in nodes:
            row = n.wanted()[GEMMA]
            assert row["rate_per_min"] == pytest.approx(5 * PER_REQUEST, rel=0.02)
            assert row["pinned"] is False and row["servers"] == 0
            assert 0 <= row["last_wanted_s_ago"] <= took + 1
            assert JUNK not in n.wanted() and JUNK.lower() not in n.wanted() and JUNK not in n.published()
        assert GEMMA in a.published()
        await clock.run_until(lambda: GEMMA in b.published() and GEMMA in c.published(), within=10, step=0.25)

        # decays with the half-life, everywhere
        await clock.run_for(HALF_LIFE_S - (clock.time() - asked), step=0.5)
        for n in nodes:
            assert n.wanted()[GEMMA]["rate_per_min"] == pytest.approx(5 * PER_REQUEST / 2, rel=0.02)

        # A, the only node that saw the requests, leaves: its demand stays (absorbed by B and C) until the TTL
        scopes[0].cancel()
        await clock.run_until(lambda: len(b.mesh.members()) == 2 and len(c.mesh.members()) == 2, within=30)
        assert GEMMA in b.wanted() and GEMMA in c.wanted()
        await clock.run_for(TTL_S - (clock.time() - asked) - 5, step=0.5)
        assert GEMMA in b.wanted() and GEMMA in c.wanted()  # 5 s short of the TTL
        await clock.run_for(10, step=0.5)
        assert GEMMA not in b.wanted() and GEMMA not in c.wanted()
        assert not b.published() and not c.published()

    scenario(tmp_path, body)


def test_a_node_serving_a_model_pins_it_while_it_does(tmp_path: Path) -> None:
    async def body(clock: FakeClock, nodes: list[Node], scopes: list[anyio.CancelScope]) -> None:
        a, b, c = nodes
        c.state.update_model(TINY, state="loading")
        c.demand.pin(TINY)  # what Serving does when it starts a model
        await clock.run_until(lambda: TINY in a.wanted() and TINY in b.wanted(), within=10, step=0.25)
        for n in nodes:
            row = n.wanted()[TINY]
            assert row == {"model": TINY, "rate_per_min": 0.0, "last_wanted_s_ago": None, "pinned": True, "servers": 0}

        # a request at A names C's model by a prefix: answered as before (loading: 503), counted under its name
        r = await post(a, "TINY-L")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert a.wanted()[TINY]["rate_per_min"] == pytest.approx(PER_REQUEST, abs=1e-3)  # shown to 3 decimals
        c.state.update_model(TINY, state="serving")
        seen_at_b = lambda: b.wanted()[TINY]["rate_per_min"] > 0 and b.wanted()[TINY]["servers"] == 1  # noqa: E731
        await clock.run_until(seen_at_b, within=10, step=0.25)

        c.demand.unpin(TINY)  # dropped
        c.state.update_model(TINY, state="stopped")
        await clock.run_until(lambda: not b.wanted()[TINY]["pinned"], within=10, step=0.25)
        assert b.wanted()[TINY]["servers"] == 0 and b.wanted()[TINY]["rate_per_min"] > 0  # A's request stays

    scenario(tmp_path, body)


def test_demand_re_signs_the_record_at_most_once_a_second(tmp_path: Path) -> None:
    async def body(clock: FakeClock, nodes: list[Node], scopes: list[anyio.CancelScope]) -> None:
        a = nodes[0]
        assert a.mesh.gossip is not None
        views: list[tuple[Any, ...]] = []
        start = clock.time()
        for _ in range(500):  # 50 req/s for 10 s: every gossip tick (2 a second) sees a changed view
            a.on_demand(GEMMA, False)
            await clock.run_for(0.02, step=0.02)
            if a.mesh.gossip.me.demand != (views[-1] if views else ()):
                views.append(a.mesh.gossip.me.demand)
        assert clock.time() - start == pytest.approx(10.0)
        assert 8 <= len(views) <= 11  # re-signed about once a second, not on each of the 20 ticks
        # C carries A's demand in its own record (absorbed when it publishes: nobody asked C for its status)
        await clock.run_until(lambda: GEMMA in nodes[2].published(), within=5)
        assert nodes[1].wanted()[GEMMA]["rate_per_min"] > 10

    scenario(tmp_path, body)


def test_the_serving_plane_pins_each_model_it_is_asked_to_serve_until_it_is_dropped(tmp_path: Path) -> None:
    """`Serving` owns the node's demand: a model is pinned from the start of `serve` (a failed load keeps the pin:
    the node was started with it, so the mesh still wants it) until `drop`."""
    state = NodeState(node_id="0123456789abcdef", name="n", version="0", api_url="", console_url="")
    setup = ServingSetup(state, Hardware(cpu_cores=2, ram_bytes=8 << 30), tmp_path, tmp_path, ServerSettings())
    serving = Serving(setup)
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")

    async def main() -> None:
        await serving.serve(str(tmp_path / "broken.gguf"))
        assert state.models["broken"].state == "failed"
        assert serving.demand.node.pins == {"broken"}
        assert state.snapshot()["demand"] == []  # not connected: /api/status shows none
        serving.drop("broken")
        assert serving.demand.node.pins == frozenset()

    anyio.run(main)


@pytest.mark.parametrize(("model", "counted"), [("gemma", ["gemma"]), ("", []), (None, [])])
def test_the_api_calls_back_once_per_request_naming_a_model_and_survives_a_failing_callback(
    model: str | None, counted: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    state = NodeState(node_id="0123456789abcdef", name="n", version="0", api_url="", console_url="")
    seen: list[str] = []

    def on_demand(name: str, served: bool) -> None:
        seen.append(name)
        raise RuntimeError("a bug in the demand map")

    async def main() -> int:
        app = build_api(state, on_demand=on_demand)
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://n") as c:
            r = await c.post("/v1/chat/completions", json={"model": model, "messages": []})
            return r.status_code

    assert anyio.run(main) == 404 and seen == counted
    assert ("counting a request for 'gemma' as demand failed" in caplog.text) == bool(counted)

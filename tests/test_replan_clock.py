"""Re-planning timing of the pipeline-split runner (`serving/split.py` `SplitModel.run`) on a fake clock: real
meshes on the in-memory network (`mesh_mcp.testing`), in one process, every pause of the runner taken on the
injected clock — a host alone waits for capacity and plans again every `WAIT_FOR_CAPACITY_S` fake seconds (and
never while the clock stands still); when a member with room joins, the next plan is a split naming it, and a
worker that lends nothing (no rpc-server link) makes the run re-plan every `REPLAN_PAUSE_S`, saying why, without
ever ending."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from inference.gguf_facts import GGUFFacts, read_facts
from inference.llama_server import ServerSettings
from inference.llamacpp import LlamaCpp
from inference.memory_model import memory_need
from mesh_mcp.mesh import meshfile, tokens
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.mesh.runtime import Mesh, MeshSettings
from mesh_mcp.serving.split import REPLAN_PAUSE_S, WAIT_FOR_CAPACITY_S, SplitModel
from mesh_mcp.state import NodeState
from mesh_mcp.testing import FakeClock, MemoryNetwork, settle
from tests.ggufgen import write_dense

SETTINGS = ServerSettings(ctx_per_slot=512, slots=1)
REAL_BOUND_S = 60  # a safety net in real seconds only: every wait below is on the fake clock


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GGUFFacts]:
    """Weights outweigh compute buffers: two nodes of 3/4 of the need can split it, neither serves it alone."""
    path = write_dense(tmp_path_factory.mktemp("replan") / "wide.gguf", 12, 384, 1000)
    return path, read_facts(path)


def three_quarters(facts: GGUFFacts) -> int:
    return memory_need(facts, SETTINGS.ctx_per_slot, SETTINGS.slots).total * 3 // 4


@dataclass
class States:
    """What the runner reported (`on_state`), each change stamped with the fake clock's monotonic reading."""

    clock: FakeClock
    seen: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def __call__(self, **changes: Any) -> None:
        self.seen.append((self.clock.monotonic(), changes))

    def plans(self) -> list[tuple[float, dict[str, Any]]]:
        """(when, placement) of every plan made so far."""
        return [(t, c["placement"]) for t, c in self.seen if "placement" in c]

    def details(self) -> list[str]:
        return [c["detail"] for _, c in self.seen if "detail" in c]


class Cluster:
    """Meshes on one in-memory network and one fake clock; the first created starts a new mesh, the others join it."""

    def __init__(self, tmp_path: Path, tg: anyio.abc.TaskGroup) -> None:
        self.tmp_path, self.tg = tmp_path, tg
        self.clock = FakeClock()
        self.network = MemoryNetwork(self.clock)
        self.token: tokens.InviteToken | None = None

    async def start(self, name: str, capacity_bytes: int) -> Mesh:
        home = self.tmp_path / name
        ident = load_or_create(home)
        state = NodeState(node_id=ident.node_id, name=name, version="0", api_url="", console_url="")
        state.hardware["capacity_bytes"] = capacity_bytes  # what its record gossips
        joins: tuple[tokens.InviteToken, ...] = ()
        if self.token is None:
            config = meshfile.create(owner=ident.public_bytes)
        else:
            config, joins = meshfile.from_token(self.token), (self.token,)
        settings = MeshSettings(host="127.0.0.1", joins=joins)
        mesh = Mesh(ident, config, home, state, settings, clock=self.clock, transport=self.network.transport)
        with anyio.fail_after(REAL_BOUND_S):
            await self.tg.start(mesh.run)
        if self.token is None:
            self.token = tokens.decode(mesh.invite_token())
        return mesh


@asynccontextmanager
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with anyio.create_task_group() as tg:
        yield Cluster(tmp_path, tg)
        tg.cancel_scope.cancel()


def split_model(host: Mesh, model: tuple[Path, GGUFFacts], capacity_bytes: int, states: States) -> SplitModel:
    path, facts = model
    # The runner never launches a process here (no plan gets that far): a LlamaCpp that names no real build.
    llama = LlamaCpp(bin_dir=host.home / "no-llama-cpp", version="test", backend="cpu")
    return SplitModel(
        llama,
        host.home,
        path,
        "wide",
        facts,
        SETTINGS,
        capacity_bytes,
        on_state=states,
        clock=states.clock,
        mesh=host,
        rtt_cap_ms=60_000,  # RTTs are timed on the CPU's counter (real I/O): a loaded machine must not matter
    )


async def until(clock: FakeClock, condition: Callable[[], bool], within: float) -> None:
    with anyio.fail_after(REAL_BOUND_S):
        await clock.run_until(condition, within=within, step=0.25)


def test_a_host_alone_waits_for_capacity_and_plans_again_every_period_of_fake_time(
    tmp_path: Path, wide: tuple[Path, GGUFFacts]
) -> None:
    async def main() -> None:
        async with cluster(tmp_path) as c:
            capacity = three_quarters(wide[1])
            host = await c.start("host", capacity)
            states = States(c.clock)
            t0 = c.clock.monotonic()
            c.tg.start_soon(split_model(host, wide, capacity, states).run)
            await settle()
            assert [(t, p["kind"]) for t, p in states.plans()] == [(t0, "none")]
            assert states.seen[-1][1]["state"] == "loading"
            assert states.details()[-1].startswith("waiting for capacity: ")

            for _ in range(20):  # the clock stands still: every task runs to quiet, again and again; no new plan
                await settle()
            assert len(states.plans()) == 1

            await c.clock.run_for(WAIT_FOR_CAPACITY_S - 0.25, step=0.25)  # one step short of the period
            assert len(states.plans()) == 1
            await c.clock.run_for(0.25, step=0.25)  # the period, exactly
            assert len(states.plans()) == 2

            n = 4
            await c.clock.run_for(n * WAIT_FOR_CAPACITY_S, step=0.5)
            plans = states.plans()
            assert [t - t0 for t, _ in plans] == [k * WAIT_FOR_CAPACITY_S for k in range(n + 2)]
            assert all(p["kind"] == "none" and p["stages"] == [] for _, p in plans)
            waits = [d for d in states.details() if d.startswith("waiting for capacity: ")]
            assert len(waits) == n + 2 and len(set(waits)) == 1  # said each time, and the same reason
            assert plans[-1][1]["reasons"][-1] in waits[-1]

    anyio.run(main)


def test_a_member_with_room_makes_the_next_plan_a_split_and_a_failed_lease_replans_after_the_pause(
    tmp_path: Path, wide: tuple[Path, GGUFFacts], caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with cluster(tmp_path) as c:
            capacity = three_quarters(wide[1])
            host = await c.start("host", capacity)
            states = States(c.clock)
            c.tg.start_soon(split_model(host, wide, capacity, states).run)
            await settle()
            assert [p["kind"] for _, p in states.plans()] == ["none"]

            # A member with room joins (its Mesh runs no rpc-worker link: no `rpc-lease` handler).
            worker = await c.start("worker", capacity)
            wid = worker.identity.node_id
            await until(c.clock, lambda: any(r.node_id == wid for r in host.members()), within=30)
            joined_at = c.clock.monotonic()

            await until(c.clock, lambda: any(p["kind"] == "split" for _, p in states.plans()), within=30)
            plans = states.plans()
            first = next(i for i, (_, p) in enumerate(plans) if p["kind"] == "split")
            t_split, split = plans[first]
            # the split comes at the end of the wait that was running when the worker joined: not before, not later
            assert first >= 1 and all(p["kind"] == "none" for _, p in plans[:first])
            assert t_split - plans[first - 1][0] == WAIT_FOR_CAPACITY_S and t_split - joined_at <= WAIT_FOR_CAPACITY_S
            assert split["host"] == host.identity.node_id
            assert [s["node_id"] for s in split["stages"]] == [wid, host.identity.node_id]  # the host last: output
            leasing = f"leasing an rpc-server on {wid}"

            # The lease fails (the worker lends nothing): plan again after REPLAN_PAUSE_S, again and again.
            rounds = 5
            await c.clock.run_for(rounds * REPLAN_PAUSE_S - 0.25, step=0.25)
            assert len(states.plans()) == first + rounds  # one step short: the last pause has not ended
            await c.clock.run_for(0.25, step=0.25)
            after = states.plans()[first:]
            assert [t - t_split for t, _ in after] == [k * REPLAN_PAUSE_S for k in range(rounds + 1)]
            same = ("kind", "host", "stages", "tensor_split")  # the same split each time (estimates aside)
            assert all({k: p[k] for k in same} == {k: split[k] for k in same} for _, p in after)

            # each plan tried the lease, each failure was said (the worker reset the stream) and nothing served
            details = states.details()
            tried = details[details.index(leasing) :]
            assert tried[0::2] == [leasing] * (rounds + 1) and len(tried) == 2 * (rounds + 1)
            assert all(re.fullmatch(r"re-planning: .*reset.*", d) for d in tried[1::2]), tried[1::2]
            failures = [c2 for _, c2 in states.seen if str(c2.get("detail", "")).startswith("re-planning: ")]
            assert all(c2["state"] == "loading" and c2["upstream"] is None and c2["pid"] is None for c2 in failures)
            assert "serving" not in {c2.get("state") for _, c2 in states.seen}
            assert caplog.text.count("unknown stream type 'rpc-lease'") == rounds + 1  # the worker's side of it

    anyio.run(main)

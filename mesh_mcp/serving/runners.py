"""One runner per serving outcome: `runner_for(plan, run)` maps what `serving/plan.py` decided to the class that
does it — `Solo` → `SoloModel`, `PipelineSplit` → `SplitModel`, `ExpertShards` → `ShardedModel`. Every runner
serves until cancelled; `ShardedModel` raises `ShardingRefused` when the model must be pipeline-split instead (the
supervisor decides again). A new serving mode adds its outcome in plan.py and its line here."""

from __future__ import annotations

from typing import Protocol

from mesh_mcp.mesh.runtime import Mesh
from mesh_mcp.serving.moe import ShardedModel
from mesh_mcp.serving.plan import ExpertShards, PipelineSplit, Solo
from mesh_mcp.serving.run import ModelRun
from mesh_mcp.serving.solo import SoloModel
from mesh_mcp.serving.split import SplitModel


class Runner(Protocol):
    alias: str

    async def run(self) -> None:
        """Serve until cancelled."""
        ...


def runner_for(
    plan: Solo | PipelineSplit | ExpertShards,
    run: ModelRun,
    mesh: Mesh | None,
    dataplane_port: int = 0,
    dataplane_targets: dict[str, int] | None = None,
) -> Runner:
    """The runner that serves `run`'s model the way `plan` says (`mesh` for the modes over several nodes;
    `dataplane_port`: where this node's data plane serves tensors to split workers without the file;
    `dataplane_targets`: its targets, where a split host registers its own rpc-server for the last worker)."""
    if isinstance(plan, Solo):
        return SoloModel.of(run, gpu_layers=plan.gpu_layers)
    if mesh is None:
        raise AssertionError(f"a {plan.kind} plan without a mesh")  # decide() plans these only in a mesh
    if isinstance(plan, ExpertShards):
        return ShardedModel.of(run, mesh=mesh, force=plan.force)
    return SplitModel.of(
        run, mesh=mesh, force_split=plan.force, dataplane_port=dataplane_port, dataplane_targets=dataplane_targets
    )

"""How this node serves a model — the serving plane's one decision, a pure function of what the node knows.

`decide()` takes the model's GGUF facts (or none: no model to serve), this node's capacity, the gossiped mesh
view (each member's capacity, RTT map, files and llama.cpp build as `placement.NodeCap`s), the flags and, later,
demand, and returns one outcome, each with the reasons a person reads in the log and `/api/status` and the
predicted decode speed where one can be estimated:

- `Solo`: the model fits this node (or there is no mesh to share it with): one llama-server here.
- `PipelineSplit`: a dense model too big for this node (or `--split N`): layers over the nearest members
  (`placement.plan` picks the workers; the runner re-plans as the mesh changes).
- `ExpertShards`: a mixture-of-experts model too big for this node: a standalone shard per node (moe.py); when
  the shards are refused (quality gate, trunk too big) the next decision is made with `shards_refused` set and
  falls back to a pipeline split.
- `Standby`: nothing to serve (yet): a member lends its capacity to other nodes' splits; a client serves nothing.

A new serving mode is a new outcome here and one new runner (`serving/runners.py` maps outcomes to runners);
nothing else changes. No I/O, no clock: the supervisor (`serving/supervisor.py`) gathers the inputs and acts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from inference.gguf_facts import GGUFFacts
from inference.hardware import CPU_BANDWIDTH
from inference.memory_model import memory_need
from inference.placement import NodeCap
from inference.placement import plan as place
from mesh_mcp.errors import ConfigError

GiB = 1 << 30


@dataclass(frozen=True)
class ThisNode:
    """What this node offers: its id, capacity for one model, GPUs, and the llama.cpp backend (once built)."""

    node_id: str
    capacity_bytes: int
    gpus: int = 0
    backend: str = "cpu"
    bandwidth_bytes_s: float = CPU_BANDWIDTH  # memory bandwidth: what the predicted tokens/s rest on
    client: bool = False  # --client: API only, never serves
    in_mesh: bool = False  # a member of a mesh (placement beyond this node is possible)


@dataclass(frozen=True)
class Flags:
    """The operator's flags that shape the decision."""

    split: int | None = None  # --split N: split over N nodes even when the model fits one
    ctx_per_slot: int = 4096
    slots: int = 4
    rtt_cap_ms: float = 80.0


@dataclass(frozen=True)
class Solo:
    gpu_layers: int  # -ngl: every layer on the GPU(s) when there are any and the build can use them
    reasons: tuple[str, ...]
    predicted_tok_s: float | None = None
    kind: str = field(default="solo", init=False)


@dataclass(frozen=True)
class PipelineSplit:
    force: int | None  # --split N, else None (as many nodes as the model needs)
    reasons: tuple[str, ...]
    predicted_tok_s: float | None = None  # from the mesh view at decision time; the runner's plan re-estimates
    kind: str = field(default="split", init=False)


@dataclass(frozen=True)
class ExpertShards:
    force: int | None
    reasons: tuple[str, ...]
    predicted_tok_s: float | None = None
    kind: str = field(default="shards", init=False)


@dataclass(frozen=True)
class Standby:
    lends_capacity: bool  # a member's rpc-servers serve other nodes' splits; False for a client
    reasons: tuple[str, ...]
    predicted_tok_s: None = None
    kind: str = field(default="standby", init=False)


ServingPlan = Solo | PipelineSplit | ExpertShards | Standby


def decide(
    alias: str | None,
    facts: GGUFFacts | None,
    node: ThisNode,
    flags: Flags,
    view: Sequence[NodeCap] = (),
    *,
    shards_refused: str | None = None,
) -> ServingPlan:
    """How this node serves `alias` (`facts` read from its GGUF), or `Standby` when there is no model (`facts`
    None). `view` is the other members as placement sees them (this node is added here); `shards_refused` is why
    expert shards were refused for this model (then a mixture-of-experts model too big is pipeline-split)."""
    if facts is None or alias is None or node.client:
        return _standby(node)
    need = memory_need(facts, flags.ctx_per_slot, flags.slots).total
    sizes = (
        f"needs {need / GiB:.2f} GiB (weights + KV + compute), this node offers {node.capacity_bytes / GiB:.1f} GiB "
        f"({f'{node.gpus} GPU(s)' if node.gpus else 'CPU'})"
    )
    if not node.in_mesh or (flags.split is None and need <= node.capacity_bytes):
        why = f"solo on this node: it {sizes}"
        if need > node.capacity_bytes:
            why = f"solo on this node (in no mesh, so nobody to share it with), though it {sizes}"
        gpu_layers = 999 if node.gpus and node.backend != "cpu" else 0
        return Solo(gpu_layers, (why,), _solo_tok_s(alias, facts, node, flags))
    shards = facts.is_moe and shards_refused is None
    how = "expert shards (a mixture-of-experts model; a pipeline split if they fail the quality gate)"
    if flags.split is not None:
        first = f"split over {flags.split} nodes (--split) as {how if shards else 'a pipeline'}; it {sizes}"
    else:
        first = f"too big for this node: it {sizes}; planning {how if shards else 'a pipeline split'} over the mesh"
    if shards:
        return ExpertShards(flags.split, (first,))
    reasons = (first,) if shards_refused is None else (first, f"expert shards refused: {shards_refused}")
    return PipelineSplit(flags.split, reasons, _split_tok_s(alias, facts, node, flags, view))


def _standby(node: ThisNode) -> Standby:
    if node.client:
        return Standby(False, ("a client: this node serves no model and lends no capacity",))
    if node.in_mesh:
        return Standby(True, ("no model given: offering this node's capacity to the mesh (pipeline splits)",))
    return Standby(False, ("no model given and in no mesh: serving the console only",))


def _me(node: ThisNode) -> NodeCap:
    return NodeCap(node.node_id, node.capacity_bytes, has_file=True, bandwidth_bytes_s=node.bandwidth_bytes_s)


def _solo_tok_s(alias: str, facts: GGUFFacts, node: ThisNode, flags: Flags) -> float | None:
    """Placement's bandwidth-bound estimate for this node alone (None when the model does not fit it)."""
    solo = place(alias, facts, [_me(node)], requester=node.node_id, ctx_tokens=flags.ctx_per_slot, slots=flags.slots)
    return solo.predicted_tok_s if solo.kind == "solo" else None


def _split_tok_s(alias: str, facts: GGUFFacts, node: ThisNode, flags: Flags, view: Sequence[NodeCap]) -> float | None:
    """Placement's estimate for the split it would choose now from `view` (None when none is possible yet); this
    node's own entry in `view`, if any, gives the RTTs it measured."""
    mine = next((n.rtt_ms for n in view if n.node_id == node.node_id), {})
    me = replace(_me(node), rtt_ms=mine)
    others = [n for n in view if n.node_id != node.node_id]
    try:
        found = place(
            alias,
            facts,
            [*others, me],
            requester=node.node_id,
            host=node.node_id,
            ctx_tokens=flags.ctx_per_slot,
            slots=flags.slots,
            force_split=flags.split,
            rtt_cap_ms=flags.rtt_cap_ms,
        )
    except (ConfigError, ValueError):  # --split below 2, a duplicate id: the runner's placement says why
        return None
    return found.predicted_tok_s if found.kind == "split" else None

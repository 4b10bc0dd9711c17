"""Where a mixture-of-experts model's expert shards go, and how many experts each holds — a pure function.

An expert shard is the whole trunk (attention, norms, embeddings, shared experts, output) plus K experts of every
MoE layer (`moe_shard.py`); each shard node runs its own llama-server on it, so nothing crosses the network per
token and the nodes need no RTT bound between them (sessions are routed whole to one shard).

Rules:
- Candidates: the node asked (the coordinator, always shard 0: it has the file and computes the statistics), then
  members that serve (not clients, not leaving), run the same llama.cpp build, and hold the model file (a shard is
  written from the node's own copy; fetching one is not done yet), by capacity, largest first (ties: node id).
- A node can hold K experts per layer when `trunk + K × expert + KV + compute ≤ capacity`, where `expert` is one
  expert's bytes summed over all MoE layers, and at most every expert.
- N shards with K = the least any of them can hold are a plan when K ≥ experts used per token and N × K ≥ the
  experts per layer (every expert lives on some shard). Without `force` the fewest such N is taken (the more
  experts per shard, the more overlap, the better each shard's quality); with `force=N` exactly N.
- Every shard gets the same K (llama.cpp has one `expert_count` per file; equal shards are simpler to reason
  about). The kept experts themselves are chosen later from routing statistics (`moe_assign.assign`).

The plan carries its reasons (numbers included) for the log and `/api/status`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .gguf_facts import GGUFFacts
from .memory_model import memory_need
from .moe_layout import expert_axis_layer
from .placement import NodeCap


@dataclass(frozen=True)
class ExpertBytes:
    """Bytes of a MoE model by role: what every shard holds, and what each expert adds."""

    n_expert: int
    n_expert_used: int
    expert_bytes: int  # one expert, summed over every MoE layer (incl. its router row)
    full_need: int  # weights + KV + compute of the whole model on one device

    def shard_need(self, k: int) -> int:
        return self.full_need - (self.n_expert - k) * self.expert_bytes

    def experts_that_fit(self, capacity: int) -> int:
        """K: experts per layer a node with `capacity` bytes can hold (0 when not even the trunk fits)."""
        if self.expert_bytes <= 0:
            return self.n_expert if capacity >= self.full_need else 0
        room = capacity - self.shard_need(0)
        return max(0, min(self.n_expert, room // self.expert_bytes))


def expert_bytes(facts: GGUFFacts, ctx_tokens: int, slots: int) -> ExpertBytes:
    per_expert = sum(t.n_bytes for t in facts.tensors if expert_axis_layer(t.name) is not None)
    n = max(facts.expert_count, 1)
    return ExpertBytes(
        n_expert=facts.expert_count,
        n_expert_used=facts.expert_used_count,
        expert_bytes=-(-per_expert // n),
        full_need=memory_need(facts, ctx_tokens, slots).total,
    )


@dataclass(frozen=True)
class ShardPlan:
    kind: str  # "shards" | "none"
    model: str
    nodes: tuple[str, ...]  # shard i is served by nodes[i]; nodes[0] is the coordinator
    per_shard: int  # K: experts per layer on every shard
    shard_bytes: int  # memory one shard needs (weights + KV + compute)
    reasons: tuple[str, ...]

    @property
    def n_shards(self) -> int:
        return len(self.nodes)


def spare_for(sizes: ExpertBytes, k: int, nodes: Sequence[NodeCap], *, taken: set[str], build: str = "") -> str | None:
    """A node to take over a shard of K experts per layer: not already serving one, a server (not a client) on the
    same llama.cpp build with the file and room for the shard; the largest such, ties by node id. None: no spare."""
    need = sizes.shard_need(k)
    fit = [
        n
        for n in nodes
        if n.node_id not in taken
        and not n.client
        and n.has_file
        and not (build and n.llama_cpp and n.llama_cpp != build)
        and n.capacity_bytes >= need
    ]
    return min(fit, key=lambda n: (-n.capacity_bytes, n.node_id)).node_id if fit else None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def plan_shards(
    model: str,
    sizes: ExpertBytes,
    nodes: Sequence[NodeCap],
    *,
    me: str,
    force: int | None = None,
    build: str = "",
) -> ShardPlan:
    """Expert shards of `model` over the nodes (see the module docstring); `build`: this node's llama.cpp."""
    reasons: list[str] = []
    by_id = {n.node_id: n for n in nodes}
    if me not in by_id:
        raise ValueError(f"the coordinator {me} must be among the nodes")
    others = []
    for n in nodes:
        if n.node_id == me or n.client:
            continue
        if not n.has_file:
            reasons.append(f"left out: {n.node_id} does not have the model file")
        elif build and n.llama_cpp and n.llama_cpp != build:
            reasons.append(f"left out: {n.node_id} runs llama.cpp {n.llama_cpp}, this node runs {build}")
        else:
            others.append(n)
    others.sort(key=lambda n: (-n.capacity_bytes, n.node_id))
    candidates = [by_id[me], *others]
    fits = [sizes.experts_that_fit(n.capacity_bytes) for n in candidates]
    e, k_min = sizes.n_expert, sizes.n_expert_used
    reasons.append(
        f"{model}: {e} experts per layer, {k_min} used per token; trunk + KV {_gib(sizes.shard_need(0))}, "
        f"{sizes.expert_bytes / 2**20:.2f} MiB per expert; "
        + ", ".join(
            f"{n.node_id} holds {k} experts ({_gib(n.capacity_bytes)})" for n, k in zip(candidates, fits, strict=True)
        )
    )
    counts = [force] if force is not None else range(2, len(candidates) + 1)
    for count in counts:
        if count > len(candidates):
            reasons.append(f"{count} shards asked, {len(candidates)} node(s) can take one")
            break
        if count < 1:
            break
        k = min(fits[:count])
        if k < k_min:
            reasons.append(f"{count} shards: a node holds only {k} experts per layer, below the {k_min} used per token")
            continue
        if count * k < e:
            reasons.append(f"{count} shards × {k} experts < {e}: some experts would live nowhere")
            continue
        chosen = tuple(n.node_id for n in candidates[:count])
        reasons.append(
            f"{count} expert shards of {k}/{e} experts per layer ({_gib(sizes.shard_need(k))} each) on "
            + ", ".join(chosen)
            + (" (--split)" if force is not None else "")
        )
        return ShardPlan("shards", model, chosen, k, sizes.shard_need(k), tuple(reasons))
    return ShardPlan("none", model, (), 0, 0, tuple(reasons))

"""Which experts each shard of a mixture-of-experts model keeps — a pure function of routing statistics.

Input: the model's `n_expert` and `n_expert_used` (top-k), the routing mass of every expert in every layer
(`mass[layer][expert]`: selection counts from `llama-imatrix`, or summed gate probabilities — only the order and
the proportions within a layer matter), the number of shards and either the experts per layer a shard may hold
(`capacity`) or the number of most-used experts every shard replicates (`core`).

Rules (each layer on its own, the same sizes in every layer):
- Every layer of every shard keeps the same number K of experts, K ≥ `n_expert_used`: llama.cpp has one global
  `expert_count`, and a token needs k experts to choose from.
- The **core**, the C experts with the most mass in that layer, is on every shard. The other n − C experts are
  **dealt out** so that every expert lives on at least one shard: heaviest first, each to the shard with the least
  dealt mass that still has room (ties: fewer experts, then the lower shard index), which balances the shards'
  quality. Slots left over once every expert is placed take the next most-used experts the shard lacks.
- Given only `capacity`, C is the largest core that still leaves room to place every expert:
  S·(K − C) ≥ n − C, i.e. C = ⌊(S·K − n) / (S − 1)⌋. Given only `core`, K = C + ⌈(n − C) / S⌉.
- **Expert groups** (DeepSeek-V3 style `n_group`: the router first picks groups of n / n_group consecutive
  experts): groups are the units — ranked by their summed mass, replicated and dealt whole; K and C must then be
  whole numbers of groups.
- Deterministic: ties in mass go to the lower expert id; no randomness, no dict or set order.

The result carries per shard and layer the sorted expert ids, the fraction of routing mass kept, and reasons for
the log. Infeasible requests raise `AssignmentError` saying what would fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mesh_mcp.errors import ModelError

Experts = tuple[tuple[int, ...], ...]  # [layer] -> sorted expert ids


class AssignmentError(ModelError):
    """The experts cannot be split as asked (too little capacity, K below top-k, groups that do not divide)."""


@dataclass(frozen=True)
class Assignment:
    n_expert: int
    n_expert_used: int
    per_shard: int  # K: experts per layer on every shard
    core: int  # C: most-used experts per layer replicated on every shard
    n_group: int
    shards: tuple[Experts, ...]  # [shard][layer] -> sorted expert ids
    kept_mass: tuple[tuple[float, ...], ...]  # [shard][layer] -> fraction of the layer's routing mass kept
    reasons: tuple[str, ...]

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def n_layers(self) -> int:
        return len(self.shards[0]) if self.shards else 0

    def summary(self) -> str:
        return "; ".join(self.reasons)


def _plan_sizes(units: int, n_shards: int, capacity: int | None, core: int | None) -> tuple[int, int]:
    """(K, C) in units (experts, or groups)."""
    if capacity is None and core is None:
        raise ValueError("give capacity (experts per shard) or core (experts on every shard)")
    if capacity is not None:
        k = min(capacity, units)
        if core is None:
            c = k if n_shards == 1 else max(0, min(k, (n_shards * k - units) // (n_shards - 1)))
        else:
            c = core
    else:
        assert core is not None
        c = min(core, units)
        k = c + -(-(units - c) // n_shards)
    return k, c


def assign(
    n_expert: int,
    n_expert_used: int,
    mass: np.ndarray | Sequence[Sequence[float]],
    n_shards: int,
    *,
    capacity: int | None = None,
    core: int | None = None,
    n_group: int = 1,
) -> Assignment:
    """Deal `n_expert` experts per layer over `n_shards` shards (see the module docstring)."""
    m = np.asarray(mass, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] != n_expert or m.shape[0] < 1:
        raise ValueError(f"mass must be [layers][{n_expert} experts], got shape {m.shape}")
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError("routing mass must be finite and non-negative")
    if n_shards < 1 or not 1 <= n_expert_used <= n_expert:
        raise ValueError(f"need n_shards ≥ 1 and 1 ≤ n_expert_used ({n_expert_used}) ≤ n_expert ({n_expert})")
    if (capacity is not None and capacity < 1) or (core is not None and core < 0):
        raise ValueError(f"capacity must be ≥ 1 and core ≥ 0 (got {capacity}, {core})")
    n_group = max(n_group, 1)
    if n_expert % n_group:
        raise ValueError(f"{n_expert} experts do not divide into {n_group} groups")
    units = n_group if n_group > 1 else n_expert  # what is ranked and dealt: groups, or experts
    size = n_expert // units  # experts per unit
    unit_name = f"groups of {size}" if size > 1 else "experts"
    for what, v in (("capacity", capacity), ("core", core)):
        if v is not None and v % size:
            raise AssignmentError(f"{what} {v} is not a whole number of expert groups ({n_group} groups of {size})")
    k, c = _plan_sizes(
        units, n_shards, None if capacity is None else capacity // size, None if core is None else core // size
    )
    if c > k:
        raise AssignmentError(f"a core of {c * size} experts does not fit a shard of {k * size}")
    if n_shards * (k - c) < units - c:
        need = c + -(-(units - c) // n_shards)
        raise AssignmentError(
            f"{n_shards} shard(s) of {k * size} experts with a core of {c * size} cannot hold all {n_expert} experts: "
            f"each shard needs room for {need * size}"
        )
    if k * size < n_expert_used:
        raise AssignmentError(
            f"each shard would keep {k * size} experts per layer, fewer than the {n_expert_used} every token uses"
        )
    unit_mass = m.reshape(m.shape[0], units, size).sum(axis=2)
    per_layer = [_deal(row, n_shards, k, c) for row in unit_mass]
    shards = tuple(
        tuple(tuple(e * size + j for e in sorted(layer[s]) for j in range(size)) for layer in per_layer)
        for s in range(n_shards)
    )
    totals = m.sum(axis=1)
    kept = tuple(
        tuple(
            float(m[layer, list(ids)].sum() / totals[layer]) if totals[layer] > 0 else len(ids) / n_expert
            for layer, ids in enumerate(shard)
        )
        for shard in shards
    )
    reasons = [
        f"{n_shards} shard(s) × {k * size} of {n_expert} experts per layer ({unit_name}): the {c * size} most-used "
        f"replicated on every shard, {n_expert - c * size} dealt out ({(k - c) * size} slots per shard)"
    ]
    for s, fractions in enumerate(kept):
        worst = min(range(len(fractions)), key=lambda i: (fractions[i], i))
        reasons.append(
            f"shard {s} keeps {np.mean(fractions):.1%} of the routing mass on average, "
            f"{fractions[worst]:.1%} in layer {worst} (its least)"
        )
    zero = [i for i, t in enumerate(totals) if t <= 0]
    if zero:
        reasons.append(f"no routing mass in layer(s) {zero}: experts there ranked by id")
    return Assignment(n_expert, n_expert_used, k * size, c * size, n_group, shards, kept, tuple(reasons))


def _deal(mass: np.ndarray, n_shards: int, k: int, c: int) -> list[set[int]]:
    """One layer, in units: the core on every shard, the rest dealt heaviest first to the lightest shard with room,
    then each shard's free slots filled with the most-used units it lacks."""
    order = sorted(range(len(mass)), key=lambda e: (-float(mass[e]), e))
    core, rest = order[:c], order[c:]
    held = [set(core) for _ in range(n_shards)]
    load = [0.0] * n_shards
    for e in rest:
        s = min((s for s in range(n_shards) if len(held[s]) < k), key=lambda s: (load[s], len(held[s]), s))
        held[s].add(e)
        load[s] += float(mass[e])
    for s in range(n_shards):
        for e in rest:
            if len(held[s]) >= k:
                break
            held[s].add(e)
    return held

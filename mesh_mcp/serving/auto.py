"""`--auto`: which catalog model this node serves, from its capacity and what the mesh wants — a pure choice.

Candidates are the catalog's models whose estimated need (`memory_model.estimate_need`: file, KV cache, buffers)
fits `HEADROOM` of this node's capacity — the rest is left for the estimate's error, the OS and other
processes. Among them a model the mesh demands wins (the most wanted first: serving it helps at once); else the
largest (the best answers this machine can give); ties by name. The choice carries its reasons with the numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from inference.catalog import CatalogEntry
from inference.memory_model import estimate_need

HEADROOM = 0.75  # of the node's capacity a chosen model's estimated need may take
GB = 1e9


@dataclass(frozen=True)
class Choice:
    model: str | None  # None: nothing fits
    reasons: tuple[str, ...]


def choose(
    entries: Iterable[CatalogEntry],
    capacity_bytes: int,
    demand: Mapping[str, float] = {},
    ctx_tokens: int = 4096,
    slots: int = 4,
) -> Choice:
    """The model `--auto` serves on a node offering `capacity_bytes` with `slots` × `ctx_tokens` of context;
    `demand` is the mesh's request rate per model (req/min; a model present is wanted)."""
    budget = int(capacity_bytes * HEADROOM)
    needs = [(e, estimate_need(e.size, ctx_tokens, slots)) for e in entries]
    fits = sorted(((e, need) for e, need in needs if need <= budget), key=lambda pair: (-pair[0].size, pair[0].name))
    if not fits:
        return Choice(None, (f"no catalog model fits {HEADROOM:.0%} of this node's {capacity_bytes / GB:.1f} GB",))
    wanted = [(e, need) for e, need in fits if e.name in demand]
    if wanted:
        entry, need = min(wanted, key=lambda pair: (-demand[pair[0].name], -pair[0].size, pair[0].name))
        why = f"the mesh wants it ({demand[entry.name]:.1f} req/min)"
    else:
        entry, need = fits[0]
        why = "the largest catalog model that fits"
    size = f"needs about {need / GB:.2f} GB of {HEADROOM:.0%} × {capacity_bytes / GB:.1f} GB"
    return Choice(entry.name, (f"--auto picks {entry.name}: {why}; it {size}", f"{len(fits)} catalog model(s) fit"))

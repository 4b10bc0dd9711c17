"""The MoE layout of a GGUF model (pure): which tensors carry experts, how they are gated, and which expert sets
can be cut from it.

`moe_layout` reads it from `GGUFFacts` (a `ShardError` for dense models and layouts a shard cannot be cut from),
`normalize_experts` checks an expert assignment against it, and `expert_axis_layer` names the tensors cut along
the expert axis. `inference.moe_shard` writes shards from it; `moe_stats` and `moe_plan` plan with it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mesh_mcp.errors import CorruptModel, ModelError

from .gguf_facts import GGUFFacts

_EXPERT_AXIS = re.compile(
    r"^blk\.(\d+)\.(?:ffn_(?:gate|up|down|gate_up)_exps\.(?:weight|bias|scale)"
    r"|ffn_gate_inp\.(?:weight|bias)|exp_probs_b(?:_vl)?\.bias)$"
)
_UNSUPPORTED = re.compile(r"_chexps\.")  # grovemoe's chunk experts: a second expert axis
_LAYER = re.compile(r"^blk\.(\d+)\.")
_GATING = {1: "softmax", 2: "sigmoid", 3: "softmax over the chosen"}  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE
# What build_moe_ffn is called with per architecture when the GGUF has no `expert_weights_norm` /
# `expert_gating_func` (the `norm_w` and gating arguments in src/models/*.cpp, b11434; the arch-specific code
# ignores the keys for these). Archs absent here (deepseek2, glm4moe, bailingmoe, ...) read both keys.
_RENORMALISES = {
    **dict.fromkeys(
        (
            "llama", "qwen3moe", "qwen3vlmoe", "qwen3next", "granitemoe", "granitehybrid", "dbrx", "phimoe",
            "arctic", "grok", "hunyuan-moe", "ernie4_5-moe", "mistral3", "minimax-m2",
        ),
        True,
    ),
    **dict.fromkeys(("qwen2moe", "olmoe", "deepseek", "jamba", "llada-moe", "nomic-bert-moe", "llama4"), False),
}  # fmt: skip
_ARCH_GATING = {"gpt-oss": "softmax over the chosen", "llama4": "sigmoid", "mimo2": "sigmoid"}

Experts = tuple[tuple[int, ...], ...]  # [layer] -> sorted expert ids; () for layers without experts


class ShardError(ModelError):
    """A model cannot be cut as asked: not a MoE, an unsupported expert layout, or experts that do not match."""


@dataclass(frozen=True)
class MoeLayout:
    architecture: str
    n_expert: int
    expert_used: int  # `expert_used_count` (0 when it is one number per layer)
    n_layers: int  # blk.N indices in the file (block_count, plus next-token-prediction layers if any)
    moe_layers: tuple[int, ...]  # layers with expert tensors
    sliced: frozenset[str]  # tensors cut on the expert axis
    n_group: int  # `expert_group_count`; 1 = no groups
    shared_experts: int = 0  # `expert_shared_count` (always-on experts: part of the trunk, never cut)
    gating: str = "softmax"  # "softmax" | "sigmoid" | "softmax over the chosen" (`expert_gating_func` 1/2/3)
    renormalises: bool | None = None  # the chosen experts' weights are renormalised (None: unknown for this arch)

    @property
    def leading_dense(self) -> int:
        """Layers before the first MoE layer (DeepSeek's `leading_dense_block_count`)."""
        return self.moe_layers[0] if self.moe_layers else self.n_layers

    @property
    def exact_with_top_k(self) -> bool | None:
        """Whether a shard holding a token's top-k experts computes exactly what the full model does: yes when the
        chosen experts' weights do not depend on the experts left out (renormalised softmax, sigmoid, softmax over
        the chosen); no for softmax without renormalisation (the kept experts' weights inflate)."""
        if self.gating != "softmax":
            return True
        return self.renormalises

    def describe(self) -> str:
        exact = {
            True: "a shard holding a token's top-k experts computes exactly what the full model does",
            False: "softmax without renormalisation: a shard's kept experts weigh more than in the full model "
            "(the quality gate measures it)",
            None: "renormalisation unknown for this architecture (the quality gate measures it)",
        }[self.exact_with_top_k]
        parts = [f"{self.architecture}: {self.n_expert} experts per layer in {len(self.moe_layers)} MoE layers"]
        if self.expert_used:
            parts.append(f"{self.expert_used} used per token")
        if self.shared_experts:
            parts.append(f"{self.shared_experts} shared expert(s) kept whole")
        if self.leading_dense:
            parts.append(f"{self.leading_dense} leading dense layer(s)")
        if self.n_group > 1:
            parts.append(f"{self.n_group} expert groups kept whole")
        norm = {True: ", renormalised", False: ", not renormalised", None: ""}[self.renormalises]
        parts.append(f"{self.gating} gating{norm if self.gating == 'softmax' else ''}: {exact}")
        return "; ".join(parts)


def meta_int(meta: dict[str, object], key: str) -> int | None:
    v = meta.get(key)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def moe_layout(facts: GGUFFacts) -> MoeLayout:
    """Which tensors carry experts; `ShardError` for dense models and layouts we cannot cut, `CorruptModel` when
    expert tensors disagree with `expert_count`."""
    arch, path = facts.architecture, facts.path
    n_expert = facts.expert_count
    sliced = [t for t in facts.tensors if _EXPERT_AXIS.match(t.name)]
    if n_expert <= 1 or not any("_exps." in t.name for t in sliced):
        raise ShardError(
            f"{path.name} is not a mixture-of-experts model ({arch}, expert_count {n_expert}, no expert tensors): "
            "it cannot be split by experts; use a pipeline split"
        )
    odd = [t.name for t in facts.tensors if _UNSUPPORTED.search(t.name)]
    if odd:
        raise ShardError(f"{path.name}: {arch} has chunked experts ({odd[0]}): expert shards do not support it")
    for t in sliced:
        if not t.shape or t.shape[-1] != n_expert:
            raise CorruptModel(
                f"{path}: tensor {t.name!r} has shape {list(t.shape)} but expert_count is {n_expert}; re-download it"
            )
    names = {t.name for t in sliced}
    unknown = [
        t.name for t in facts.tensors if "_exps." in t.name and t.name not in names and t.shape[-1:] == (n_expert,)
    ]
    if unknown:  # copied whole it would not match the new expert_count, and llama.cpp would refuse the shard
        raise ShardError(f"{path.name}: {unknown[0]} looks like an expert tensor this version cannot cut")
    layers = [int(m.group(1)) for t in facts.tensors if (m := _LAYER.match(t.name))]
    n_group = meta_int(facts.metadata, f"{arch}.expert_group_count") or 1
    if n_group > 1 and n_expert % n_group:
        raise CorruptModel(f"{path}: {n_expert} experts do not divide into expert_group_count {n_group}")
    gating_func = meta_int(facts.metadata, f"{arch}.expert_gating_func")
    norm = facts.metadata.get(f"{arch}.expert_weights_norm")
    return MoeLayout(
        architecture=arch,
        n_expert=n_expert,
        expert_used=facts.expert_used_count,
        n_layers=max(layers, default=-1) + 1,
        moe_layers=tuple(sorted({t.layer for t in sliced if t.layer is not None})),
        sliced=frozenset(names),
        n_group=n_group,
        shared_experts=meta_int(facts.metadata, f"{arch}.expert_shared_count") or 0,
        gating=_GATING.get(gating_func, "") if gating_func else _ARCH_GATING.get(arch, "softmax"),
        renormalises=norm if isinstance(norm, bool) else _RENORMALISES.get(arch),
    )


def normalize_experts(layout: MoeLayout, experts: Sequence[Sequence[int]], name: str = "the model") -> Experts:
    """Check an assignment against the file: one entry per `blk.N` layer, in every MoE layer the same number of
    distinct ids in [0, n_expert), whole expert groups; entries of layers without experts are ignored. Returns
    the ids sorted (the original expert order), () for layers without experts."""
    if len(experts) != layout.n_layers:
        raise ShardError(
            f"the expert assignment covers {len(experts)} layers, {name} has {layout.n_layers}: "
            "it was made for another model"
        )
    out: list[tuple[int, ...]] = []
    count: int | None = None
    moe = set(layout.moe_layers)
    for layer, ids in enumerate(experts):
        if layer not in moe:
            out.append(())
            continue
        kept = tuple(sorted(int(e) for e in ids))
        if not kept or len(set(kept)) != len(kept) or kept[0] < 0 or kept[-1] >= layout.n_expert:
            raise ShardError(
                f"layer {layer} of the expert assignment ({list(ids)[:8]}…) must name distinct experts "
                f"in 0..{layout.n_expert - 1}"
            )
        if count is not None and len(kept) != count:
            raise ShardError(
                f"layer {layer} keeps {len(kept)} experts, earlier layers {count}: llama.cpp needs the same "
                "expert_count in every layer"
            )
        count = len(kept)
        if layout.n_group > 1:
            size = layout.n_expert // layout.n_group
            groups = {e // size for e in kept}
            if len(kept) != len(groups) * size:
                raise ShardError(
                    f"layer {layer} splits expert groups ({layout.n_group} groups of {size}): keep them whole"
                )
        out.append(kept)
    return tuple(out)


def expert_axis_layer(name: str) -> int | None:
    """The layer of a tensor cut along the expert axis (expert weights, router, expert bias), else None."""
    m = _EXPERT_AXIS.match(name)
    return int(m.group(1)) if m else None

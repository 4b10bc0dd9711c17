"""The memory model: how many bytes one device needs to serve a model's layers with a given context.

Placement and the MoE planner size devices with it (`memory_need`, `stage_memory`, `kv_cache_bytes`,
`model_need_bytes`) over `ModelShape`, the few numbers a plan needs about a model: `inference.gguf_facts.GGUFFacts`
provides them, and tests and simulations fake them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class ModelShape(Protocol):
    """What placement needs to know about a model. `GGUFFacts` is one; tests and simulations fake it."""

    @property
    def n_layers(self) -> int: ...
    @property
    def layer_bytes(self) -> tuple[int, ...]: ...  # weights of blk.N, one entry per layer
    @property
    def non_layer_bytes(self) -> int: ...  # token_embd, output_norm, output, rope tables…
    @property
    def output_bytes(self) -> int: ...  # output.weight, or token_embd when tied
    @property
    def output_tied(self) -> bool: ...
    @property
    def n_embd(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def kv_elements_per_token(self) -> tuple[int, ...]: ...  # per layer: n_head_kv × (key_length + value_length)


# Measured with this pinned llama.cpp on CPU (llama-server, flash attention "auto" = on, n_ubatch 512):
# the compute buffer is ≈ 14 × 4 × n_ubatch × n_embd (activations, n_ff = 3 × n_embd) + 2 × n_ubatch × n_ctx
# (the f16 KQ mask), independent of vocab; the output buffer is 4 × n_vocab × slots. Without flash attention the
# KQ scores add 4 × n_ubatch × n_head × n_ctx (≈ 8 GiB for 32 heads at 128k context): run llama-server with
# flash attention on. Each device of a split allocates its own compute buffer, so every stage pays it.

MiB = 1 << 20
N_UBATCH = 512  # llama.cpp's default physical batch; mesh-llm does not change it
MARGIN_FIXED = 64 * MiB  # per device: allocator slack, graph copies between devices, RPC buffers
MARGIN_SHARE = 0.05  # of the device's weights: padding, repacked CPU copies, fragmentation
KV_PAD = 256  # llama.cpp rounds n_ctx up to a multiple of 256


@dataclass(frozen=True)
class MemoryNeed:
    weights: int
    kv: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


def _padded(ctx_tokens: int) -> int:
    return -(-max(ctx_tokens, 1) // KV_PAD) * KV_PAD


def kv_cache_bytes(facts: ModelShape, ctx_tokens: int, type_bytes: int = 2, layers: range | None = None) -> int:
    """K + V cache for `ctx_tokens` cells in total (all slots; padded to 256 as llama.cpp does), f16 by default:
    Σ over `layers` (default all) of n_head_kv × (key_length + value_length) × cells × type_bytes.

    Conservative for sliding-window layers (sized for the full context) and MLA models (sized from
    key_length/value_length). Recurrent state (Mamba, RWKV layers) is not counted."""
    per_layer = facts.kv_elements_per_token
    picked: Sequence[int] = per_layer if layers is None else [per_layer[i] for i in layers]
    return sum(picked) * _padded(ctx_tokens) * type_bytes


def stage_memory(
    facts: ModelShape, ctx_tokens: int, slots: int, *, layer_bytes: int, kv_elements: int, host: bool
) -> MemoryNeed:
    """`memory_need` from sums already taken: the layers' weight bytes and KV elements per token.

    weights = layer_bytes + (host: every non-layer tensor, plus the output copy of token_embd when tied —
              llama.cpp keeps the input embedding on the host CPU and duplicates a tied output onto the last device)
    kv      = kv_elements × pad256(slots × ctx_tokens) × 2 (f16 K and V)
    compute = 64 MiB + 5 % of weights + 4 × 512 × 16 × n_embd + 2 × 512 × pad256(n_ctx)  (+ host: 4 × n_vocab × slots)
    The compute term is measured (see above) and rounded up; the margins are not measured and are kept small."""
    n_ctx = _padded(slots * ctx_tokens)
    weights = layer_bytes
    compute = MARGIN_FIXED + 4 * N_UBATCH * 16 * facts.n_embd + 2 * N_UBATCH * n_ctx
    if host:
        weights += facts.non_layer_bytes + (facts.output_bytes if facts.output_tied else 0)
        compute += 4 * facts.vocab_size * slots
    compute += int(weights * MARGIN_SHARE)
    return MemoryNeed(weights=weights, kv=kv_elements * n_ctx * 2, compute=compute)


def memory_need(
    facts: ModelShape, ctx_tokens: int, slots: int, *, layers: range | None = None, host: bool = True
) -> MemoryNeed:
    """Memory one device needs to serve `layers` (default: all) with `slots` × `ctx_tokens` of unified KV cache;
    `host` adds what only the host (last) stage holds. The formula is `stage_memory`'s."""
    span = range(facts.n_layers) if layers is None else layers
    return stage_memory(
        facts,
        ctx_tokens,
        slots,
        layer_bytes=sum(facts.layer_bytes[i] for i in span),
        kv_elements=sum(facts.kv_elements_per_token[i] for i in span),
        host=host,
    )


def model_need_bytes(facts: ModelShape, ctx_tokens: int, slots: int) -> int:
    """Bytes to serve the whole model on one device: weights + KV (slots × ctx_tokens, f16) + compute overhead."""
    return memory_need(facts, ctx_tokens, slots).total


def estimate_need(file_bytes: int, ctx_tokens: int = 4096, slots: int = 4) -> int:
    """Bytes a model needs before its header is read (a catalog entry not downloaded yet), on the safe side: the
    file + 25 %, a KV cache of `slots` × `ctx_tokens` at file/4000 bytes per token (capped at 160 KB: an 8B model
    with grouped-query attention takes 128 KB), and 128 MiB of compute buffers. Measured against the header's figure
    (`memory_need`) at 4 × 4096: SmolLM2-135M Q4_1 estimated 0.66 GB for 0.61 GB. `memory_need` replaces it once
    the file is here."""
    kv_per_token = min(file_bytes // 4000, 160_000)
    return int(file_bytes * 1.25) + kv_per_token * ctx_tokens * slots + (128 << 20)

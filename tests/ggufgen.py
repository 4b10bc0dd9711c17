"""Write tiny but real GGUF models with the `gguf` package, for tests of shapes no package ships.

`write_dense` writes a `llama`-architecture model that llama.cpp loads and serves (a 264-token byte-level
BPE vocabulary: 256 byte tokens, 4 merges, 4 control tokens, pre-tokenizer `gpt-2`, a ChatML template);
`write_moe` writes the Mixtral-style MoE variant of it (`llama` with `expert_count`, expert tensors
`blk.N.ffn_{gate,up,down}_exps`). Weights are small seeded random numbers: the output is gibberish,
deterministic for a seed. `vocab` larger than 264 pads with UNUSED tokens, so any size loads.

`write_skewed_moe` writes a `qwen3moe` (router weights renormalised over the chosen top-k) or `olmoe` (softmax over
every expert present, no renormalisation) model whose routing is skewed by construction: in each layer a seeded set
of "hot" experts always outranks the rest (see `SkewedMoe`), so a test knows which experts every token uses.

Shapes follow gguf-py (numpy) order, which is GGML order reversed: `token_embd` is (vocab, n_embd) here and
`[n_embd, vocab]` in the file's tensor directory.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import numpy as np

from inference.tiny_gguf import BASE_VOCAB, MERGES, add_tiny_vocab

WeightType = Literal["f32", "f16", "q8_0"]
SkewedArch = Literal["qwen3moe", "olmoe"]


@dataclass(frozen=True)
class Dims:
    n_layers: int
    n_embd: int
    vocab: int
    n_head: int
    n_head_kv: int
    n_ff: int
    ctx: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _dims(
    n_layers: int, n_embd: int, vocab: int, n_head: int, n_head_kv: int | None, n_ff: int | None, ctx: int
) -> Dims:
    if n_layers < 1 or n_embd < 1 or n_head < 1 or n_embd % n_head:
        raise ValueError(f"bad shape: n_layers={n_layers}, n_embd={n_embd} must divide by n_head={n_head}")
    kv = n_head if n_head_kv is None else n_head_kv
    if n_head % kv:
        raise ValueError(f"n_head={n_head} must be a multiple of n_head_kv={kv}")
    return Dims(n_layers, n_embd, vocab, n_head, kv, n_ff or 2 * n_embd, ctx)


class _Writer:
    """Adds tensors in one weight type; norms stay F32 as llama.cpp expects."""

    def __init__(self, w: gguf.GGUFWriter, wtype: WeightType, seed: int) -> None:
        self.w, self.wtype, self.rng = w, wtype, np.random.default_rng(seed)

    def weight(self, name: str, *shape: int) -> None:
        data = (self.rng.standard_normal(shape) * 0.02).astype(np.float32)
        if self.wtype == "f16":
            self.w.add_tensor(name, data.astype(np.float16))
        elif self.wtype == "q8_0":
            q = gguf.GGMLQuantizationType.Q8_0
            self.w.add_tensor(name, gguf.quants.quantize(data, q), raw_dtype=q)
        else:
            self.w.add_tensor(name, data)

    def norm(self, name: str, n: int) -> None:
        self.w.add_tensor(name, np.ones(n, dtype=np.float32))

    def random(self, *shape: int, std: float = 0.02) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def array(self, name: str, data: np.ndarray) -> None:
        """Add `data` (float32) in the writer's weight type."""
        if self.wtype == "f16":
            self.w.add_tensor(name, data.astype(np.float16))
        elif self.wtype == "q8_0":
            q = gguf.GGMLQuantizationType.Q8_0
            self.w.add_tensor(name, gguf.quants.quantize(data, q), raw_dtype=q)
        else:
            self.w.add_tensor(name, data.astype(np.float32))


def _header(w: gguf.GGUFWriter, d: Dims, name: str, wtype: WeightType) -> None:
    w.add_name(name)
    w.add_context_length(d.ctx)
    w.add_embedding_length(d.n_embd)
    w.add_block_count(d.n_layers)
    w.add_feed_forward_length(d.n_ff)
    w.add_head_count(d.n_head)
    w.add_head_count_kv(d.n_head_kv)
    w.add_rope_dimension_count(d.head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(d.vocab)
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[wtype])
    add_tiny_vocab(w, d.vocab)


def _attention(t: _Writer, d: Dims, i: int) -> None:
    kv = d.n_head_kv * d.head_dim
    t.norm(f"blk.{i}.attn_norm.weight", d.n_embd)
    t.weight(f"blk.{i}.attn_q.weight", d.n_embd, d.n_embd)
    t.weight(f"blk.{i}.attn_k.weight", kv, d.n_embd)
    t.weight(f"blk.{i}.attn_v.weight", kv, d.n_embd)
    t.weight(f"blk.{i}.attn_output.weight", d.n_embd, d.n_embd)
    t.norm(f"blk.{i}.ffn_norm.weight", d.n_embd)


def _write(
    path: Path,
    d: Dims,
    *,
    name: str,
    wtype: WeightType,
    tied: bool,
    seed: int,
    n_expert: int,
    n_expert_used: int,
    split_max_tensors: int,
    alignment: int | None,
) -> list[Path]:
    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    _header(w, d, name, wtype)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
    t = _Writer(w, wtype, seed)
    t.weight("token_embd.weight", d.vocab, d.n_embd)
    for i in range(d.n_layers):
        _attention(t, d, i)
        if n_expert:
            t.weight(f"blk.{i}.ffn_gate_inp.weight", n_expert, d.n_embd)
            t.weight(f"blk.{i}.ffn_gate_exps.weight", n_expert, d.n_ff, d.n_embd)
            t.weight(f"blk.{i}.ffn_up_exps.weight", n_expert, d.n_ff, d.n_embd)
            t.weight(f"blk.{i}.ffn_down_exps.weight", n_expert, d.n_embd, d.n_ff)
        else:
            t.weight(f"blk.{i}.ffn_gate.weight", d.n_ff, d.n_embd)
            t.weight(f"blk.{i}.ffn_up.weight", d.n_ff, d.n_embd)
            t.weight(f"blk.{i}.ffn_down.weight", d.n_embd, d.n_ff)
    t.norm("output_norm.weight", d.n_embd)
    if not tied:
        t.weight("output.weight", d.vocab, d.n_embd)
    shards = w.format_shard_names(path)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return shards


def write_dense(
    path: Path,
    n_layers: int,
    n_embd: int,
    vocab: int = BASE_VOCAB,
    *,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ff: int | None = None,
    ctx: int = 2048,
    wtype: WeightType = "f32",
    tied: bool = False,
    seed: int = 0,
    name: str = "tiny-dense",
    split_max_tensors: int = 0,
    alignment: int | None = None,
) -> Path:
    """A dense `llama` model llama.cpp can load; returns `path`, or its first shard when `split_max_tensors`
    splits it (gguf-py names shards `<stem>-0000i-of-0000N.gguf`)."""
    d = _dims(n_layers, n_embd, vocab, n_head, n_head_kv, n_ff, ctx)
    return _write(
        path,
        d,
        name=name,
        wtype=wtype,
        tied=tied,
        seed=seed,
        n_expert=0,
        n_expert_used=0,
        split_max_tensors=split_max_tensors,
        alignment=alignment,
    )[0]


def write_moe(
    path: Path,
    n_layers: int,
    n_embd: int,
    n_expert: int,
    vocab: int = BASE_VOCAB,
    *,
    n_expert_used: int = 2,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ff: int | None = None,
    ctx: int = 2048,
    wtype: WeightType = "f32",
    tied: bool = False,
    seed: int = 0,
    name: str = "tiny-moe",
) -> Path:
    """A Mixtral-style MoE (`llama` + `expert_count`) llama.cpp can load; returns `path`."""
    if not 1 <= n_expert_used <= n_expert:
        raise ValueError(f"need 1 <= n_expert_used ({n_expert_used}) <= n_expert ({n_expert})")
    d = _dims(n_layers, n_embd, vocab, n_head, n_head_kv, n_ff, ctx)
    return _write(
        path,
        d,
        name=name,
        wtype=wtype,
        tied=tied,
        seed=seed,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        split_max_tensors=0,
        alignment=None,
    )[0]


def dense_tensor_names(n_layers: int, *, tied: bool = False) -> Sequence[str]:
    """The tensor names `write_dense` writes, in order."""
    per = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    names = ["token_embd.weight"] + [f"blk.{i}.{p}.weight" for i in range(n_layers) for p in per]
    return [*names, "output_norm.weight", *([] if tied else ["output.weight"])]


# --- MoE models with routing skewed by construction -------------------------------------------------------------
#
# Dimension 0 of the residual stream is a constant "routing channel": every token embedding has `_CHANNEL` there,
# and no attention or expert output projection writes to it (their row 0 is zero), so after each RMS norm the
# router sees x[0] ≈ _CHANNEL / rms(h) > 0 in every layer. Router row e is `level_e` on dimension 0 plus small
# noise elsewhere: hot experts' levels sit `gap` above the cold ones' (graded a little within each set, so the
# routing mass is skewed inside the sets too), and the noise decides which hot experts a token takes. The output
# layer uses dimension 0 only to push tokens that are not printable ASCII far down, so completions are text whose
# tokens /v1/completions logprobs list one by one (a partial UTF-8 byte would be merged with the next). Expert
# weights are large enough that the experts' mixture changes the next token.
_CHANNEL = 4.0


@dataclass(frozen=True)
class SkewedMoe:
    """A model written by `write_skewed_moe`; `hot[layer]` (sorted ids) are the experts that outrank the others for
    every token, so each token's top-k lies inside them (llama-imatrix confirms it: tests/test_moe_shard.py)."""

    path: Path
    arch: SkewedArch
    n_layers: int
    n_expert: int
    n_expert_used: int
    hot: tuple[tuple[int, ...], ...]
    n_ff: int

    def cold(self, layer: int) -> tuple[int, ...]:
        return tuple(e for e in range(self.n_expert) if e not in self.hot[layer])


def hot_experts(n_layers: int, n_expert: int, n_hot: int, seed: int = 0) -> tuple[tuple[int, ...], ...]:
    """The hot experts of each layer: a seeded choice, different per layer."""
    rng = np.random.default_rng(seed + 7919)
    return tuple(tuple(sorted(int(e) for e in rng.permutation(n_expert)[:n_hot])) for _ in range(n_layers))


def write_skewed_moe(
    path: Path,
    arch: SkewedArch,
    n_layers: int,
    n_embd: int,
    n_expert: int,
    vocab: int = BASE_VOCAB,
    *,
    n_expert_used: int = 2,
    n_hot: int | None = None,
    gap: float = 3.0,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ff: int | None = None,
    ctx: int = 2048,
    wtype: WeightType = "f32",
    seed: int = 0,
    name: str | None = None,
    split_max_tensors: int = 0,
) -> SkewedMoe:
    """A `qwen3moe` or `olmoe` model llama.cpp loads, with routing skewed as described above: `n_hot` experts per
    layer (default 2 × n_expert_used) outrank the rest by `gap` / rms(residual) router logits (3 keeps them apart
    while the cold experts still hold some softmax mass, which olmoe's gating counts). `n_ff` is the expert FFN width
    (`expert_feed_forward_length` for qwen3moe, `feed_forward_length` for olmoe). `split_max_tensors` writes a
    split set (returned `path` is then the first shard)."""
    hot_n = 2 * n_expert_used if n_hot is None else n_hot
    if not 1 <= n_expert_used <= hot_n <= n_expert:
        raise ValueError(f"need 1 <= n_expert_used ({n_expert_used}) <= n_hot ({hot_n}) <= n_expert ({n_expert})")
    d = _dims(n_layers, n_embd, vocab, n_head, n_head_kv, n_ff, ctx)
    if arch == "olmoe" and d.n_head_kv != d.n_head:
        raise ValueError("olmoe's k-norm spans n_embd: it needs n_head_kv == n_head")
    hot = hot_experts(n_layers, n_expert, hot_n, seed)
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    _header(w, d, name or f"tiny-{arch}", wtype)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(n_expert_used)
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(d.n_ff)
    t = _Writer(w, wtype, seed)
    emb = t.random(d.vocab, d.n_embd, std=0.5)
    emb[:, 0] = _CHANNEL
    t.array("token_embd.weight", emb)
    hd, kv = d.head_dim, d.n_head_kv * d.head_dim
    qk_norm = hd if arch == "qwen3moe" else d.n_embd
    for i in range(n_layers):
        t.norm(f"blk.{i}.attn_norm.weight", d.n_embd)
        t.array(f"blk.{i}.attn_q.weight", t.random(d.n_embd, d.n_embd, std=0.1))
        t.array(f"blk.{i}.attn_k.weight", t.random(kv, d.n_embd, std=0.1))
        t.array(f"blk.{i}.attn_v.weight", t.random(kv, d.n_embd, std=0.1))
        out = t.random(d.n_embd, d.n_embd, std=0.05)
        out[0, :] = 0.0
        t.array(f"blk.{i}.attn_output.weight", out)
        t.norm(f"blk.{i}.attn_q_norm.weight", qk_norm)
        t.norm(f"blk.{i}.attn_k_norm.weight", qk_norm)
        t.norm(f"blk.{i}.ffn_norm.weight", d.n_embd)
        t.array(f"blk.{i}.ffn_gate_inp.weight", _router(t, d.n_embd, n_expert, hot[i], gap))
        t.array(f"blk.{i}.ffn_gate_exps.weight", t.random(n_expert, d.n_ff, d.n_embd, std=1.0 / np.sqrt(d.n_embd)))
        t.array(f"blk.{i}.ffn_up_exps.weight", t.random(n_expert, d.n_ff, d.n_embd, std=1.0 / np.sqrt(d.n_embd)))
        down = t.random(n_expert, d.n_embd, d.n_ff, std=2.0 / np.sqrt(d.n_ff))
        down[:, 0, :] = 0.0
        t.array(f"blk.{i}.ffn_down_exps.weight", down)
    t.norm("output_norm.weight", d.n_embd)
    head = t.random(d.vocab, d.n_embd, std=0.3)
    head[:, 0] = -8.0  # through the channel: a large negative logit for tokens that are not printable ASCII ...
    head[[*range(32, 127), *range(256, 256 + len(MERGES))], 0] = 0.0  # ... so completions are readable text
    t.array("output.weight", head)
    shards = w.format_shard_names(path)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return SkewedMoe(shards[0], arch, n_layers, n_expert, n_expert_used, hot, d.n_ff)


def _router(t: _Writer, n_embd: int, n_expert: int, hot: Sequence[int], gap: float) -> np.ndarray:
    """Router rows: level on the routing channel, small noise elsewhere. x[0] after the norm is about
    _CHANNEL / rms ≥ 1 here, so levels are in logits per unit of x[0]; the noise spreads choices inside a set."""
    r = t.random(n_expert, n_embd, std=0.15 / np.sqrt(n_embd))
    cold = [e for e in range(n_expert) if e not in hot]
    for rank, e in enumerate(hot):
        r[e, 0] = (gap + 0.3 * (len(hot) - rank) / len(hot)) / _CHANNEL
    for rank, e in enumerate(cold):
        r[e, 0] = (0.6 * (len(cold) - rank) / max(len(cold), 1)) / _CHANNEL
    return r


# --- a thinking model --------------------------------------------------------------------------------------------

QWEN3_TEMPLATE = Path(__file__).parent / "data" / "qwen3.jinja"  # Qwen3-0.6B's chat template, from llama.cpp's tree
THINKER_THOUGHT, THINKER_ANSWER = "Why? 4.", "Four"  # what the thinker says: no character twice in either


def write_thinker(path: Path, seed: int = 0) -> Path:
    """A 2-layer `llama` (Q4_0, ~0.8 MB) with Qwen3's real chat template (its `enable_thinking` switch) whose greedy
    answer is `<think>THINKER_THOUGHT</think>\\n\\nTHINKER_ANSWER` when the prompt ends as Qwen3's does with thinking
    on (`<|im_start|>assistant\\n`), and `THINKER_ANSWER` alone when it ends as with thinking off (the template's
    empty `<think>\\n\\n</think>\\n\\n`). Like the self-test model (`inference.tiny_gguf.add_bigram_llama`), each
    token's embedding is a random ±1 vector and the output matrix maps it to its successor's logit: the next token
    depends on the last one only, so the vocabulary makes the two prompt endings different tokens (`\\n` and a
    merged `\\n\\n`), `<think>` and `</think>` single user-defined tokens (as in Qwen3's vocabulary), and `<|im_end|>`
    the end of the answer. llama.cpp's own template analysis finds the thinking tags, so `--reasoning-format`,
    `--reasoning` and budgets act on it as on a real Qwen3."""
    from inference.tiny_gguf import SUCCESSOR_EMBD, add_bigram_llama, byte_chars

    chars = byte_chars()
    tokens = [*chars, chars[10] * 2, "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    types = [gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.USER_DEFINED] * 2
    vocab, used = 320, len(tokens)  # padded: rows a multiple of 32 (Q4_0 blocks, the repacked layouts)
    tokens += [f"<|unused_{i}|>" for i in range(vocab - len(tokens))]
    types += [gguf.TokenType.UNUSED] * (vocab - len(types))
    tid = {t: i for i, t in enumerate(tokens)}

    def text(s: str) -> list[int]:
        return [tid[chars[b]] for b in s.encode()]

    chain = [tid[chars[10]], tid["<think>"], *text(THINKER_THOUGHT), tid["</think>"], tid[chars[10] * 2]]
    chain += [*text(THINKER_ANSWER), tid["<|im_end|>"]]
    assert len(set(chain)) == len(chain), "a token twice in the chain would have two successors"
    n = SUCCESSOR_EMBD
    rng = np.random.default_rng(seed)
    embd = np.zeros((vocab, n), dtype=np.float32)
    embd[:used] = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(used, n))
    out = np.zeros((vocab, n), dtype=np.float32)
    for a, b in itertools.pairwise(chain):
        out[b] = embd[a]

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    add_bigram_llama(w, "thinker", 2048, embd, out, rng)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges([f"{chars[10]} {chars[10]}"])
    w.add_bos_token_id(tid["<|endoftext|>"])
    w.add_eos_token_id(tid["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(QWEN3_TEMPLATE.read_text())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

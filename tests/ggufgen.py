"""Write tiny but real GGUF models with the `gguf` package, for tests of shapes no package ships.

`write_dense` writes a `llama`-architecture model that llama.cpp loads and serves (a 264-token byte-level
BPE vocabulary: 256 byte tokens, 4 merges, 4 control tokens, pre-tokenizer `gpt-2`, a ChatML template);
`write_moe` writes the Mixtral-style MoE variant of it (`llama` with `expert_count`, expert tensors
`blk.N.ffn_{gate,up,down}_exps`). Weights are small seeded random numbers: the output is gibberish,
deterministic for a seed. `vocab` larger than 264 pads with UNUSED tokens, so any size loads.

Shapes follow gguf-py (numpy) order, which is GGML order reversed: `token_embd` is (vocab, n_embd) here and
`[n_embd, vocab]` in the file's tensor directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import numpy as np

WeightType = Literal["f32", "f16", "q8_0"]
BASE_VOCAB = 264
_MERGES = (("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġt", "he"))
_CONTROL = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_chars() -> list[str]:
    """GPT-2's byte → printable character table (byte-level BPE stores bytes as these characters)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def vocabulary(size: int = BASE_VOCAB) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of the tiny BPE vocabulary, padded to `size` with UNUSED tokens."""
    if size < BASE_VOCAB:
        raise ValueError(f"the tiny vocabulary has {BASE_VOCAB} tokens; vocab={size} is too small")
    tokens = _byte_chars()
    types = [gguf.TokenType.NORMAL] * 256
    for a, b in _MERGES:
        tokens.append(a + b)
        types.append(gguf.TokenType.NORMAL)
    tokens += list(_CONTROL)
    types += [gguf.TokenType.CONTROL] * len(_CONTROL)
    pad = size - len(tokens)
    tokens += [f"<|unused_{i}|>" for i in range(pad)]
    types += [gguf.TokenType.UNUSED] * pad
    return tokens, [int(t) for t in types], [f"{a} {b}" for a, b in _MERGES]


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
    tokens, types, merges = vocabulary(d.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(256 + len(_MERGES))
    w.add_eos_token_id(256 + len(_MERGES) + 1)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)


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

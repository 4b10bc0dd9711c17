"""Tiny real GGUF models written with the `gguf` package: the byte-level vocabulary, and the self-test's
known-answer model.

`add_tiny_vocab` writes a 264-token byte-level BPE vocabulary (256 byte tokens, 4 merges, 4 control tokens,
pre-tokenizer `gpt-2`, a ChatML template), padded with UNUSED tokens to any larger size; llama.cpp loads,
tokenizes and serves it. tests/ggufgen.py builds its test models on it.

`add_bigram_llama` writes the keys and tensors of a `llama` whose next token depends on the last one alone (the
self-test model's construction, also used by tests/ggufgen.py's thinker). `write_successor_model` writes the model
the build self-test runs (inference/selftest.py): a 2-layer
`llama` whose greedy continuation of any byte token t is the byte token t+1 (mod 256). Token embeddings are
random ±1 vectors; the output matrix maps each embedding to its successor's logit row; the layers' own
weights are small random numbers, so every matrix multiplication runs on real data and none of them can
change the answer unless a kernel computes garbage. The margin is large: the right logit is about 256, the
best wrong one about 50. Matrices are Q4_0 with sizes that take every CPU path llama.cpp has for them —
the repacked AVX2/AVX-512 and ARM layouts and the AMX tiles (rows a multiple of 32, a prompt batch > 1) —
so a build whose kernels crash or miscompute on this CPU fails on it in a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

BASE_VOCAB = 264
MERGES = (("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġt", "he"))
CONTROL = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The self-test model's shape. 320 tokens and 256/512 wide: multiples of 32 (AMX tiles, Q4_0 blocks) and of
# 8 rows (the repacked 8x8 layouts).
SUCCESSOR_VOCAB, SUCCESSOR_EMBD, SUCCESSOR_FF, SUCCESSOR_LAYERS, SUCCESSOR_HEADS = 320, 256, 512, 2, 4
SUCCESSOR_VERSION = 1  # part of the file name: a changed model is written afresh


def byte_chars() -> list[str]:
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
    tokens = byte_chars()
    types = [gguf.TokenType.NORMAL] * 256
    for a, b in MERGES:
        tokens.append(a + b)
        types.append(gguf.TokenType.NORMAL)
    tokens += list(CONTROL)
    types += [gguf.TokenType.CONTROL] * len(CONTROL)
    pad = size - len(tokens)
    tokens += [f"<|unused_{i}|>" for i in range(pad)]
    types += [gguf.TokenType.UNUSED] * pad
    return tokens, [int(t) for t in types], [f"{a} {b}" for a, b in MERGES]


def add_tiny_vocab(w: gguf.GGUFWriter, size: int) -> None:
    """The tokenizer keys of the tiny vocabulary (BOS/EOS are its first two control tokens, no BOS added)."""
    tokens, types, merges = vocabulary(size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(256 + len(MERGES))
    w.add_eos_token_id(256 + len(MERGES) + 1)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)


def successor(token: int) -> int:
    """The self-test model's greedy next token after byte token `token`."""
    return (token + 1) % 256


def _q4_0(w: gguf.GGUFWriter, name: str, data: np.ndarray) -> None:
    q = gguf.GGMLQuantizationType.Q4_0
    w.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), q), raw_dtype=q)


def add_bigram_llama(
    w: gguf.GGUFWriter, name: str, context: int, embd: np.ndarray, out: np.ndarray, rng: np.random.Generator
) -> None:
    """The keys (all but the tokenizer's) and tensors of a `SUCCESSOR_LAYERS`-layer Q4_0 `llama` whose greedy next
    token depends on the last token alone: `embd` (vocab × `SUCCESSOR_EMBD`) is the token embedding and `out` the
    output matrix (row t = the embedding of the token t follows); the layers' own weights are small random numbers
    from `rng`, so every matrix multiplication runs on real data without changing the answer."""
    v, n = embd.shape
    ff, heads = SUCCESSOR_FF, SUCCESSOR_HEADS
    w.add_name(name)
    w.add_context_length(context)
    w.add_embedding_length(n)
    w.add_block_count(SUCCESSOR_LAYERS)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(n // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(v)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)

    def small(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    _q4_0(w, "token_embd.weight", embd)
    for i in range(SUCCESSOR_LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n, dtype=np.float32))
        for part in ("q", "k", "v", "output"):
            _q4_0(w, f"blk.{i}.attn_{part}.weight", small(n, n))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n, dtype=np.float32))
        _q4_0(w, f"blk.{i}.ffn_gate.weight", small(ff, n))
        _q4_0(w, f"blk.{i}.ffn_up.weight", small(ff, n))
        _q4_0(w, f"blk.{i}.ffn_down.weight", small(n, ff))
    w.add_tensor("output_norm.weight", np.ones(n, dtype=np.float32))
    _q4_0(w, "output.weight", out)


def write_successor_model(path: Path, seed: int = 0) -> Path:
    """Write the self-test model to `path` (atomically: a reader never sees half a file); returns `path`."""
    v, n = SUCCESSOR_VOCAB, SUCCESSOR_EMBD
    rng = np.random.default_rng(seed)
    embd = np.zeros((v, n), dtype=np.float32)
    embd[:256] = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(256, n))
    out = np.zeros((v, n), dtype=np.float32)
    for t in range(256):
        out[successor(t)] = embd[t]  # logit of t+1 = <embd[t], h> ≈ n when h ≈ embd[t]

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(tmp), "llama")
    add_bigram_llama(w, "mesh-llm self-test (successor)", 512, embd, out, rng)
    add_tiny_vocab(w, v)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

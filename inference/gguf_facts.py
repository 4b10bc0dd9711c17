"""GGUF facts from the header alone: architecture, layers, context, experts, chat template, tensor directory.

A header-only reader (no tensor data, no numpy) so scanning a models directory is fast, and so a corrupt or
truncated file gives a clear `CorruptModel` instead of a llama-server exit code. The tensor directory gives
each tensor's name, shape (GGML order: `ne[0]`, the row length, first), ggml type, byte size and absolute
data offset (`general.alignment`, default 32). Every tensor must lie inside its file: one that ends past the
end means a truncated download.

Split models (`split.count` > 1, files `<prefix>-0000i-of-0000N.gguf` as llama-gguf-split and gguf-py name
them): `read_facts` on any shard reads the metadata of the first and the tensor directories of all shards,
so the facts describe the whole model; `file_size` is then the sum of the shards. A missing shard is a
`CorruptModel` naming it (llama.cpp could not load the model either).

`GGUFFacts` provides the numbers `inference.memory_model.ModelShape` asks for (layer and output bytes, KV
elements per token), so placement can size a model from its facts.

One responsibility, the GGUF header format, read in one pass: the KV walker, the tensor directory and split
shards share one reader and its bounds, so the module is longer than ~400 lines.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from mesh_mcp.errors import CorruptModel

MAGIC = b"GGUF"
# Value types from the GGUF spec.
_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 64 << 20  # a chat template is a few KB; 64 MiB means a corrupt length
# Arrays longer than this are skipped rather than kept (tokenizer vocabularies) ...
_KEEP_ARRAY = 64
# ... except per-layer numbers needed for the KV cache (one entry per layer).
_PER_LAYER_KEYS = (".attention.head_count", ".attention.head_count_kv")
_KEEP_PER_LAYER = 1 << 16
_MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
_LAYER = re.compile(r"blk\.(\d+)\.")
_SHARD = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# ggml type id -> (elements per block, bytes per block); gguf-py's GGML_QUANT_SIZES (0.19.0), copied so the
# reader needs neither numpy nor the 250 ms import of `gguf`. Ids unknown here are looked up there lazily.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
}


def ggml_block(ggml_type: int) -> tuple[int, int] | None:
    """(elements per block, bytes per block) of a ggml type, or None when no table knows it."""
    if ggml_type in GGML_BLOCKS:
        return GGML_BLOCKS[ggml_type]
    try:  # a type newer than our table: gguf-py may know it (imports numpy; only on this rare path)
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ImportError, ValueError, KeyError):
        return None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGML order: ne[0] (the row) first, as stored in the file
    ggml_type: int
    n_bytes: int
    offset: int  # absolute offset of the data in its file (shard)
    shard: int = 0  # index into GGUFFacts.shard_paths; 0 for an unsplit file

    @property
    def layer(self) -> int | None:
        """N for `blk.N.*` tensors, None for the rest (embeddings, output, rope tables)."""
        m = _LAYER.match(self.name)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class GGUFFacts:
    path: Path
    file_size: int  # all shards together for a split model
    version: int
    n_tensors: int
    architecture: str
    name: str | None
    block_count: int | None
    context_length: int | None
    embedding_length: int | None
    expert_count: int
    expert_used_count: int
    has_chat_template: bool
    metadata: dict[str, object]
    alignment: int = DEFAULT_ALIGNMENT
    tensors: tuple[TensorInfo, ...] = ()
    vocab_size: int = 0  # tokenizer token count, else token_embd's ne[1]
    split_count: int = 1
    shard_paths: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def is_moe(self) -> bool:
        return self.expert_count > 1

    @property
    def template_thinks(self) -> bool:
        """Whether the embedded chat template makes a thinking model (`template_thinks`; the serving llama-server's
        rendering is the authority, see `LlamaServer.thinking`)."""
        template = self.metadata.get("tokenizer.chat_template")
        return isinstance(template, str) and template_thinks(template)

    @property
    def template_calls_tools(self) -> bool:
        """Whether the embedded chat template renders tools and tool calls (a guess from its text; the
        serving llama-server's `/props` `chat_template_caps` is the authority, see `LlamaServer.tool_calls`)."""
        template = self.metadata.get("tokenizer.chat_template")
        return isinstance(template, str) and "tools" in template and "tool_call" in template

    def _num(self, key: str) -> int | None:
        v = self.metadata.get(f"{self.architecture}.{key}")
        return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    def _per_layer(self, key: str, default: int) -> tuple[int, ...]:
        v = self.metadata.get(f"{self.architecture}.{key}")
        if isinstance(v, list) and len(v) == self.n_layers and all(isinstance(x, int) for x in v):
            return tuple(int(x) for x in v)
        one = int(v) if isinstance(v, int) and not isinstance(v, bool) else default
        return (one,) * self.n_layers

    @cached_property
    def tensor(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    @cached_property
    def n_layers(self) -> int:
        """`block_count`; else counted from `blk.N` tensors. llama.cpp puts `blk.N` with N ≥ block_count (next-token
        prediction heads) with the output layer: they count as non-layer bytes here."""
        if self.block_count:
            return self.block_count
        return max((t.layer for t in self.tensors if t.layer is not None), default=-1) + 1

    @property
    def n_embd(self) -> int:
        emb = self.tensor.get("token_embd.weight")
        return self.embedding_length or (emb.shape[0] if emb else 0)

    @property
    def weight_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @cached_property
    def layer_bytes(self) -> tuple[int, ...]:
        per = [0] * self.n_layers
        for t in self.tensors:
            if t.layer is not None and t.layer < self.n_layers:
                per[t.layer] += t.n_bytes
        return tuple(per)

    @property
    def non_layer_bytes(self) -> int:
        return self.weight_bytes - sum(self.layer_bytes)

    @property
    def output_tied(self) -> bool:
        return "output.weight" not in self.tensor and "token_embd.weight" in self.tensor

    @property
    def output_bytes(self) -> int:
        out = self.tensor.get("output.weight") or self.tensor.get("token_embd.weight")
        return out.n_bytes if out else 0

    @property
    def n_head(self) -> int:
        return max(self._per_layer("attention.head_count", 0), default=0)

    @property
    def n_head_kv(self) -> tuple[int, ...]:
        """Per layer; 0 for layers without attention (recurrent layers of hybrid models)."""
        heads = self._per_layer("attention.head_count", 0)
        kv = self._per_layer("attention.head_count_kv", -1)
        return tuple(h if k < 0 else k for h, k in zip(heads, kv, strict=True))

    @property
    def key_length(self) -> int:
        n_head = self.n_head
        return self._num("attention.key_length") or (self.n_embd // n_head if n_head else 0)

    @property
    def value_length(self) -> int:
        n_head = self.n_head
        return self._num("attention.value_length") or (self.n_embd // n_head if n_head else 0)

    @property
    def kv_elements_per_token(self) -> tuple[int, ...]:
        per_head = self.key_length + self.value_length
        return tuple(k * per_head for k in self.n_head_kv)


class _Reader:
    def __init__(self, fh: BinaryIO, path: Path, size: int, keep: frozenset[str] = frozenset()) -> None:
        self.fh, self.path, self.size = fh, path, size
        self.array_lengths: dict[str, int] = {}
        self.keep = keep  # string arrays kept whole (as bytes) however long: the vocabulary, for `read_vocab`

    def truncated(self) -> CorruptModel:
        return CorruptModel(f"{self.path} is truncated: its GGUF header ends early ({self.size} bytes); re-download it")

    def take(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise self.truncated()
        return data

    def skip(self, n: int) -> None:
        if self.fh.tell() + n > self.size:
            raise self.truncated()
        self.fh.seek(n, 1)

    def skip_strings(self, count: int, out: list[bytes] | None = None) -> None:
        """Skip `count` length-prefixed strings, walking 1 MiB chunks (a 150k-token vocabulary in ~40 ms); with
        `out`, each string's bytes are appended to it."""
        pos = self.fh.tell()
        buf, base = b"", pos  # buf holds the file's bytes from offset `base`
        unpack, limit = struct.Struct("<Q").unpack_from, min(_MAX_STRING, self.size)
        for _ in range(count):
            if pos + 8 > base + len(buf):
                self.fh.seek(pos)
                buf, base = self.fh.read(1 << 20), pos
                if len(buf) < 8:
                    raise self.truncated()
            n = unpack(buf, pos - base)[0]
            if n > limit:
                raise CorruptModel(f"{self.path}: corrupt GGUF header (a string claims {n} bytes)")
            if out is not None:
                if pos + 8 + n > base + len(buf):
                    self.fh.seek(pos)
                    buf, base = self.fh.read(max(1 << 20, 8 + n)), pos
                    if len(buf) < 8 + n:
                        raise self.truncated()
                out.append(buf[pos - base + 8 : pos - base + 8 + n])
            pos += 8 + n
        if pos > self.size:
            raise self.truncated()
        self.fh.seek(pos)

    def scalar(self, fmt: str) -> int | float | bool:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        return int(self.scalar("<I"))

    def u64(self) -> int:
        return int(self.scalar("<Q"))

    def string(self) -> str:
        n = self.u64()
        if n > min(_MAX_STRING, self.size):
            raise CorruptModel(f"{self.path}: corrupt GGUF header (a string claims {n} bytes)")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str = "") -> object:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.u32(), self.u64()
            if count > self.size:
                raise CorruptModel(f"{self.path}: corrupt GGUF header (an array claims {count} items)")
            self.array_lengths[key] = count
            keep = _KEEP_PER_LAYER if key.endswith(_PER_LAYER_KEYS) else _KEEP_ARRAY
            if item_type == _STRING and key in self.keep:
                strings: list[bytes] = []
                self.skip_strings(count, strings)
                return tuple(strings)
            if count <= keep:
                return [self.value(item_type) for _ in range(count)]
            if item_type in _SCALARS:
                self.skip(struct.calcsize(_SCALARS[item_type]) * count)
            elif item_type == _STRING:  # a vocabulary: skip the bytes without decoding them
                self.skip_strings(count)
            else:
                for _ in range(count):
                    self.value(item_type)
            return f"<array of {count}>"
        raise CorruptModel(f"{self.path}: corrupt GGUF header (unknown value type {vtype})")


@dataclass(frozen=True)
class _File:
    version: int
    meta: dict[str, object]
    array_lengths: dict[str, int]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    size: int


def _tensor_directory(r: _Reader, n_tensors: int, alignment: int, shard: int) -> tuple[TensorInfo, ...]:
    path = r.path
    raw = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.u32()
        if n_dims > _MAX_DIMS:
            raise CorruptModel(f"{path}: corrupt tensor directory (tensor {name!r} claims {n_dims} dimensions)")
        shape = tuple(r.u64() for _ in range(n_dims))
        raw.append((name, shape, r.u32(), r.u64()))
    data_start = -(-r.fh.tell() // alignment) * alignment
    out: list[TensorInfo] = []
    seen: set[str] = set()
    for name, shape, gtype, rel in raw:
        if name in seen:
            raise CorruptModel(f"{path}: corrupt tensor directory (tensor {name!r} appears twice)")
        seen.add(name)
        block = ggml_block(gtype)
        if block is None:
            raise CorruptModel(f"{path}: tensor {name!r} has unknown ggml type {gtype} (corrupt, or newer than gguf)")
        n_el = 1
        for d in shape:
            n_el *= d
        if n_el >= 1 << 62:
            raise CorruptModel(f"{path}: corrupt tensor directory (tensor {name!r} shape {list(shape)})")
        per_block, block_bytes = block
        if shape and shape[0] % per_block:
            raise CorruptModel(f"{path}: tensor {name!r} row of {shape[0]} is not a multiple of its block {per_block}")
        n_bytes = n_el // per_block * block_bytes
        if rel % alignment:
            raise CorruptModel(f"{path}: corrupt tensor directory ({name!r} at offset {rel}, alignment {alignment})")
        offset = data_start + rel
        if offset + n_bytes > r.size:
            raise CorruptModel(
                f"{path} is truncated: tensor {name!r} ends at byte {offset + n_bytes}, past the end of the file "
                f"({r.size} bytes); re-download it"
            )
        out.append(TensorInfo(name, shape, gtype, n_bytes, offset, shard))
    return tuple(out)


def _read_file(path: Path, shard: int = 0, keep: frozenset[str] = frozenset()) -> _File:
    try:
        size = path.stat().st_size
        fh = open(path, "rb")
    except OSError as exc:
        raise CorruptModel(f"cannot read model file {path}: {exc.strerror}") from exc
    with fh:
        r = _Reader(fh, path, size, keep)
        if size < 24 or r.take(4) != MAGIC:
            raise CorruptModel(f"{path} is not a GGUF model file (wrong magic bytes); re-download it")
        version = r.u32()
        if version not in (2, 3):
            raise CorruptModel(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = r.u64(), r.u64()
        # Each key/value takes >= 13 bytes and each directory entry >= 24: more than fits is corrupt.
        if n_kv > 100_000 or n_tensors > 1_000_000:
            raise CorruptModel(f"{path}: corrupt GGUF header ({n_kv} keys, {n_tensors} tensors)")
        if 13 * n_kv + 24 * n_tensors > size:
            raise CorruptModel(
                f"{path} is truncated or corrupt: its header claims {n_kv} keys and {n_tensors} tensors, "
                f"more than fit in {size} bytes; re-download it"
            )
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.u32(), key)
        alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise CorruptModel(f"{path}: corrupt GGUF header (general.alignment = {alignment!r}, not a power of two)")
        tensors = _tensor_directory(r, n_tensors, alignment, shard)
    return _File(version, meta, r.array_lengths, tensors, alignment, size)


def _shard_paths(path: Path, count: int) -> tuple[Path, ...]:
    m = _SHARD.match(path.name)
    if not m or int(m["count"]) != count:
        raise CorruptModel(
            f"{path} is one of {count} split files, but its name does not end in -0000i-of-{count:05d}.gguf; "
            "keep the names llama-gguf-split gave them"
        )
    return tuple(path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1))


def read_facts(path: Path) -> GGUFFacts:
    """Parse the GGUF header and tensor directory of `path` (all shards of a split model); raise
    `CorruptModel` saying what is wrong."""
    first = _read_file(path)
    count = first.meta.get("split.count", 1)
    shards: tuple[Path, ...] = (path,)
    files = [first]
    if isinstance(count, int) and count > 1:
        shards = _shard_paths(path, count)
        if shards[0] != path:
            first = _read_file(shards[0])
        files = [first]
        for i, p in enumerate(shards[1:], start=1):
            if not p.exists():
                raise CorruptModel(f"{path} is split into {count} files and {p.name} is missing; download every part")
            files.append(_read_file(p, shard=i))
        expected = first.meta.get("split.tensors.count")
        got = sum(len(f.tensors) for f in files)
        if isinstance(expected, int) and expected != got:
            raise CorruptModel(f"{path}: the {count} split files hold {got} tensors, the header says {expected}")
    meta = first.meta
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise CorruptModel(f"{path}: GGUF header has no general.architecture")
    tensors = tuple(t for f in files for t in f.tensors)
    if len({t.name for t in tensors}) != len(tensors):
        raise CorruptModel(f"{path}: the split files repeat a tensor")

    def num(key: str) -> int | None:
        v = meta.get(f"{arch}.{key}")
        return int(v) if isinstance(v, int | float) else None

    by_name = {t.name: t for t in tensors}
    vocab = first.array_lengths.get("tokenizer.ggml.tokens", 0)
    for fallback in ("token_embd.weight", "output.weight"):
        if not vocab and fallback in by_name and len(by_name[fallback].shape) >= 2:
            vocab = by_name[fallback].shape[1]
    name = meta.get("general.name")
    return GGUFFacts(
        path=path,
        file_size=sum(f.size for f in files),
        version=first.version,
        n_tensors=len(tensors),
        architecture=arch,
        name=name if isinstance(name, str) else None,
        block_count=num("block_count"),
        context_length=num("context_length"),
        embedding_length=num("embedding_length"),
        expert_count=num("expert_count") or 0,
        expert_used_count=num("expert_used_count") or 0,
        has_chat_template="tokenizer.chat_template" in meta,
        metadata=meta,
        alignment=first.alignment,
        tensors=tensors,
        vocab_size=vocab or num("vocab_size") or 0,
        split_count=len(files),
        shard_paths=shards,
    )


@dataclass(frozen=True)
class Vocab:
    """A model's tokenizer as llama.cpp compares a draft's with its target's (`common_speculative_are_compatible`):
    the tokenizer type, every token's text, BOS/EOS ids and whether they are added; None where the header is silent."""

    model: str | None
    tokens: tuple[bytes, ...]
    bos: int | None
    eos: int | None
    add_bos: bool | None
    add_eos: bool | None


_VOCAB_KEY = "tokenizer.ggml.tokens"


def read_vocab(path: Path) -> Vocab:
    """The tokenizer of the GGUF at `path` (the first shard of a split model holds it), from the header alone:
    ~0.1 s for Qwen2.5's 151,936 tokens, where gguf-py's `GGUFReader` takes 6.8 s (it decodes every field of the
    file, the 151k merges included); `CorruptModel` as `read_facts` raises it."""
    first = _read_file(path, keep=frozenset({_VOCAB_KEY}))
    count = first.meta.get("split.count", 1)
    if isinstance(count, int) and count > 1:
        shard = _shard_paths(path, count)[0]
        if shard != path:
            first = _read_file(shard, keep=frozenset({_VOCAB_KEY}))
    meta = first.meta
    tokens = meta.get(_VOCAB_KEY)

    def opt(key: str, kind: type) -> Any:
        v = meta.get(key)
        return v if isinstance(v, kind) and not (kind is int and isinstance(v, bool)) else None

    return Vocab(
        model=opt("tokenizer.ggml.model", str),
        tokens=tokens if isinstance(tokens, tuple) else (),  # a string array: kept whole; else the header has none
        bos=opt("tokenizer.ggml.bos_token_id", int),
        eos=opt("tokenizer.ggml.eos_token_id", int),
        add_bos=opt("tokenizer.ggml.add_bos_token", bool),
        add_eos=opt("tokenizer.ggml.add_eos_token", bool),
    )


# Text in a chat template of a thinking model: a thinking switch (Qwen3, GLM-4.x, SmolLM3), thinking tags (the
# DeepSeek-R1 distills), the field a template reads past thinking from (`reasoning_content`), or gpt-oss's channels.
THINKING_MARKERS = ("enable_thinking", "<think>", "</think>", "reasoning_content", "<|channel|>analysis")


def template_thinks(template: str) -> bool:
    """A guess from a chat template's text: whether the model it belongs to thinks before it answers."""
    return any(marker in template for marker in THINKING_MARKERS)

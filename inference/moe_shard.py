"""Expert shards: a standalone GGUF holding a mixture-of-experts model's whole trunk and a subset of its experts.

A shard is the source model with, in every MoE layer, only the kept experts (per layer sorted ids, the same number
K in every layer; `moe_assign` chooses them):
- every non-expert tensor is copied byte for byte (attention, norms, embeddings, shared experts `*_shexp`, the
  shared-expert gate `ffn_gate_inp_shexp`);
- tensors with an expert axis are cut along it: `blk.N.ffn_{gate,up,down,gate_up}_exps.{weight,bias,scale}`, the
  router `blk.N.ffn_gate_inp.{weight,bias}` and `blk.N.exp_probs_b(_vl).bias`. The expert axis is the last GGML
  dimension, the outermost in the file, so each expert is one contiguous run of bytes (whole rows, whatever the
  quantisation) and a cut is a list of byte ranges;
- `{arch}.expert_count` becomes K, `expert_used_count` (a number or one per layer) is clamped to ≤ K, with expert
  groups `expert_group_count` becomes the kept groups and `expert_group_used_count` is clamped; `split.*` keys are
  dropped (a split source becomes one file); every other key is copied byte for byte, in order, and one is added:
  `mesh_llm.expert_shard` (JSON: format, source model key, kept experts per MoE layer) so a shard describes itself.

Writing streams: header and tensor directory are built from the source's header (our own KV walker records each
key's raw bytes, so even strings that are not valid UTF-8 survive); tensor data moves range by range with
`os.copy_file_range` (in the kernel; chunked `pread`/`write` where unsupported) from every part of a split source.
Memory stays at a few MB whatever the model's size. The file is written as `<dest>.<pid>.part` and renamed.

Cache: `<cache>/moe-shards/<model key[:16]>/<stem>.<K>of<n>-<expert set key[:16]>.gguf`. The model key is the
sha256 of the model's bytes (all split parts, in order): the key the issue uses for expert statistics, known in
advance for catalog models (their download is verified against it), else computed once and remembered per
(path, size, mtime, inode). The expert set key hashes FORMAT and the kept ids per layer. `ensure_shard` holds an
flock per shard path, reuses a cached shard that verifies, and rewrites one that does not.

`verify_shard` reads a shard back with gguf-py's reader (an independent parser): expert tensors agree with
`expert_count`, `expert_used_count` ≤ it, no `split.*` keys, the embedded expert sets as expected.

Blocking I/O throughout: async callers run these in a worker thread.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import re
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mesh_mcp.errors import CorruptModel, ModelError

from .diskspace import HOME_HINT, disk_full_is_an_error, require_space
from .gguf_facts import GGUFFacts, read_facts

FORMAT = 1  # bump when the bytes written for the same source and experts change
SHARD_KEY = "mesh_llm.expert_shard"
_EXPERT_AXIS = re.compile(
    r"^blk\.(\d+)\.(?:ffn_(?:gate|up|down|gate_up)_exps\.(?:weight|bias|scale)"
    r"|ffn_gate_inp\.(?:weight|bias)|exp_probs_b(?:_vl)?\.bias)$"
)
_UNSUPPORTED = re.compile(r"_chexps\.")  # grovemoe's chunk experts: a second expert axis
_LAYER = re.compile(r"^blk\.(\d+)\.")
_COPY_CHUNK = 4 << 20
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
ProgressFn = Callable[[int, int], None]  # (bytes written, total bytes)


class ShardError(ModelError):
    """A model cannot be cut as asked: not a MoE, an unsupported expert layout, or experts that do not match."""


# --- the source's MoE layout (pure) ----------------------------------------------------------------------------


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


def _int_key(meta: dict[str, object], key: str) -> int | None:
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
    n_group = _int_key(facts.metadata, f"{arch}.expert_group_count") or 1
    if n_group > 1 and n_expert % n_group:
        raise CorruptModel(f"{path}: {n_expert} experts do not divide into expert_group_count {n_group}")
    gating_func = _int_key(facts.metadata, f"{arch}.expert_gating_func")
    norm = facts.metadata.get(f"{arch}.expert_weights_norm")
    return MoeLayout(
        architecture=arch,
        n_expert=n_expert,
        expert_used=facts.expert_used_count,
        n_layers=max(layers, default=-1) + 1,
        moe_layers=tuple(sorted({t.layer for t in sliced if t.layer is not None})),
        sliced=frozenset(names),
        n_group=n_group,
        shared_experts=_int_key(facts.metadata, f"{arch}.expert_shared_count") or 0,
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


def expert_set_key(experts: Experts) -> str:
    """sha256 of FORMAT and the kept ids per layer: names a shard of one model."""
    blob = json.dumps({"format": FORMAT, "experts": [list(e) for e in experts]}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# --- the source header: raw key/value records ----------------------------------------------------------------

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_INT_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}


@dataclass(frozen=True)
class _KV:
    key: str
    vtype: int
    item_type: int | None  # arrays
    start: int  # the record in the file: key length prefix .. end of value
    end: int
    value: object  # scalars, int arrays; None for strings and other arrays


class _Walker:
    """Walks a GGUF header in a mmap, recording each key/value record's span."""

    def __init__(self, mm: mmap.mmap, path: Path) -> None:
        self.mm, self.path, self.pos = mm, path, 0

    def _unpack(self, fmt: str) -> tuple[object, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.mm):
            raise CorruptModel(f"{self.path} is truncated: its GGUF header ends early; re-download it")
        out = struct.unpack_from(fmt, self.mm, self.pos)
        self.pos += size
        return out

    def u32(self) -> int:
        return int(self._unpack("<I")[0])  # type: ignore[call-overload]

    def u64(self) -> int:
        return int(self._unpack("<Q")[0])  # type: ignore[call-overload]

    def skip_string(self) -> None:
        n = self.u64()
        if self.pos + n > len(self.mm):
            raise CorruptModel(f"{self.path}: corrupt GGUF header (a string runs past the end of the file)")
        self.pos += n

    def string(self) -> str:
        start = self.pos + 8
        self.skip_string()
        return bytes(self.mm[start : self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> tuple[object, int | None]:
        if vtype in _SCALAR:
            return self._unpack(_SCALAR[vtype])[0], None
        if vtype == _STRING:
            self.skip_string()
            return None, None
        if vtype != _ARRAY:
            raise CorruptModel(f"{self.path}: corrupt GGUF header (unknown value type {vtype})")
        item, count = self.u32(), self.u64()
        if item in _SCALAR:
            size = struct.calcsize(_SCALAR[item])
            if self.pos + size * count > len(self.mm):
                raise CorruptModel(f"{self.path}: corrupt GGUF header (an array runs past the end of the file)")
            values = None
            if item in _INT_TYPES and count <= 1 << 16:
                values = list(struct.unpack_from(f"<{count}{_SCALAR[item][1]}", self.mm, self.pos))
            self.pos += size * count
            return values, item
        for _ in range(count):
            self.value(item)
        return None, item

    def records(self) -> tuple[int, int, list[_KV]]:
        magic = bytes(self.mm[:4]) if len(self.mm) >= 4 else b""
        if magic != b"GGUF":
            raise CorruptModel(f"{self.path} is not a GGUF model file (wrong magic bytes); re-download it")
        self.pos = 4
        version, n_tensors, n_kv = self.u32(), self.u64(), self.u64()
        out = []
        for _ in range(n_kv):
            start = self.pos
            key = self.string()
            vtype = self.u32()
            value, item = self.value(vtype)
            out.append(_KV(key, vtype, item, start, self.pos, value))
        return version, n_tensors, out


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _record(key: str, vtype: int, value: object, item_type: int | None = None) -> bytes:
    """One key/value record; `value` a number for scalar types, a str for strings, a list for int arrays."""
    head = _string(key) + struct.pack("<I", vtype)
    if vtype == _STRING:
        assert isinstance(value, str)
        return head + _string(value)
    if vtype == _ARRAY:
        assert isinstance(value, list) and item_type is not None
        fmt = _SCALAR[item_type]
        return head + struct.pack("<IQ", item_type, len(value)) + struct.pack(f"<{len(value)}{fmt[1]}", *value)
    return head + struct.pack(_SCALAR[vtype], value)


# --- the plan: what goes where ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    shard: int  # index into the source's shard_paths
    offset: int
    length: int


@dataclass(frozen=True)
class _OutTensor:
    name: str
    shape: tuple[int, ...]  # GGML order
    ggml_type: int
    n_bytes: int
    ranges: tuple[_Range, ...]


def _runs(ids: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of consecutive ids."""
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        yield ids[i], j - i + 1
        i = j + 1


def _plan_tensors(facts: GGUFFacts, layout: MoeLayout, kept: Experts) -> list[_OutTensor]:
    out = []
    for t in facts.tensors:
        if t.name not in layout.sliced:
            out.append(_OutTensor(t.name, t.shape, t.ggml_type, t.n_bytes, (_Range(t.shard, t.offset, t.n_bytes),)))
            continue
        ids = kept[t.layer] if t.layer is not None else ()
        stride, rest = divmod(t.n_bytes, layout.n_expert)
        if rest:
            raise CorruptModel(f"{facts.path}: tensor {t.name!r} does not divide into {layout.n_expert} experts")
        ranges = tuple(_Range(t.shard, t.offset + first * stride, count * stride) for first, count in _runs(ids))
        out.append(_OutTensor(t.name, (*t.shape[:-1], len(ids)), t.ggml_type, stride * len(ids), ranges))
    return out


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def _header(
    facts: GGUFFacts,
    layout: MoeLayout,
    kept: Experts,
    kvs: list[_KV],
    raw: mmap.mmap,
    tensors: list[_OutTensor],
    key: str,
) -> bytes:
    arch = layout.architecture
    k = len(next(e for e in kept if e))
    group_used = _int_key(facts.metadata, f"{arch}.expert_group_used_count")
    new_groups = k * layout.n_group // layout.n_expert if layout.n_group > 1 else None
    body = bytearray()
    n_kv = 0
    for kv in kvs:
        if kv.key.startswith("split.") or kv.key == SHARD_KEY:
            continue
        n_kv += 1
        if kv.key == f"{arch}.expert_count" and kv.vtype in _INT_TYPES:
            body += _record(kv.key, kv.vtype, k)
        elif kv.key == f"{arch}.expert_used_count" and kv.vtype in _INT_TYPES:
            body += _record(kv.key, kv.vtype, min(int(kv.value), k))  # type: ignore[call-overload]
        elif kv.key == f"{arch}.expert_used_count" and isinstance(kv.value, list):
            body += _record(kv.key, kv.vtype, [min(int(v), k) for v in kv.value], kv.item_type)
        elif kv.key == f"{arch}.expert_group_count" and new_groups is not None and kv.vtype in _INT_TYPES:
            body += _record(kv.key, kv.vtype, new_groups)
        elif kv.key == f"{arch}.expert_group_used_count" and new_groups is not None and group_used is not None:
            body += _record(kv.key, kv.vtype, min(group_used, new_groups))
        else:
            body += raw[kv.start : kv.end]
    experts = {str(layer): list(kept[layer]) for layer in layout.moe_layers}
    meta = {"format": FORMAT, "source": key, "n_expert": layout.n_expert, "experts": experts}
    body += _record(SHARD_KEY, _STRING, json.dumps(meta, separators=(",", ":")))
    n_kv += 1
    offset = 0
    for t in tensors:
        body += _string(t.name) + struct.pack("<I", len(t.shape))
        body += struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<IQ", t.ggml_type, offset)
        offset += _pad(t.n_bytes, facts.alignment)
    return b"GGUF" + struct.pack("<IQQ", 3, len(tensors), n_kv) + bytes(body)


# --- writing --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardFile:
    path: Path
    experts: Experts  # kept ids per layer, () for layers without experts
    expert_count: int  # K
    n_expert: int  # the source's
    n_bytes: int
    seconds: float  # time spent writing (0 when reused from the cache)
    reused: bool = False


def _copy(src: int, offset: int, length: int, dst: int) -> None:
    """Copy `length` bytes at `offset` of `src` to `dst`'s position: in the kernel when possible."""
    end = offset + length
    use_kernel = hasattr(os, "copy_file_range")
    while offset < end:
        n = min(end - offset, 1 << 30)
        if use_kernel:
            try:
                done = os.copy_file_range(src, dst, n, offset)
            except OSError:  # EXDEV on old kernels, EINVAL/ENOSYS/EOPNOTSUPP on some filesystems
                use_kernel = False
                continue
        else:
            data = os.pread(src, min(n, _COPY_CHUNK), offset)
            done = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
        if done == 0:
            raise CorruptModel("the model file ended while its experts were being copied: it changed or is truncated")
        offset += done


def write_shard(
    source: Path,
    experts: Sequence[Sequence[int]],
    dest: Path,
    *,
    source_key: str = "",
    on_progress: ProgressFn | None = None,
) -> ShardFile:
    """Write the shard of `source` (any part of a split set) keeping `experts` (per `blk.N` layer) to `dest`,
    atomically. `source_key` (the model's sha256) is recorded in the shard. Raises `CorruptModel`, `ShardError`,
    and `DiskFull` when the shard's size does not fit (checked before writing) or the disk fills up meanwhile."""
    start = time.monotonic()
    facts = read_facts(source)
    layout = moe_layout(facts)
    kept = normalize_experts(layout, experts, source.name)
    tensors = _plan_tensors(facts, layout, kept)
    total = sum(t.n_bytes for t in tensors)
    fds = [os.open(p, os.O_RDONLY) for p in facts.shard_paths]
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with mmap.mmap(fds[0], 0, access=mmap.ACCESS_READ) as raw:
            _version, _n, kvs = _Walker(raw, facts.shard_paths[0]).records()
            header = _header(facts, layout, kept, kvs, raw, tensors, source_key)
        size = _pad(len(header), facts.alignment) + sum(_pad(t.n_bytes, facts.alignment) for t in tensors)
        what = f"the expert shard of {source.name}"
        require_space(what, [(dest.parent, size)], hint=HOME_HINT)
        with disk_full_is_an_error(f"writing {what}", dest.parent):
            _write_file(part, header, facts, tensors, fds, total, on_progress)
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    k = len(next(e for e in kept if e))
    return ShardFile(dest, kept, k, layout.n_expert, dest.stat().st_size, time.monotonic() - start)


def _write_file(
    part: Path,
    header: bytes,
    facts: GGUFFacts,
    tensors: list[_OutTensor],
    fds: list[int],
    total: int,
    on_progress: ProgressFn | None,
) -> None:
    """The shard's bytes into `part`: header, padding, then each tensor's ranges, fsynced."""
    out = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(out, header + bytes(_pad(len(header), facts.alignment) - len(header)))
        done = 0
        for t in tensors:
            for r in t.ranges:
                _copy(fds[r.shard], r.offset, r.length, out)
            _write_all(out, bytes(_pad(t.n_bytes, facts.alignment) - t.n_bytes))
            done += t.n_bytes
            if on_progress is not None:
                on_progress(done, total)
        os.fsync(out)
    finally:
        os.close(out)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- verification ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardCheck:
    architecture: str
    expert_count: int
    expert_used: int | tuple[int, ...]
    n_tensors: int
    experts: Experts  # from the shard's own record; () if it has none


def verify_shard(path: Path, experts: Experts | None = None) -> ShardCheck:
    """Read `path` back with gguf-py's reader and check it is a loadable shard (see the module docstring);
    `experts` (as `normalize_experts` returns them) must equal the shard's record. Raises `CorruptModel`."""
    import gguf  # numpy and 250 ms of import: only here

    try:
        r = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, struct.error) as exc:
        raise CorruptModel(f"{path} does not read back as GGUF: {exc}") from exc

    def field(key: str) -> object:
        f = r.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    count = field(f"{arch}.expert_count")
    used = field(f"{arch}.expert_used_count")
    if not isinstance(arch, str) or not isinstance(count, int) or count < 1:
        raise CorruptModel(f"{path}: no architecture or expert_count in the shard")
    used_t = tuple(used) if isinstance(used, list) else used
    if not isinstance(used_t, int | tuple) or any(
        u > count for u in (used_t if isinstance(used_t, tuple) else [used_t])
    ):
        raise CorruptModel(f"{path}: expert_used_count {used} exceeds expert_count {count}")
    if any(k.startswith("split.") for k in r.fields):
        raise CorruptModel(f"{path}: a shard must not carry split.* keys")
    for t in r.tensors:
        if _EXPERT_AXIS.match(t.name) and int(t.shape[-1]) != count:
            raise CorruptModel(f"{path}: {t.name} holds {int(t.shape[-1])} experts, expert_count is {count}")
    record = field(SHARD_KEY)
    got: Experts = ()
    if isinstance(record, str):
        try:
            per = {int(layer): tuple(int(e) for e in ids) for layer, ids in json.loads(record)["experts"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptModel(f"{path}: unreadable {SHARD_KEY} record ({exc})") from exc
        n_layers = len(experts) if experts is not None else max(per, default=-1) + 1
        got = tuple(per.get(layer, ()) for layer in range(n_layers))
    if experts is not None and got != tuple(tuple(e) for e in experts):
        raise CorruptModel(f"{path}: holds other experts than asked for; delete it")
    return ShardCheck(arch, count, used_t, len(r.tensors), got)


# --- the cache -------------------------------------------------------------------------------------------------


def model_hash(facts: GGUFFacts, memo_dir: Path | None = None) -> str:
    """sha256 of the model's bytes (every split part, in order). Remembered in `memo_dir` per (path, size,
    mtime_ns, inode) of each part, so a model is hashed once."""
    stats = [(str(p.resolve()), *_stat(p)) for p in facts.shard_paths]
    memo = None
    if memo_dir is not None:
        memo = memo_dir / (hashlib.sha256(stats[0][0].encode()).hexdigest()[:32] + ".json")
        try:
            saved = json.loads(memo.read_text())
            if saved.get("files") == [list(s) for s in stats]:
                return str(saved["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    h = hashlib.sha256()
    for p in facts.shard_paths:
        with p.open("rb") as f:
            while block := f.read(_COPY_CHUNK):
                h.update(block)
    digest = h.hexdigest()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps({"files": [list(s) for s in stats], "sha256": digest}))
        os.replace(tmp, memo)
    return digest


def _stat(p: Path) -> tuple[int, int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


_SPLIT_NAME = re.compile(r"-\d{5}-of-\d{5}$")


def shard_path(cache_dir: Path, source: Path, model_key: str, experts: Experts, n_expert: int) -> Path:
    stem = _SPLIT_NAME.sub("", source.name.removesuffix(".gguf"))
    k = len(next((e for e in experts if e), ()))
    return cache_dir / model_key[:16] / f"{stem}.{k}of{n_expert}-{expert_set_key(experts)[:16]}.gguf"


def expert_axis_layer(name: str) -> int | None:
    """The layer of a tensor cut along the expert axis (expert weights, router, expert bias), else None."""
    m = _EXPERT_AXIS.match(name)
    return int(m.group(1)) if m else None


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_shard(
    source: Path,
    experts: Sequence[Sequence[int]],
    *,
    cache_dir: Path | None = None,
    model_key: str | None = None,
    on_progress: ProgressFn | None = None,
) -> ShardFile:
    """The cached shard of `source` keeping `experts`, written (and verified) if missing or bad. `model_key`: the
    model's sha256 when already known (catalog downloads), else computed once (`model_hash`)."""
    from . import paths

    root = cache_dir if cache_dir is not None else paths.cache_dir() / "moe-shards"
    facts = read_facts(source)
    layout = moe_layout(facts)
    kept = normalize_experts(layout, experts, source.name)
    key = model_key or model_hash(facts, root / "hashes")
    dest = shard_path(root, source, key, kept, layout.n_expert)
    with _flock(dest.with_name(dest.name + ".lock")):
        if dest.exists():
            try:
                check = verify_shard(dest, kept)
                size = dest.stat().st_size
                return ShardFile(dest, kept, check.expert_count, layout.n_expert, size, 0.0, reused=True)
            except CorruptModel:
                dest.unlink()
        shard = write_shard(source, kept, dest, source_key=key, on_progress=on_progress)
        verify_shard(dest, kept)
        return shard

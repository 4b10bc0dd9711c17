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

Which tensors carry experts and which expert sets are valid is `inference.moe_layout`'s (pure); this module is
one responsibility, producing a verified shard file (header rewrite, range copy, read-back check) and keeping
it in the cache, which is why it runs past ~400 lines.
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

from mesh_mcp.errors import CorruptModel

from .diskspace import HOME_HINT, disk_full_is_an_error, require_space
from .gguf_facts import GGUFFacts, read_facts
from .moe_layout import Experts, MoeLayout, expert_axis_layer, meta_int, moe_layout, normalize_experts

FORMAT = 1  # bump when the bytes written for the same source and experts change
SHARD_KEY = "mesh_llm.expert_shard"
_COPY_CHUNK = 4 << 20
ProgressFn = Callable[[int, int], None]  # (bytes written, total bytes)


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
    group_used = meta_int(facts.metadata, f"{arch}.expert_group_used_count")
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
        if expert_axis_layer(t.name) is not None and int(t.shape[-1]) != count:
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

"""Zero-transfer loading: pre-seed a worker's ggml-rpc tensor cache from the worker's own copy of the GGUF.

When llama-server loads a layer split over RPC, every large weight is first offered by hash; a server
that has the file answers "have it" and the tensor's bytes never cross the network. `seed` writes those
files ahead of time from the worker's local GGUF, only for the layers the worker will hold.

Facts checked in the pinned source (ggml/src/ggml-rpc/ggml-rpc.cpp, src/llama-model-loader.cpp,
src/llama-model.cpp, tools/rpc/rpc-server.cpp; llama.cpp b11434, RPC protocol 7.0.0):
- A tensor goes by hash first (SET_TENSOR_HASH) when `size > HASH_THRESHOLD`, strictly greater. Upstream
  says 10 MiB; our build edits it to 64 KiB (llama.cpp/pin.toml `[[edits]]`, `[rpc] hash_threshold`) so
  that every weight matrix of a layer, not only the largest tensors, can come from a worker's own cache)
  and it lives in a weights buffer (`rpc_use_hash_cache`). On a miss the client sends the
  full tensor with cache_flag=1 and the server writes the file itself (a plain ofstream, not atomic).
- The hash is `fnv_hash`: FNV-1a 64 (offset basis 0xcbf29ce484222325, prime 0x100000001b3) over exactly the
  bytes of that one `set_tensor` call. The model loader uploads each weight whole,
  `ggml_backend_tensor_set(cur, data, 0, ggml_nbytes(cur))`, from the mmap (or, without mmap, from a
  staging buffer of the same bytes: the RPC device has no async-upload path that would chunk it). So the
  hash is over the tensor's raw bytes in the GGUF, `[data_offset, data_offset + n_bytes)`, no padding.
- File name: `snprintf("%016" PRIx64)`: 16 lower-case hex digits, zero-padded, no extension, in
  `<cache dir>/rpc/`, where the cache dir is `$LLAMA_CACHE`, else `$XDG_CACHE_HOME/llama.cpp`, else
  `~/.cache/llama.cpp` (`~/Library/Caches/llama.cpp` on macOS). On a hit the server loads the whole file and
  trusts its size: a truncated file would load a partial tensor silently. Hence we write to a temporary
  name, fsync, and rename; an existing file of the wrong size is rewritten.
- Placement: the input layer (token_embd, pos_embd, token_types, per_layer_token_embd) always stays on the
  host CPU and is never sent. `blk.N` goes with layer N. The output layer is layer `n_layer` in llama.cpp's
  n_layer + 1 split accounting (`-ngl K` offloads layers `n_layer + 1 - K ..= n_layer`); it holds
  output.weight, output_norm and other head tensors, `blk.N` with N >= n_layer (e.g. next-token heads), and
  token_embd.weight as a duplicate when the model ties embeddings (no output.weight).
- The host still needs the whole GGUF: it hashes every large tensor it offers.

A worker without the file gets the same entries from a peer that has it (`mesh_mcp/dataplane/tensor_fetch.py`):
the peer lists each tensor's hash (`tensor_hashes`, remembered in the same per-GGUF manifest `seed` keeps) and
the worker writes what arrives through `IncomingTensor` — the same temporary name, fsync and rename as `seed`,
and a rename only when the bytes hash to the name announced (`CorruptTransfer` otherwise, and no file).

The tensor directory (`read_tensor_infos`) is a header walk that skips metadata values; it gives the same
absolute offsets and sizes as gguf-py's `GGUFReader` (`data_offset`, `n_bytes`; a test checks it), which parses
every value into numpy views and needs 4 s for SmolLM2's 49k-token vocabulary. It could switch to
`inference.gguf_facts` once that module has a tensor directory. The hash is `inference.fnv1a`'s.

One responsibility, the ggml-rpc tensor cache as llama.cpp reads it (which tensors it offers by hash, their
file names, and writing entries: seeded locally or received from a peer), so it runs past ~400 lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mesh_llamacpp import load_pin
from mesh_mcp.errors import CorruptModel, ModelError

from .diskspace import disk_full_is_an_error
from .fnv1a import FNV_OFFSET, _fnv_python, fnv1a64, hasher_kind, native_hasher
from .gguf_facts import read_facts

log = logging.getLogger("mesh_llm.rpc_cache")

HASH_THRESHOLD = load_pin().rpc_hash_threshold  # bytes; a tensor strictly larger is offered by hash (our build)
# LLM_TENSOR_LAYER_INPUT tensors (llama-arch.cpp): always on the host CPU.
INPUT_TENSORS = frozenset(
    {"token_embd", "pos_embd", "token_types", "per_layer_token_embd", "masked_embd_centroids", "masked_embd_ordering"}
)
FIRST_LAYER_TENSORS = frozenset({"token_embd_norm"})  # "do the norms on the first layer"
CHUNK = 64 << 20  # hash and copy granularity: progress and fallback-copy unit

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class CorruptTransfer(ModelError):
    """Bytes received for a cache entry are not the tensor announced (size or FNV-1a-64 hash)."""


def cache_files_dir(cache_dir: Path) -> Path:
    """Where rpc-server looks for cached tensors, given its `LLAMA_CACHE` directory."""
    return cache_dir / "rpc"


def cache_file_name(digest: int) -> str:
    return f"{digest:016x}"


def is_cache_file_name(name: object) -> bool:
    return isinstance(name, str) and len(name) == 16 and all(c in "0123456789abcdef" for c in name)


# --- which tensors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HashedTensor:
    """A weight llama-server offers by hash when its layer is on an RPC device."""

    name: str
    layer: int  # block index; n_layer for the output layer
    offset: int  # absolute offset of its bytes in the GGUF file
    size: int  # bytes (ggml_nbytes)


@dataclass(frozen=True)
class TensorDirectory:
    n_layer: int
    tensors: tuple[HashedTensor, ...]  # every tensor that is not input-only, with its layer


@dataclass(frozen=True)
class RawTensor:
    name: str
    offset: int  # absolute
    size: int


def read_tensor_infos(gguf_path: Path) -> tuple[dict[str, object], list[RawTensor]]:
    """(the few keys we need, the absolute byte range of every tensor in this file), from the GGUF
    header through `gguf_facts.read_facts` (header only: milliseconds, where gguf-py's GGUFReader takes
    4 s to parse SmolLM2's 49k-token vocabulary)."""
    facts = read_facts(gguf_path)
    wanted = ("general.architecture", "general.alignment", f"{facts.architecture}.block_count")
    keys = {k: facts.metadata[k] for k in wanted if k in facts.metadata}
    shard = next((i for i, p in enumerate(facts.shard_paths) if p == gguf_path), 0)
    return keys, [RawTensor(t.name, t.offset, t.n_bytes) for t in facts.tensors if t.shard == shard]


def read_directory(gguf_path: Path) -> TensorDirectory:
    """Layer and byte range of every tensor that can be placed on an RPC device."""
    keys, raw = read_tensor_infos(gguf_path)
    arch = keys.get("general.architecture", "")
    count = keys.get(f"{arch}.block_count")
    blocks = [int(t.name.split(".")[1]) for t in raw if t.name.startswith("blk.")]
    n_layer = int(count) if isinstance(count, int) else (max(blocks) + 1 if blocks else 0)
    tied = all(t.name != "output.weight" for t in raw)
    out: list[HashedTensor] = []
    for t in raw:
        stem = t.name.split(".")[0]
        if t.name.startswith("blk."):
            layer = min(int(t.name.split(".")[1]), n_layer)
        elif stem in FIRST_LAYER_TENSORS:
            layer = 0
        elif stem in INPUT_TENSORS:
            if not (tied and t.name == "token_embd.weight"):
                continue
            layer = n_layer  # duplicated into the output layer as the tied output projection
        else:
            layer = n_layer
        out.append(HashedTensor(name=t.name, layer=layer, offset=t.offset, size=t.size))
    return TensorDirectory(n_layer=n_layer, tensors=tuple(out))


def hashed_tensors(
    gguf_path: Path,
    layers: range | None = None,
    *,
    output: bool | None = None,
    threshold: int = HASH_THRESHOLD,
) -> list[HashedTensor]:
    """The tensors llama-server would offer by hash to a worker holding `layers`.

    `layers` are block indices, with index n_layer standing for the output layer as in llama.cpp's split
    accounting; None means every layer. `output` None: the output layer is included iff `layers` is None
    or contains n_layer; True/False force it."""
    directory = read_directory(gguf_path)
    with_output = (layers is None or directory.n_layer in layers) if output is None else output
    return [
        t
        for t in directory.tensors
        if t.size > threshold
        and (with_output if t.layer == directory.n_layer else (layers is None or t.layer in layers))
    ]


# --- seeding ---------------------------------------------------------------------------------------


@dataclass
class SeedResult:
    files: dict[str, str] = field(default_factory=dict)  # tensor name -> cache file name (16 hex)
    written: list[str] = field(default_factory=list)  # file names written now
    skipped: list[str] = field(default_factory=list)  # file names already present with the right size
    bytes_written: int = 0
    bytes_skipped: int = 0
    bytes_hashed: int = 0  # 0 for tensors whose hash came from the seed manifest
    seconds: float = 0.0
    hasher: str = "native"


def _manifest_path(cache_dir: Path, gguf_path: Path) -> Path:
    st = gguf_path.stat()
    ident = f"{gguf_path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    return cache_dir / "rpc-seed" / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"


def _load_manifest(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items() if isinstance(v, str) and len(v) == 16}


def _atomic_write_json(path: Path, data: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class _Job:
    """Hashes one tensor from the mapped file and copies it into the cache when it is missing."""

    def __init__(self, src_fd: int, base: int, view: memoryview, progress: Callable[[int], None]) -> None:
        self.src_fd, self.base, self.view, self.progress = src_fd, base, view, progress
        self.fn = native_hasher()

    def hash(self, t: HashedTensor) -> int:
        h = FNV_OFFSET
        for start in range(t.offset, t.offset + t.size, CHUNK):
            n = min(CHUNK, t.offset + t.size - start)
            if self.fn is not None:
                h = int(self.fn(self.base + start, n, h))
            else:
                h = _fnv_python(self.view[start : start + n], h)
            self.progress(n)
        return h

    def copy(self, t: HashedTensor, dest: Path) -> None:
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            done, kernel_copy = 0, hasattr(os, "copy_file_range")
            while done < t.size:
                n = min(CHUNK, t.size - done)
                if kernel_copy:
                    try:
                        k = os.copy_file_range(self.src_fd, fd, n, t.offset + done)
                    except OSError:
                        kernel_copy = False  # cross-device on old kernels, unsupported filesystems
                        os.lseek(fd, done, os.SEEK_SET)
                        continue
                else:
                    k = os.write(fd, self.view[t.offset + done : t.offset + done + n])
                if k <= 0:
                    raise OSError(f"short copy of {t.name} into {dest}")
                done += k
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        if tmp.stat().st_size != t.size:
            tmp.unlink(missing_ok=True)
            raise OSError(f"copy of {t.name} into {dest} has the wrong size")
        os.replace(tmp, dest)


def tensor_hashes(
    gguf_path: Path,
    cache_dir: Path,
    tensors: list[HashedTensor],
    on_progress: Progress | None = None,
    *,
    workers: int | None = None,
) -> dict[str, str]:
    """The cache file name (FNV-1a-64, 16 hex) of each of `tensors` of `gguf_path`, by tensor name: from
    the seed manifest in `cache_dir` (`seed` writes the same one) where known, the rest hashed now on all
    cores and remembered there. `on_progress(done, total)` counts bytes hashed. Blocking, CPU-bound."""
    gguf_path = Path(gguf_path)
    manifest_path = _manifest_path(cache_dir, gguf_path)
    known = _load_manifest(manifest_path)
    todo = sorted((t for t in tensors if t.name not in known), key=lambda t: -t.size)
    if not todo:
        return {t.name: known[t.name] for t in tensors}
    total, done, lock = sum(t.size for t in todo), [0], threading.Lock()

    def progress(n: int) -> None:
        with lock:
            done[0] += n
            if on_progress is not None:
                on_progress(done[0], total)

    found: dict[str, str] = {}
    with open(gguf_path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if any(t.offset + t.size > size for t in todo):
            raise CorruptModel(f"{gguf_path}: tensor data runs past the end of the file ({size} bytes)")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        array = np.frombuffer(mm, dtype=np.uint8)
        view = memoryview(mm)
        try:
            job = _Job(fh.fileno(), array.ctypes.data, view, progress)
            with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1, thread_name_prefix="rpc-hash") as pool:
                for t, h in zip(todo, pool.map(job.hash, todo), strict=True):
                    found[t.name] = cache_file_name(h)
        finally:
            view.release()
            del array
            mm.close()
    _atomic_write_json(manifest_path, {**_load_manifest(manifest_path), **found})
    return {t.name: known.get(t.name) or found[t.name] for t in tensors}


class IncomingTensor:
    """One cache entry written as its bytes arrive (from a peer, say), exactly as `seed` writes it: a
    temporary file in the cache directory, FNV-1a-64 computed on the way, fsync, and a rename to its
    name only when the size and the hash match what was announced. Anything else (an error, a short
    or altered transfer, leaving the `with` block without `commit`) removes the temporary file, so a
    broken transfer never leaves an entry rpc-server would trust."""

    def __init__(self, files_dir: Path, name: str, size: int) -> None:
        if not is_cache_file_name(name):
            raise CorruptTransfer(f"{name!r} is not a cache entry name (16 lower-case hex digits)")
        self.dest = files_dir / name
        self.name, self.size = name, size
        self.received = 0
        self._hash = FNV_OFFSET
        self._tmp = files_dir / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        self._fd: int | None = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, data: memoryview) -> None:
        if self._fd is None:
            raise ValueError("this entry is closed")
        if self.received + len(data) > self.size:
            raise CorruptTransfer(f"more than the {self.size} bytes announced for {self.name}")
        self._hash = fnv1a64(data, self._hash)
        done = 0
        while done < len(data):
            done += os.write(self._fd, data[done:])
        self.received += len(data)

    def verify(self) -> None:
        """CorruptTransfer (and the temporary file removed) unless every byte announced arrived and
        they hash to the entry's name."""
        problem = None
        if self.received != self.size:
            problem = f"{self.name}: {self.received} bytes arrived, not {self.size}"
        elif cache_file_name(self._hash) != self.name:
            problem = f"hash mismatch: the bytes sent as {self.name} hash to {cache_file_name(self._hash)}"
        if problem is not None:
            self.discard()
            raise CorruptTransfer(problem)

    def finish(self) -> None:
        """After `verify`: fsync and rename into place (may run on another thread)."""
        if self._fd is None:
            raise ValueError("this entry is closed")
        try:
            os.fsync(self._fd)
        except BaseException:
            self.discard()
            raise
        os.close(self._fd)
        self._fd = None
        os.replace(self._tmp, self.dest)

    def commit(self) -> None:
        """Verify, fsync and rename into place; CorruptTransfer (and no file) when it is not the tensor."""
        self.verify()
        self.finish()

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> IncomingTensor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()  # after commit: nothing left to do


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seed(
    gguf_path: Path,
    cache_dir: Path,
    layers: range | None = None,
    on_progress: Progress | None = None,
    *,
    output: bool | None = None,
    threshold: int = HASH_THRESHOLD,
    workers: int | None = None,
    rehash: bool = False,
) -> SeedResult:
    """Write `<cache_dir>/rpc/<16 hex>` for every tensor of `layers` that llama-server offers by hash.

    `cache_dir` is the rpc-server's `LLAMA_CACHE` (`RpcServer.cache_dir`). `layers`/`output` as in
    `hashed_tensors`. Existing files of the right size are skipped, others written atomically (temporary
    name, fsync, rename), so a worker's rpc-server may run meanwhile. Hashes are remembered per GGUF
    (path, size, mtime, inode) in `<cache_dir>/rpc-seed/`, so a second seed of the same file hashes nothing
    unless `rehash`. `on_progress(done, total)` counts bytes hashed or checked; it is called from worker
    threads, one call at a time. Blocking and CPU-bound: from async code use `anyio.to_thread.run_sync`.
    For a split GGUF, seed each file. A full disk is a `DiskFull` (entries written before it are whole and stay)."""
    started = time.perf_counter()
    gguf_path = Path(gguf_path)
    tensors = sorted(hashed_tensors(gguf_path, layers, output=output, threshold=threshold), key=lambda t: -t.size)
    files_dir = cache_files_dir(cache_dir)

    def full() -> contextlib.AbstractContextManager[None]:  # ENOSPC copying a tensor: DiskFull, with the numbers
        return disk_full_is_an_error(f"seeding the rpc cache from {gguf_path.name}", files_dir)

    with full():
        files_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = _manifest_path(cache_dir, gguf_path)
    known = {} if rehash else _load_manifest(manifest_path)
    total = sum(t.size for t in tensors)
    result = SeedResult(hasher=hasher_kind())
    lock = threading.Lock()
    done = [0]

    def progress(n: int) -> None:
        with lock:
            done[0] += n
            if on_progress is not None:
                on_progress(done[0], total)

    with open(gguf_path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0 or any(t.offset + t.size > size for t in tensors):
            raise CorruptModel(f"{gguf_path}: tensor data runs past the end of the file ({size} bytes)")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mm, "madvise"):
            with contextlib.suppress(OSError):
                mm.madvise(mmap.MADV_SEQUENTIAL)
        array = np.frombuffer(mm, dtype=np.uint8)
        view = memoryview(mm)
        try:
            job = _Job(fh.fileno(), array.ctypes.data, view, progress)
            claimed: set[str] = set()

            def one(t: HashedTensor) -> tuple[HashedTensor, str, bool, bool]:
                """(tensor, file name, written?, hashed?)"""
                name, hashed = known.get(t.name), False
                if name is None:
                    name, hashed = cache_file_name(job.hash(t)), True
                dest = files_dir / name
                with lock:
                    first = name not in claimed  # identical tensors share one file
                    claimed.add(name)
                if not hashed:
                    progress(t.size)
                if not first:
                    return t, name, False, hashed
                try:
                    present = dest.stat().st_size
                except FileNotFoundError:
                    present = None
                if present == t.size:
                    return t, name, False, hashed
                if present is not None:
                    log.warning("rpc cache file %s has %d bytes, not %d: rewriting it", dest, present, t.size)
                job.copy(t, dest)
                return t, name, True, hashed

            threads = workers or os.cpu_count() or 1
            with full(), ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc-seed") as pool:
                for future in as_completed([pool.submit(one, t) for t in tensors]):
                    t, name, written, hashed = future.result()
                    result.files[t.name] = name
                    result.bytes_hashed += t.size if hashed else 0
                    if written:
                        result.written.append(name)
                        result.bytes_written += t.size
                    else:
                        result.skipped.append(name)
                        result.bytes_skipped += t.size
        finally:
            view.release()
            del array
            mm.close()
    with full():
        if result.written:
            fsync_dir(files_dir)
        if result.bytes_hashed:
            _atomic_write_json(manifest_path, {**_load_manifest(manifest_path), **result.files})
    result.seconds = time.perf_counter() - started
    log.info(
        "seeded rpc cache %s from %s: %d written (%.1f MB), %d present (%.1f MB), %.1f MB hashed in %.1fs (%s)",
        files_dir,
        gguf_path.name,
        len(result.written),
        result.bytes_written / 1e6,
        len(result.skipped),
        result.bytes_skipped / 1e6,
        result.bytes_hashed / 1e6,
        result.seconds,
        result.hasher,
    )
    return result

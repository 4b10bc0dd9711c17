"""FNV-1a 64, the hash ggml-rpc names its tensor-cache files by: a compiled C loop, with a pure-Python fallback.

The hash runs in a tiny C function (`llama.cpp/fnv1a.c`), compiled lazily on first use with the system C compiler
(`$CC`, cc, gcc or clang) into the llama.cpp build cache (`<cache>/llama.cpp/fnv1a/fnv1a-<digest>.so`) under a file
lock; without a compiler a pure-Python fallback (1-10 MB/s) is used and a warning logged. FNV-1a is a serial chain
(xor, then a 64-bit multiply per byte: about 4 cycles a byte, 0.3-0.6 GB/s on this machine's cores), so one tensor
hashes at one core's speed; tensors are hashed in parallel on all cores. llama-server hashes on the host the same
way, serially, during every load: the cache pays off where the network is slower than that.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mesh_mcp.errors import BuildError

from .cshared import load_shared

log = logging.getLogger("mesh_llm.rpc_cache")  # the RPC cache's log: the hasher exists for it

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1
CC_FLAGS = ("-O3", "-shared", "-fPIC")


_NativeFn = Callable[[int, int, int], int]  # (address, length, seed) -> hash
_native_lock = threading.Lock()
_native: list[_NativeFn | None] = []  # empty: not tried yet


def _fnv_python(data: memoryview, seed: int) -> int:
    h = seed
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & _MASK
    return h


def _c_source() -> Path:
    import mesh_llamacpp

    return Path(mesh_llamacpp.__file__).resolve().parent / "fnv1a.c"


def _load_native() -> _NativeFn | None:
    try:
        lib = load_shared(_c_source(), "fnv1a", CC_FLAGS)
    except BuildError as exc:
        log.warning(
            "cannot build the native FNV-1a hasher (%s); pre-seeding the RPC cache falls back to pure Python "
            "at about 10 MB/s. Install a C compiler (apt-get install build-essential, xcode-select --install).",
            exc,
        )
        return None
    fn = lib.fnv1a64
    fn.restype = ctypes.c_uint64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64]  # ctypes releases the GIL during the call
    return fn


def native_hasher() -> _NativeFn | None:
    """The compiled hasher, building it on first use; None when it cannot be built (warned once)."""
    with _native_lock:
        if not _native:
            _native.append(_load_native())
        return _native[0]


def hasher_kind() -> str:
    return "native" if native_hasher() is not None else "python"


def fnv1a64(data: bytes | bytearray | memoryview | mmap.mmap, seed: int = FNV_OFFSET) -> int:
    """FNV-1a 64 of `data`, chained from `seed` (so chunks can be hashed one after another)."""
    fn = native_hasher()
    if fn is None:
        with memoryview(data) as mv:
            return _fnv_python(mv.cast("B"), seed)
    view = np.frombuffer(data, dtype=np.uint8)
    return int(fn(view.ctypes.data, view.size, seed)) if view.size else seed

"""Small C helpers compiled on first use: one shared object per source, compiler, flags and machine, in the llama.cpp
build cache (`<cache>/llama.cpp/<name>/<name>-<digest>.so`), built once under a file lock (another node on this
machine may be compiling it right now) and renamed into place. Used by the FNV-1a hasher (`fnv1a.py`) and the data
plane's splice (`mesh_mcp/dataplane/native.py`); each falls back to Python when this raises."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

from mesh_mcp.errors import BuildError

from .llamacpp_build import build_root


def find_cc() -> str | None:
    """The system C compiler: `$CC`, else cc, gcc or clang on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def compile_shared(source: Path, cc: str, name: str, flags: tuple[str, ...], libs: tuple[str, ...] = ()) -> Path:
    """The shared object built from `source` (compiled now if it is not in the cache). Raises OSError or
    subprocess.SubprocessError (the compiler's stderr on `.stderr`) when it cannot be built."""
    parts = [source.read_bytes(), cc.encode(), *(f.encode() for f in (*flags, *libs)), platform.machine().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]
    out_dir = build_root() / name
    lib = out_dir / f"{name}-{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.is_file():
            return lib
        tmp = out_dir / f".{name}-{key}.{os.getpid()}.so"
        try:
            cmd = [cc, *flags, str(source), "-o", str(tmp), *libs]
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
            os.replace(tmp, lib)
        finally:
            tmp.unlink(missing_ok=True)
    return lib


def load_shared(source: Path, name: str, flags: tuple[str, ...], libs: tuple[str, ...] = ()) -> ctypes.CDLL:
    """`source` compiled (or cached) and loaded. Raises BuildError saying why in one line: no compiler, the source
    missing from this installation, or the compiler's first line of complaint (e.g. a missing header)."""
    cc = find_cc()
    try:
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing from this installation")
        if cc is None:
            raise FileNotFoundError("no C compiler (cc, gcc, clang or $CC) on PATH")
        return ctypes.CDLL(str(compile_shared(source, cc, name, flags, libs)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = (getattr(exc, "stderr", "") or "").strip().splitlines()
        raise BuildError(f"{exc}: {detail[0]}" if detail else str(exc)) from exc

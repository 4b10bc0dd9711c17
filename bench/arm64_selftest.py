"""Portability check for ARM64 builds on an x86 machine: cross-compile each ARM CPU variant that
`inference.cpu` picks for a given feature list, then run the product's self-test on the binaries under
qemu-user (`-cpu max`). Not part of CI (a cross build takes minutes); results go to bench/RESULTS.md.

    apt-get install g++-aarch64-linux-gnu qemu-user
    python bench/arm64_selftest.py --features "asimddp asimdhp sve i8mm" --variants 1,3

Each variant is built in its own tree under --work (default /tmp/arm64-check) with the pinned source
and edits, `BUILD_SHARED_LIBS=OFF`, targets llama-server and ggml-rpc-server.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import anyio

from inference.cpu import CpuInfo, cpu_variants
from inference.llamacpp import LlamaCpp
from inference.llamacpp_build import apply_edits, build_root
from inference.selftest import self_test
from mesh_llamacpp import load_pin

TOOLCHAIN = """set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
"""
WRAPPER = '#!/bin/sh\nexec qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu {binary} "$@"\n'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", default="asimddp asimdhp sve i8mm", help="/proc/cpuinfo Features of the target")
    p.add_argument("--variants", default="", help="1-based indexes of the variants to check (default: all)")
    p.add_argument("--work", type=Path, default=Path("/tmp/arm64-check"))
    args = p.parse_args()
    pin = load_pin()
    source = build_root() / "src" / pin.version / pin.subdir
    if not (source / "CMakeLists.txt").is_file():
        raise SystemExit(f"no unpacked source in {source}: run `mesh-llm doctor --build` once first")
    apply_edits(source, pin.edits)
    args.work.mkdir(parents=True, exist_ok=True)
    toolchain = args.work / "aarch64.cmake"
    toolchain.write_text(TOOLCHAIN)
    cpu = CpuInfo("arm64", "Linux", "emulated", frozenset(args.features.split()))
    variants = cpu_variants(cpu)
    chosen = [int(i) for i in args.variants.split(",")] if args.variants else range(1, len(variants) + 1)
    for index in chosen:
        variant = variants[index - 1]
        tree = args.work / variant.name
        flags = [*pin.common_flags, *pin.backend_flags["cpu"], *variant.flags]
        started = time.monotonic()
        with open(args.work / f"{variant.name}.log", "w") as log:
            cmd = ["cmake", "-S", str(source), "-B", str(tree), f"-DCMAKE_TOOLCHAIN_FILE={toolchain}", *flags]
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
            build = ["cmake", "--build", str(tree), "-j", "2", "--target", "llama-server", "ggml-rpc-server"]
            subprocess.run(build, stdout=log, stderr=subprocess.STDOUT, check=True)
        built_s = time.monotonic() - started
        wrappers = args.work / f"{variant.name}-bin"
        wrappers.mkdir(exist_ok=True)
        for name in ("llama-server", "ggml-rpc-server"):
            (wrappers / name).write_text(WRAPPER.format(binary=tree / "bin" / name))
            (wrappers / name).chmod(0o755)
        llama = LlamaCpp(bin_dir=wrappers, version="cross", backend="cpu", variant=variant.name)
        workdir = args.work / f"{variant.name}-selftest"
        verdict = anyio.run(lambda ll=llama, wd=workdir: self_test(ll, wd, timeout_s=600))
        word = "passed" if verdict.passed else "FAILED"
        print(f"| {variant.name} | {' '.join(variant.flags)} | {built_s / 60:.1f} min | {word}: {verdict.detail} |")


if __name__ == "__main__":
    main()

"""`mesh-llm doctor`: which llama.cpp build this machine uses and why, and whether it passed its self-test.

Prints the pinned llama.cpp, the backend, the CPU and the features that decide the build, every build to
try here (best first) with its state in the cache and its self-test verdict on this machine, the one in
use, and the cache path. `--selftest` tests the cached builds again (recording new verdicts, which the
next node start follows); `--build` builds and tests what a node start would, with progress bars;
`--json` prints the same as JSON. `version_lines()` is the short form `mesh-llm --version` prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import anyio

from inference import paths
from inference.cpu import CpuInfo, read_cpu
from inference.llamacpp import detect_backend, version_string
from inference.provision import PlanStatus, ensure_llama_cpp, in_use, retest, survey
from mesh_llamacpp import load_pin
from mesh_mcp.errors import MeshLLMError

from . import __version__


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesh-llm doctor",
        description="Show the llama.cpp build this machine uses, its CPU flags and its self-test verdict.",
    )
    p.add_argument("--backend", choices=["cpu", "cuda", "metal", "vulkan"], help="llama.cpp backend (default: detect)")
    p.add_argument("--selftest", action="store_true", help="self-test the cached builds again and record the verdicts")
    p.add_argument("--build", action="store_true", help="build and self-test what a node start would (minutes)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _status_text(s: PlanStatus) -> str:
    if s.build is None:
        return "not built"
    if s.verdict is None:
        return "built, not self-tested on this machine"
    word = "passed" if s.verdict.passed else f"FAILED ({s.verdict.mode})"
    return f"built, self-test {word} {s.verdict.when()}: {s.verdict.detail}"


def _report(statuses: tuple[PlanStatus, ...], cpu: CpuInfo, backend: str) -> dict[str, Any]:
    pin = load_pin()
    using = in_use(statuses)
    external = os.environ.get("MESH_LLM_LLAMA_BIN")
    return {
        "mesh_llm": __version__,
        "llama_cpp": version_string(pin),
        "backend": backend,
        "cpu": cpu.public(),
        "builds": [
            {
                "variant": s.plan.variant,
                "why": s.plan.why,
                "flags": list(s.plan.configure_flags),
                "path": str(s.build.bin_dir) if s.build else None,
                "state": _status_text(s),
                "selftest_passed": s.verdict.passed if s.verdict else None,
            }
            for s in statuses
        ],
        "in_use": (using.plan.variant if using else None) if not external else "external",
        "external": external,
        "cache": str(paths.cache_dir()),
    }


def version_lines() -> list[str]:
    """`mesh-llm --version`: this package, the pinned llama.cpp, and the build in use on this machine."""
    pin = load_pin()
    lines = [f"mesh-llm {__version__}"]
    if external := os.environ.get("MESH_LLM_LLAMA_BIN"):
        return [*lines, f"llama.cpp: external binaries from MESH_LLM_LLAMA_BIN={external}"]
    try:
        backend = detect_backend()
        using = in_use(survey(backend))
    except MeshLLMError as exc:
        return [*lines, f"llama.cpp {version_string(pin)}: {exc}"]
    if using is None or using.verdict is None or using.build is None:
        state = "not built and self-tested on this machine yet (the first node start does it; see `mesh-llm doctor`)"
        return [*lines, f"llama.cpp {version_string(pin)}, {backend}: {state}"]
    return [
        *lines,
        f"llama.cpp {version_string(pin)}, {backend} {using.plan.variant} build, self-test passed "
        f"{using.verdict.when()}; {using.build.bin_dir}",
    ]


def _print(report: dict[str, Any]) -> None:
    cpu = report["cpu"]
    print(f"mesh-llm    {report['mesh_llm']}")
    print(f"llama.cpp   {report['llama_cpp']} (llama.cpp/pin.toml)")
    print(f"backend     {report['backend']}")
    print(f"CPU         {cpu['model']} ({cpu['arch']}, {cpu['system']})")
    print(f"features    {' '.join(cpu['features']) or '(none that matter to llama.cpp)'}")
    print("builds to try here, best first:")
    for i, b in enumerate(report["builds"], 1):
        mark = "  <- in use" if b["variant"] == report["in_use"] else ""
        print(f"  {i}. {b['variant']}: {b['why']}{mark}")
        for line in b["state"].splitlines():
            print(f"       {line}")
    if report["external"]:
        print(f"in use      external binaries (MESH_LLM_LLAMA_BIN={report['external']})")
    elif report["in_use"] is None:
        print("in use      none yet: the next node start (or `mesh-llm doctor --build`) builds and self-tests")
    print(f"cache       {report['cache']}")


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    cpu = read_cpu()
    try:
        backend = args.backend or detect_backend()
        if args.build:
            from .ui import Bars, setup_logging

            bars = Bars(setup_logging(False))
            try:
                anyio.run(lambda: ensure_llama_cpp(backend, bars.build, cpu=cpu))
            finally:
                bars.stop()
        elif args.selftest:
            for name, verdict in anyio.run(lambda: retest(backend, cpu)):
                print(f"self-test of {name}: {'passed' if verdict.passed else 'FAILED'}: {verdict.detail}")
        report = _report(survey(backend, cpu), cpu, backend)
    except MeshLLMError as exc:
        print(f"mesh-llm doctor: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0

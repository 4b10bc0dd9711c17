"""Provisioning llama.cpp: choose the build for this machine, build it, prove it, fall back.

`ensure_llama_cpp` decides with the pure planners (`inference.cpu.cpu_variants`, `llamacpp.plan_builds`:
the builds to try, best first) and then acts, plan by plan: reuse the cached build or build it (under a
file lock, so nodes on one machine build once), run the self-test (`inference.selftest`) unless this
machine already has a verdict for it, and return the first build that passes. A build that fails is
marked unusable on this machine with the reason, and the next, more portable plan is tried; the log says
so once, and the returned `LlamaCpp.fallback` carries it to `/api/status`. When no plan passes, the
error names every reason and what to try.

`MESH_LLM_LLAMA_BIN=/dir` skips building: those binaries are self-tested too, and refused if they fail.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from mesh_llamacpp import Pin, load_pin
from mesh_mcp.errors import BuildError, ConfigError, ToolchainMissing

from . import llamacpp_build, paths
from .cpu import CpuInfo, cpu_variants, read_cpu
from .llamacpp import BuildPlan, LlamaCpp, check_toolchain, detect_backend, plan_builds, version_string
from .llamacpp_build import BuildProgress, build_root
from .selftest import Verdict, load_verdict, machine_key, save_verdict, self_test

log = logging.getLogger("mesh_llm.provision")

Builder = Callable[[Pin, BuildPlan, BuildProgress], Awaitable[Path]]  # builds a plan, returns its install dir
Tester = Callable[[LlamaCpp, Path], Awaitable[Verdict]]  # self-tests binaries, working under the given dir


def installed(plan: BuildPlan, pin: Pin | None = None) -> LlamaCpp | None:
    """The cached build for this plan, if it is complete."""
    pin = pin or load_pin()
    target = build_root() / plan.key
    if not (target / "build-info.json").is_file():
        return None
    return _llama(target, pin, plan)


def _llama(target: Path, pin: Pin, plan: BuildPlan) -> LlamaCpp:
    return LlamaCpp(
        bin_dir=target / "bin",
        version=version_string(pin),
        backend=plan.backend,
        variant=plan.variant,
        flags=plan.configure_flags,
    )


def _default_tester(backend: str) -> Tester:
    gpu_layers = 0 if backend in ("cpu", "external") else 999

    async def test(llama: LlamaCpp, workdir: Path) -> Verdict:
        return await self_test(llama, workdir, gpu_layers=gpu_layers)

    return test


async def _locked(lock_path: Path) -> int:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    # Another node on this machine may be building or testing the same thing: wait for it, then reuse.
    await anyio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX, abandon_on_cancel=True)
    return fd


def verdict_file(store: Path, cpu: CpuInfo) -> Path:
    """Where this machine's verdict on the binaries of `store` (a build's install directory) is kept."""
    return store / "selftest" / f"{machine_key(cpu)}.json"


async def checked(
    llama: LlamaCpp,
    store: Path,
    cpu: CpuInfo,
    tester: Tester,
    progress: BuildProgress | None = None,
    *,
    again: bool = False,
) -> Verdict:
    """This machine's verdict on `llama` (binaries of `store`): the recorded one, or a new self-test."""
    path = verdict_file(store, cpu)
    if not again and (verdict := load_verdict(path)) is not None:
        return verdict
    what = f"the {llama.variant} build" if llama.variant else str(llama.bin_dir)
    log.info("self-testing llama.cpp %s (%s) on this machine", what, llama.backend)
    if progress is not None:
        progress(f"self-testing {what}", 0.0)
    verdict = dataclasses.replace(await tester(llama, path.with_suffix("")), cpu=cpu.model)
    if verdict.lasting:
        save_verdict(path, verdict)
    else:  # a hang proves less than a crash: this start falls back, the next one tests again
        path.unlink(missing_ok=True)
    if progress is not None:
        progress(f"self-testing {what}", 1.0)
    log.info("self-test of %s: %s", what, "passed" if verdict.passed else "FAILED")
    return verdict


async def ensure_llama_cpp(
    backend: str | None = None,
    on_progress: BuildProgress | None = None,
    *,
    cpu: CpuInfo | None = None,
    builder: Builder | None = None,
    tester: Tester | None = None,
) -> LlamaCpp:
    """A llama.cpp build that passed its self-test on this machine: cached, or built now."""
    shown = False  # whether a build or test was shown: then "done" closes the bar

    def progress(stage: str, fraction: float) -> None:
        nonlocal shown
        shown = True
        if on_progress is not None:
            on_progress(stage, fraction)

    cpu = cpu or read_cpu()
    if override := os.environ.get("MESH_LLM_LLAMA_BIN"):
        return await _external(Path(override).expanduser(), cpu, tester or _default_tester("external"), progress)
    pin = load_pin()
    backend = backend or detect_backend()
    tester = tester or _default_tester(backend)
    plans = plan_builds(pin, backend, cpu_variants(cpu))
    failed: list[tuple[BuildPlan, Verdict]] = []
    began = time.time()
    for plan in plans:
        fd = await _locked(build_root() / f".{plan.tree}.lock")
        try:
            llama = installed(plan, pin)
            if llama is None:
                check_toolchain()
                log.info("building llama.cpp %s for %s: %s", version_string(pin), plan.variant, plan.why)
                try:
                    target = await (builder or llamacpp_build.build)(pin, plan, progress)
                except ToolchainMissing:
                    raise
                except BuildError as exc:  # this compiler cannot build these CPU flags: a more portable plan may do
                    if plan == plans[-1]:
                        raise
                    log.error("the %s llama.cpp build did not compile: %s", plan.variant, exc)
                    first = str(exc).splitlines()[0]
                    failed.append((plan, Verdict(False, f"did not compile: {first}", "build", time.time())))
                    continue
                llama = _llama(target, pin, plan)
            verdict = await checked(llama, llama.bin_dir.parent, cpu, tester, progress)
            if verdict.passed:
                llamacpp_build.drop_tree(plan)
        finally:
            os.close(fd)
        if verdict.passed:
            if shown:
                progress("done", 1.0)
            fallback = _fallback_text(failed)
            if fallback:
                log.warning("%s; using the %s build (%s)", fallback, plan.variant, plan.why)
            return dataclasses.replace(llama, selftest=verdict.detail, fallback=fallback)
        failed.append((plan, verdict))
        if verdict.at >= began:  # tested just now: the whole story once; later starts say it in one line
            log.error("the %s llama.cpp build fails its self-test on this machine: %s", plan.variant, verdict.detail)
    raise BuildError(
        "no llama.cpp build passes its self-test on this machine:\n"
        + "\n".join(f"- {p.variant}: {v.detail}" for p, v in failed)
        + "\nPoint MESH_LLM_LLAMA_BIN at a directory with llama-server and ggml-rpc-server that run here, or "
        "try another --backend."
    )


def _fallback_text(failed: list[tuple[BuildPlan, Verdict]]) -> str:
    if not failed:
        return ""
    return "; ".join(
        f"the {p.variant} build failed its self-test on this machine ({v.detail.splitlines()[0]})" for p, v in failed
    )


def _external_build(bin_dir: Path) -> tuple[LlamaCpp, Path]:
    """MESH_LLM_LLAMA_BIN's binaries and where their verdicts are kept (re-tested when they change)."""
    llama = LlamaCpp(bin_dir=bin_dir, version="external", backend="external")
    return llama, paths.cache_dir() / "external" / _binaries_key(bin_dir)


async def _external(bin_dir: Path, cpu: CpuInfo, tester: Tester, progress: BuildProgress) -> LlamaCpp:
    llama, store = _external_build(bin_dir)
    try:
        llama.server  # noqa: B018 - validates that llama-server exists
    except BuildError as exc:
        raise ConfigError(f"MESH_LLM_LLAMA_BIN={bin_dir}: {exc}") from exc
    verdict = await checked(llama, store, cpu, tester, progress)
    if not verdict.passed:
        raise BuildError(
            f"MESH_LLM_LLAMA_BIN={bin_dir}: these binaries fail the self-test on this machine: {verdict.detail}"
        )
    return dataclasses.replace(llama, selftest=verdict.detail)


def _binaries_key(bin_dir: Path) -> str:
    """External binaries are re-tested when they change (path, size, mtime of each)."""
    parts = [str(bin_dir.resolve())]
    for p in sorted(bin_dir.iterdir()) if bin_dir.is_dir() else ():
        try:
            st = p.stat()
        except OSError:
            continue
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class PlanStatus:
    """One build to try on this machine, as the cache has it now (for `mesh-llm doctor`)."""

    plan: BuildPlan
    build: LlamaCpp | None  # None: not built
    verdict: Verdict | None  # None: not self-tested on this machine


def survey(backend: str | None = None, cpu: CpuInfo | None = None) -> tuple[PlanStatus, ...]:
    """Every plan for this machine, best first, with what the cache holds for it. Touches nothing."""
    pin, cpu = load_pin(), cpu or read_cpu()
    out = []
    for plan in plan_builds(pin, backend or detect_backend(), cpu_variants(cpu)):
        build = installed(plan, pin)
        verdict = load_verdict(verdict_file(build.bin_dir.parent, cpu)) if build else None
        out.append(PlanStatus(plan, build, verdict))
    return tuple(out)


def in_use(statuses: tuple[PlanStatus, ...]) -> PlanStatus | None:
    """The plan `ensure_llama_cpp` would return without building or testing, if any."""
    for status in statuses:
        if status.verdict is None:
            return None
        if status.verdict.passed:
            return status
    return None


async def retest(backend: str | None = None, cpu: CpuInfo | None = None) -> list[tuple[str, Verdict]]:
    """Self-test every cached build for this machine again (and MESH_LLM_LLAMA_BIN's binaries), recording the
    verdicts the next `ensure_llama_cpp` follows (`mesh-llm doctor --selftest`)."""
    cpu = cpu or read_cpu()
    out: list[tuple[str, Verdict]] = []
    if override := os.environ.get("MESH_LLM_LLAMA_BIN"):
        llama, store = _external_build(Path(override).expanduser())
        out.append(("external", await checked(llama, store, cpu, _default_tester("external"), again=True)))
        return out
    backend = backend or detect_backend()
    for status in survey(backend, cpu):
        if status.build is not None:
            tester = _default_tester(backend)
            out.append(
                (status.plan.variant, await checked(status.build, status.build.bin_dir.parent, cpu, tester, again=True))
            )
    return out

"""The restart loop shared by llama-server and rpc-server supervisors: start, report state, restart
a process that dies with exponential backoff, give up (state `failed`) after repeated failures to
ever become ready, and signal `started` to the caller once it first serves (or has failed).

A unit says how to run its process once (`attempt`, which calls `ready()` once serving and returns
an `ExitReport` of how the process ended) and what it is called; the policy is its settings' four
numbers. A process that faults (SIGSEGV, SIGILL …) is reported with the signal, the last lines of its
log and what to try, in the log and in the state detail the API shows.

The loop's own timing (backoff sleeps, the healthy-reset interval) reads an injected `Clock`, so it can be tested
on a fake one; `mesh_mcp.clock.Clock` is one (inference does not import the node's packages).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

# a request can put bytes into llama-server's log, and its tail reaches terminals, the console and API answers
from .controls import printable
from .exits import ExitReport

log = logging.getLogger("mesh_llm.supervise")

LOADING, SERVING, FAILED = "loading", "serving", "failed"


class Clock(Protocol):
    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class RealTime:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


REAL_TIME: Clock = RealTime()


class RestartPolicy(Protocol):
    @property
    def max_start_failures(self) -> int: ...  # consecutive failures before ever becoming ready → failed

    @property
    def backoff_initial_s(self) -> float: ...

    @property
    def backoff_max_s(self) -> float: ...

    @property
    def healthy_reset_s(self) -> float: ...  # after this long serving, a crash starts the backoff afresh


MAX_TAIL_LINE = 400  # characters kept of one log line


def tail(path: Path, lines: int = 8) -> str:
    """The last lines of a log file (its last 16 KiB at most, each line cut to `MAX_TAIL_LINE`), printable,
    for error messages."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return printable("\n".join(line[:MAX_TAIL_LINE] for line in text.splitlines()[-lines:]))


def _ready(clock: Clock, ready_at: list[float], task_status: TaskStatus[None], already: bool) -> None:
    ready_at.append(clock.monotonic())
    if not already:
        task_status.started()


async def supervise(
    *,
    noun: str,  # "llama-server": states say "starting llama-server", "llama-server crashed (…)"
    label: str,  # logs say "<label> failed 3 times"
    verb: str,  # "crashed" / "died"
    attempt: Callable[[Callable[[], None]], Awaitable[ExitReport]],
    policy: RestartPolicy,
    on_state: Callable[[str, str], None],
    on_restart: Callable[[], int],  # counts a restart; returns how many so far
    restarts: int = 0,  # restarts before this call
    log_path: Path,
    task_status: TaskStatus[None],
    clock: Clock = REAL_TIME,
) -> None:
    failures = 0
    backoff = policy.backoff_initial_s
    started = False
    while True:
        on_state(LOADING, f"starting {noun}" if not restarts else f"restarting {noun}")
        ready_at: list[float] = []
        report = await attempt(functools.partial(_ready, clock, ready_at, task_status, started))
        detail = report.text
        if ready_at:
            started = True
            failures = 0
            if clock.monotonic() - ready_at[0] > policy.healthy_reset_s:
                backoff = policy.backoff_initial_s
        else:
            failures += 1
        last = tail(log_path)
        hint = f"\n{report.hint}" if report.hint else ""
        if failures >= policy.max_start_failures:
            log.error(
                "%s failed %d times (%s); giving up. Log %s:\n%s%s", label, failures, detail, log_path, last, hint
            )
            on_state(FAILED, failed_detail(report, log_path, last))
            if not started:
                task_status.started()  # let the caller go on; the state says failed
            return
        restarts = on_restart()
        log.warning(
            "%s %s (%s); restarting in %.1fs. Log %s:\n%s%s", label, verb, detail, backoff, log_path, last, hint
        )
        on_state(LOADING, f"{noun} {verb} ({detail}); restarting in {backoff:.1f}s")
        await clock.sleep(backoff)
        backoff = min(backoff * 2, policy.backoff_max_s)


def failed_detail(report: ExitReport, log_path: Path, last: str) -> str:
    """The state detail of a process that gave up: how it ended, the log, and — for a crash by a signal —
    the log's last lines and what to try."""
    detail = f"{report.text}; see {log_path}"
    if report.signal is not None and last:
        detail += "\nlast lines of the log:\n" + last
    if report.hint:
        detail += "\n" + report.hint
    return detail

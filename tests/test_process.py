"""`ManagedProcess`, the supervision llama-server and rpc-server share, on a real child process (a small Python
listener): start with its env and log, readiness, restart after a crash, the backoff on an injected clock (and its
reset after a healthy run), stopping a process that never becomes ready, giving up, and reaping."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

import anyio
from anyio.abc import Process

from inference.exits import ExitReport, describe_exit
from inference.process import ManagedProcess, ReadyCheck, StateFn, free_port
from inference.supervise import FAILED, LOADING, REAL_TIME, SERVING, Clock, RestartPolicy

T = TypeVar("T")

# Listens on argv[1] after saying hello; `sys.argv[2] == "deaf"`: never listens; "fail": exits 1 at once.
SCRIPT = """
import os, socket, sys, time
print(os.environ.get("GREETING", "no greeting"), "pid", os.getpid(), flush=True)
if sys.argv[2] == "fail":
    sys.exit(1)
if sys.argv[2] != "deaf":
    s = socket.socket()
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen()
time.sleep(600)
"""


@dataclass(frozen=True)
class Policy:
    max_start_failures: int = 3
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    healthy_reset_s: float = 60.0
    ready_timeout_s: float = 20.0


@dataclass
class Listener(ManagedProcess):
    noun: ClassVar[str] = "listener"
    verb: ClassVar[str] = "died"
    logger: ClassVar[logging.Logger] = logging.getLogger("test.listener")

    home: Path
    mode: str = "listen"
    settings: Policy = field(default_factory=Policy)
    on_state: StateFn = lambda state, detail: None
    address: str | None = None
    pid: int | None = None
    restarts: int = 0
    timed_out: bool = False
    clock: Clock = REAL_TIME

    @property
    def log_path(self) -> Path:
        return self.home / "logs" / "listener.log"

    @property
    def binary(self) -> Path:
        return Path(sys.executable)

    @property
    def policy(self) -> RestartPolicy:
        return self.settings

    @property
    def ready_timeout_s(self) -> float:
        return self.settings.ready_timeout_s

    def args(self, port: int) -> list[str]:
        return [sys.executable, "-c", SCRIPT, str(port), self.mode]

    def env(self) -> dict[str, str]:
        return {**os.environ, "GREETING": "hello from the env"}

    async def _attempt(self, on_ready: Callable[[], None]) -> ExitReport:
        self.timed_out = False
        return describe_exit((await self._start_and_wait(free_port(), on_ready)).code, self.noun)

    @asynccontextmanager
    async def _ready_probe(self, proc: Process, port: int) -> AsyncIterator[ReadyCheck]:
        async def listening() -> bool:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                return False
            await stream.aclose()
            self.address = f"127.0.0.1:{port}"
            return True

        yield listening

    def _serving_detail(self) -> str:
        return f"listener pid {self.pid} at {self.address}"

    def _forget(self) -> None:
        self.address = None


class FakeClock:
    """Monotonic time that moves only when slept on or advanced; records the sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


def run(fn: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        with anyio.fail_after(timeout):
            return await fn()

    return anyio.run(bounded)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await anyio.sleep(0.02)


def test_serves_restarts_after_a_crash_and_reaps_when_cancelled(tmp_path: Path) -> None:
    states: list[tuple[str, str]] = []
    proc = Listener(tmp_path, settings=Policy(backoff_initial_s=0.05), on_state=lambda s, d: states.append((s, d)))

    async def body() -> tuple[int, int]:
        pids = (0, 0)
        async with anyio.create_task_group() as tg:
            await tg.start(proc.run)
            first = proc.pid
            assert first is not None and alive(first) and proc.address is not None
            assert states == [(LOADING, "starting listener"), (SERVING, f"listener pid {first} at {proc.address}")]
            os.kill(first, signal.SIGKILL)
            await until(lambda: proc.restarts == 1 and proc.address is not None)
            second = proc.pid
            assert second is not None and second != first
            pids = (first, second)
            tg.cancel_scope.cancel()
        return pids

    first, second = run(body)
    assert not alive(first) and not alive(second)  # reaped: no zombie answers kill(0)
    assert proc.pid is None and proc.address is None and proc.restarts == 1
    assert (LOADING, "listener died (killed by SIGKILL (signal 9)); restarting in 0.1s") in states
    assert (LOADING, "restarting listener") in states
    log = proc.log_path.read_text()
    assert log.count("hello from the env") == 2 and log.count(f"$ -- {sys.executable} -c") == 2


def test_backoff_doubles_on_the_injected_clock_and_resets_after_a_healthy_run(tmp_path: Path) -> None:
    clock = FakeClock()
    proc = Listener(tmp_path, settings=Policy(backoff_initial_s=0.5, healthy_reset_s=60.0), clock=clock)

    async def crash(restarts: int) -> None:
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        await until(lambda: proc.restarts == restarts and proc.address is not None)

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(proc.run)
            await crash(1)
            await crash(2)
            clock.now += 61.0  # serving longer than healthy_reset_s: the next crash starts the backoff afresh
            await crash(3)
            tg.cancel_scope.cancel()

    run(body)
    assert clock.slept == [0.5, 1.0, 0.5]


def test_gives_up_after_repeated_start_failures(tmp_path: Path) -> None:
    clock = FakeClock()
    states: list[tuple[str, str]] = []
    proc = Listener(
        tmp_path,
        mode="fail",
        settings=Policy(max_start_failures=3, backoff_initial_s=1.0, backoff_max_s=1.5),
        on_state=lambda s, d: states.append((s, d)),
        clock=clock,
    )

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(proc.run)  # returns once it has failed
            tg.cancel_scope.cancel()

    run(body)
    assert clock.slept == [1.0, 1.5]  # doubled, then capped at backoff_max_s
    assert proc.restarts == 2 and proc.pid is None
    assert states[-1][0] == FAILED and states[-1][1].startswith("exit 1: "), states


def test_a_process_that_never_becomes_ready_is_stopped(tmp_path: Path) -> None:
    states: list[tuple[str, str]] = []
    proc = Listener(
        tmp_path,
        mode="deaf",
        settings=Policy(max_start_failures=1, ready_timeout_s=0.5),
        on_state=lambda s, d: states.append((s, d)),
    )

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(proc.run)  # returns once it has failed
            tg.cancel_scope.cancel()

    run(body)
    assert proc.timed_out and proc.address is None and proc.pid is None
    assert states[-1][0] == FAILED and "killed by SIGTERM" in states[-1][1], states
    pid = int(proc.log_path.read_text().split("hello from the env pid ")[1].split()[0])
    assert not alive(pid)

"""`FakeClock`: a `mesh_mcp.clock.Clock` whose time moves only when a test says so.

`advance(seconds)` moves both readings forward and wakes the sleepers whose deadline passed, earliest first (ties
in the order they went to sleep). `run_for` and `run_until` advance in steps and, between steps, let every task run
until all of them wait again (`settle`), so a test drives minutes of gossip, heartbeats and timeouts in a
fraction of a second and waits only on what it can observe, with a bound. Deadlines that guard real I/O
(`anyio.fail_after` in the code under test) stay on the event loop's clock.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable

import anyio.lowlevel

START = 1_700_000_000.0  # a wall-clock reading in the past, so record versions (wall-clock ms) look like real ones
SETTLE_ROUNDS = 10_000  # event-loop turns `settle` allows before it gives up waiting for quiet


class FakeClock:
    def __init__(self, start: float = START) -> None:
        self._start = start
        self._mono = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self._start + self._mono

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._order), future))
        await future  # cancelled: the future is cancelled with it, and skipped when due

    @property
    def sleepers(self) -> int:
        """Tasks asleep on this clock now."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def next_deadline(self) -> float | None:
        """Seconds from now until the next sleeper is due (None: nobody sleeps)."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] - self._mono if self._sleepers else None

    def advance(self, seconds: float) -> None:
        """Move time forward; sleepers due by then wake, earliest first. They run when the caller next yields."""
        if seconds < 0:
            raise ValueError("a clock never goes back")
        self._advance_to(self._mono + seconds)

    def _advance_to(self, mono: float) -> None:
        self._mono = mono
        while self._sleepers and self._sleepers[0][0] <= self._mono:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    async def run_for(self, seconds: float, step: float = 0.1) -> None:
        """Advance `seconds` in steps of `step`, letting every task run to quiet after each."""
        if step <= 0:
            raise ValueError("step must be > 0")
        await settle()
        start = self._mono
        steps = max(0, math.ceil(seconds / step - 1e-9))
        for i in range(1, steps + 1):  # each step lands on start + i * step exactly: no drift over many steps
            self._advance_to(start + min(i * step, seconds))
            await settle()

    async def run_until(self, condition: Callable[[], bool], *, within: float, step: float = 0.1) -> float:
        """Advance in steps of `step` until `condition()` holds; the fake seconds it took. TimeoutError, saying
        so, if it does not within `within` fake seconds."""
        if step <= 0:
            raise ValueError("step must be > 0")
        await settle()
        start, i = self._mono, 0
        while not condition():
            if i * step >= within - 1e-9:
                raise TimeoutError(f"the condition did not hold within {within:g} s on the fake clock")
            i += 1
            self._advance_to(start + i * step)
            await settle()
        return i * step


async def settle(rounds: int = SETTLE_ROUNDS) -> None:
    """Let the event loop run until every other task waits on something (a sleep, a stream, I/O), or `rounds`
    turns passed. Like `anyio.wait_all_tasks_blocked`, without its 0.1 s real pause per busy turn."""
    this = asyncio.current_task()
    for _ in range(rounds):
        await asyncio.sleep(0)
        if all(t is this or _waiting(t) for t in asyncio.all_tasks()):
            return


def _waiting(task: asyncio.Task[object]) -> bool:
    waiter = getattr(task, "_fut_waiter", None)  # asyncio's: the future a suspended task waits on
    return waiter is not None and not waiter.done()

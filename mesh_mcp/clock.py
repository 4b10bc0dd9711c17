"""The clock the node's actors read and sleep on, injected so membership, re-planning and promotion timing can be
tested on a fake one (`mesh_mcp.testing.FakeClock`).

Pure cores (gossip, RTT, placement) take `now` as an argument; the actors that drive them (`Mesh`, the serving
runners and supervisors) take a `Clock` and read it instead of `time`/`anyio.sleep`. Deadlines that guard I/O
(`anyio.fail_after` around a dial or a read) stay on the event loop's clock: they bound real waits.
"""

from __future__ import annotations

import time
from typing import Protocol

import anyio


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (gossiped timestamps, record ages)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (intervals, deadlines)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` on this clock."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()

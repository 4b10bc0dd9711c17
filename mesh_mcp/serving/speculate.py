"""The actor of speculative decoding for one model: runs its llama-server in the mode `spec_control` chooses,
measures it, and switches.

llama-server fixes speculation at launch (this build's per-request speculation fields are compiled out), so a
switch is a restart in the other mode. A solo model switches blue-green: the new server loads beside the old,
requests go to the new one as soon as it is ready (the model's `upstream` moves), and the old one is stopped once
its requests are done (`requests_processing` 0, within `DRAIN_S`). A split host cannot load a second copy onto its
workers: it drains, stops and relaunches (its rpc-servers, relays and leases stay), and the model reads `loading`
meanwhile (requests are answered 503 + Retry-After).

Every `LOOK_S` the current server's counters (`inference.llama_metrics.parse_counters`) are read and what they moved
by is the current mode's measurement. While the first round runs, calibration prompts (code and prose, temperature
0, `CALIBRATION_TOKENS` each) are sent to the server one at a time, so the decision is made within a minute or two
of launch without waiting for users; later rounds measure live traffic only. A mode whose server cannot start
(a draft llama-server refuses) is left out, and the model goes on without it.

`MESH_LLM_SPEC_FORCE=1` keeps the first candidate on without measuring (benchmarks compare fixed modes with it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2

from inference.exits import ExitReport, describe_exit
from inference.llama_metrics import parse_counters, read_metrics
from inference.llama_server import LlamaServer
from inference.speculation import Speculation
from mesh_mcp.clock import SYSTEM_CLOCK, Clock
from mesh_mcp.serving import spec_control
from mesh_mcp.serving.spec_control import OFF, Control, Policy, Window

log = logging.getLogger("mesh_llm.speculation")

LOOK_S = 2.0
DRAIN_S = 300.0  # an old server's requests may run this long after a switch before it is stopped anyway
CALIBRATION_TOKENS = 64
CALIBRATION = (
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Explain in two short paragraphs why the sky is blue.",
    "Add type hints to this function and show the whole function:\n"
    "def scale(points, factor):\n    out = []\n    for x, y in points:\n        out.append((x * factor, y * factor))\n"
    "    return out\n",
    "Describe a walk through a busy market in the morning.",
)


def force() -> bool:
    return os.environ.get("MESH_LLM_SPEC_FORCE", "") not in ("", "0")


@dataclass
class _Running:
    server: LlamaServer
    mode: str
    scope: anyio.CancelScope
    ended: anyio.Event = field(default_factory=anyio.Event)
    report: ExitReport | None = None
    last: dict[str, float] = field(default_factory=dict)


@dataclass
class SpecServing:
    """Serve one model's llama-server in the mode the controller wants, until cancelled or until the server exits
    on its own (`run` returns its exit then, and keeps the controller for the next `run`)."""

    alias: str
    candidates: tuple[Speculation, ...]
    make_server: Callable[[Speculation | None], LlamaServer]  # a configured, unstarted server in that mode
    on_serving: Callable[[LlamaServer], object]  # the model is served by this (ready) server
    on_status: Callable[[dict[str, Any]], object]  # the controller's state, for the model's `speculation`
    on_switching: Callable[[str], object] = lambda detail: None  # a split's relaunch: the model is loading
    blue_green: bool = True
    clock: Clock = SYSTEM_CLOCK
    policy: Policy = field(default_factory=Policy)
    calibrate: bool = True
    control: Control | None = None
    launched: int = 0  # servers that became ready

    def __post_init__(self) -> None:
        self._by_mode = {c.kind: c for c in self.candidates}
        self._newest: _Running | None = None  # the server that became ready last: calibration goes there

    async def run(self) -> ExitReport:
        now = self.clock.monotonic()
        forced = force()
        if self.control is None:
            modes = tuple(self._by_mode)
            if forced:
                self.control = spec_control.forced(modes[0], now)
            else:
                self.control = spec_control.start(modes, now, self.policy)
            log.info("speculation for %s: %s", self.alias, ", ".join(self.control.modes) + f" ({self.control.reason})")
        last_status: dict[str, Any] = {}
        async with anyio.create_task_group() as tg:
            current = await self._launch(tg, self.control.current)
            if self.calibrate and not forced:
                tg.start_soon(self._calibration)
            async with httpx2.AsyncClient() as client:
                while True:
                    with anyio.move_on_after(LOOK_S):
                        await current.ended.wait()
                    if current.ended.is_set():
                        tg.cancel_scope.cancel()
                        assert current.report is not None
                        return current.report
                    self._observe(current, await self._counters(client, current))
                    now = self.clock.monotonic()
                    was_measuring = self.control.measuring
                    self.control, switch_to = spec_control.step(self.control, now, self.policy)
                    if was_measuring and not self.control.measuring:
                        log.info("speculation for %s: %s", self.alias, self.control.reason)
                    if switch_to is not None:  # the new mode is shown as its server takes over (`_launch`)
                        current = await self._switch(tg, client, current, switch_to)
                    shown = spec_control.status(self.control)
                    if shown != last_status:
                        self.on_status(shown)
                        last_status = shown
        raise AssertionError("unreachable: the loop returns when the server ends")

    def _observe(self, run: _Running, counters: dict[str, float]) -> None:
        if not counters or self.control is None or run.mode != self.control.current:
            return
        delta = {k: counters.get(k, 0.0) - run.last.get(k, 0.0) for k in ("tokens", "seconds", "drafted", "accepted")}
        run.last = counters
        if all(v >= 0 for v in delta.values()):  # counters only grow within one server
            self.control = spec_control.observe(self.control, Window(**delta))

    async def _counters(self, client: httpx2.AsyncClient, run: _Running) -> dict[str, float]:
        url = run.server.base_url
        text = await read_metrics(client, url) if url else None
        return parse_counters(text) if text else {}

    async def _launch(self, tg: anyio.abc.TaskGroup, mode: str) -> _Running:
        """Start the server for `mode` and wait until it is ready; a mode that cannot start is left out (the next
        mode starts instead)."""
        while True:
            assert self.control is not None
            spec = None if mode == OFF else self._by_mode[mode]
            server = self.make_server(spec)
            run = _Running(server, mode, anyio.CancelScope())
            ready = anyio.Event()
            tg.start_soon(self._serve, run, ready)
            async with anyio.create_task_group() as wait:

                async def first(event: anyio.Event) -> None:
                    await event.wait()
                    wait.cancel_scope.cancel()

                wait.start_soon(first, ready)
                wait.start_soon(first, run.ended)
            if ready.is_set():
                what = "without speculation" if spec is None else f"with {spec.label}"
                log.info("%s: llama-server pid %s serving %s", self.alias, server.pid, what)
                self.launched += 1
                self._newest = run
                self.on_status(spec_control.status(self.control))  # the mode is shown as the model serves in it
                self.on_serving(server)
                return run
            why = run.report.text if run.report is not None else "it did not start"
            if mode == OFF:
                return run  # the caller sees it ended: a server without speculation failing is no speculation fault
            log.warning("%s: llama-server with %s could not start (%s); leaving it out", self.alias, mode, why)
            self.control, mode = spec_control.fail(self.control, mode, why, self.clock.monotonic())

    async def _serve(self, run: _Running, ready: anyio.Event) -> None:
        with run.scope:
            try:
                code = await run.server.run_once(ready.set)
                run.report = describe_exit(code, "llama-server")
            except OSError as exc:
                run.report = ExitReport(None, f"could not start: {exc}")
        if run.report is None:
            run.report = ExitReport(None, "stopped")
        run.ended.set()

    async def _switch(self, tg: anyio.abc.TaskGroup, client: httpx2.AsyncClient, old: _Running, mode: str) -> _Running:
        assert self.control is not None
        log.info("speculation for %s: %s -> %s (%s)", self.alias, old.mode, mode, self.control.reason)
        self._newest = None  # calibration waits for the new server: the old one drains
        if self.blue_green:
            new = await self._launch(tg, mode)
            await self._drain(client, old)
            return new
        self.on_switching(f"switching speculation: {old.mode} -> {mode}")
        await self._drain(client, old)
        return await self._launch(tg, mode)

    async def _drain(self, client: httpx2.AsyncClient, run: _Running) -> None:
        """Stop `run`'s server once no request runs on it (or after `DRAIN_S`)."""
        with anyio.move_on_after(DRAIN_S):
            while not run.ended.is_set():
                counters = await self._counters(client, run)
                if counters.get("processing", 0.0) == 0.0:
                    break
                await self.clock.sleep(0.5)
        run.scope.cancel()
        await run.ended.wait()

    async def _calibration(self) -> None:
        """Until the first decision: calibration prompts, one at a time, to the newest server (during a blue-green
        switch the old one drains meanwhile)."""
        async with httpx2.AsyncClient(timeout=600) as client:
            i = 0
            while self.control is not None and self.control.chosen is None:
                newest = self._newest
                url = newest.server.base_url if newest is not None else None
                if newest is None or url is None or newest.ended.is_set():
                    await self.clock.sleep(0.5)
                    continue
                body = {
                    "messages": [{"role": "user", "content": CALIBRATION[i % len(CALIBRATION)]}],
                    "max_tokens": CALIBRATION_TOKENS,
                    "temperature": 0,
                }
                i += 1
                try:
                    await client.post(url + "/v1/chat/completions", json=body)
                except httpx2.HTTPError:  # the server was switched under the request: the next one goes on
                    await self.clock.sleep(0.5)

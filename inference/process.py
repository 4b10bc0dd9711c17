"""One supervised llama.cpp child process: `ManagedProcess`, which `LlamaServer` and `RpcServer` specialise.

It starts the command through the pdeathsig shim (so the child dies with us, even on SIGKILL) with its env and
its log file, in a session of its own, on 127.0.0.1 at a port the specialisation picks; polls the specialisation's
readiness check until it passes (then the process is serving) or its timeout passes (then it is stopped); waits
for the process to exit, and always terminates and reaps it (`terminate`: SIGTERM, then SIGKILL). `run` keeps it
serving with `supervise`'s restart loop (backoff, giving up, restart counter, state reports).

A specialisation says: its name (`noun`, `verb`, `label`), its binary and command line (`args`), its `env`, how
to check readiness once (`_ready_probe`, which also records what it learned: an address, capabilities), the state
detail while serving, and what one attempt is (`_attempt`: one start, or a few when a bind race is lost).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import anyio
from anyio.abc import Process, TaskStatus

from .exits import ExitReport
from .supervise import SERVING, Clock, RestartPolicy, supervise

StateFn = Callable[[str, str], None]  # (state, human-readable detail)
ReadyCheck = Callable[[], Awaitable[bool]]  # one readiness check: True once the process serves
READY_POLL_S = 0.1  # between readiness checks


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def terminate(proc: Process, grace_s: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL; always reaps."""
    if proc.returncode is None:
        try:
            proc.terminate()
        except ProcessLookupError:
            pass
        with anyio.move_on_after(grace_s):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
    await proc.wait()


class Ended(NamedTuple):
    """How one start of the process ended."""

    code: int  # its exit status (negative: killed by that signal)
    ready: bool  # it passed its readiness check before it ended
    log_offset: int  # where its own output begins in the log


class ManagedProcess(ABC):
    """A child process kept serving. The specialisation is a dataclass holding the state below."""

    noun: ClassVar[str]  # "llama-server": states say "starting llama-server", "llama-server crashed (…)"
    verb: ClassVar[str]  # what a process that ended did: "crashed", "died"
    logger: ClassVar[logging.Logger]  # its module's: log lines name the server, not this module

    on_state: StateFn
    pid: int | None  # while it runs
    restarts: int
    timed_out: bool  # the last start was stopped for not becoming ready in `ready_timeout_s`
    clock: Clock  # the restart loop's backoff and healthy-reset; readiness waits on real processes, in real time

    if TYPE_CHECKING:  # a dataclass field (LlamaServer) or a property (RpcServer)

        @property
        def log_path(self) -> Path: ...

    @property
    def serving_what(self) -> str:
        """What it serves, in log lines: " for <alias>" (llama-server), "" (rpc-server)."""
        return ""

    @property
    def label(self) -> str:
        """Who, in log lines: "llama-server for <alias>"."""
        return self.noun + self.serving_what

    @property
    @abstractmethod
    def binary(self) -> Path: ...

    @property
    @abstractmethod
    def policy(self) -> RestartPolicy: ...

    @property
    @abstractmethod
    def ready_timeout_s(self) -> float: ...

    @abstractmethod
    def args(self, port: int) -> list[str]:
        """The binary's command line, serving on 127.0.0.1:`port`."""

    def command(self, port: int) -> list[str]:
        # The pdeathsig shim makes the process die with us even if we are SIGKILLed.
        return [sys.executable, "-m", "inference.pdeathsig", "--", *self.args(port)]

    def env(self) -> dict[str, str] | None:
        """The process's environment; None: ours."""
        return None

    @abstractmethod
    def _ready_probe(self, proc: Process, port: int) -> AbstractAsyncContextManager[ReadyCheck]:
        """The readiness check of one start, open while it is polled; it records what it learned when it passes."""

    @abstractmethod
    def _serving_detail(self) -> str:
        """The state detail once ready: "llama-server pid 123 at http://127.0.0.1:4567"."""

    @abstractmethod
    def _forget(self) -> None:
        """Forget the address of a process that is gone."""

    @abstractmethod
    async def _attempt(self, on_ready: Callable[[], None]) -> ExitReport:
        """Run the process once (`_start_and_wait`) until it ends; call `on_ready` when it serves."""

    def _prepare(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the process serving until cancelled. Signals `started` once it first serves (or has failed)."""
        self._prepare()

        async def attempt(ready: Callable[[], None]) -> ExitReport:
            def serving() -> None:
                self.on_state(SERVING, self._serving_detail())
                ready()

            try:
                return await self._attempt(serving)
            except OSError as exc:
                return ExitReport(None, f"could not start {self.binary}: {exc}")
            finally:
                self._forget()
                self.pid = None

        await supervise(
            noun=self.noun,
            label=self.label,
            verb=self.verb,
            attempt=attempt,
            policy=self.policy,
            on_state=self.on_state,
            on_restart=self._count_restart,
            restarts=self.restarts,
            log_path=self.log_path,
            task_status=task_status,
            clock=self.clock,
        )

    def _count_restart(self) -> int:
        self.restarts += 1
        return self.restarts

    async def _start_and_wait(self, port: int, on_ready: Callable[[], None]) -> Ended:
        """Start the process on `port`, call `on_ready` once it passes its readiness check, wait for it to exit
        (or stop it when it does not become ready in time), and reap it whatever happens."""
        cmd = self.command(port)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd[3:])}\n".encode())
            logf.flush()
            offset = logf.tell()
            proc = await anyio.open_process(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env(),
            )
        self.pid = proc.pid
        self.logger.info("started %s pid %d%s on 127.0.0.1:%d", self.noun, proc.pid, self.serving_what, port)
        ready: list[bool] = []

        def became_ready() -> None:
            ready.append(True)
            on_ready()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_ready, proc, port, became_ready)
                code = await proc.wait()
                tg.cancel_scope.cancel()
            return Ended(code, bool(ready), offset)
        finally:
            with anyio.CancelScope(shield=True):
                await terminate(proc)

    async def _watch_ready(self, proc: Process, port: int, on_ready: Callable[[], None]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        async with self._ready_probe(proc, port) as check:
            while time.monotonic() < deadline and proc.returncode is None:
                if await check():
                    on_ready()
                    return
                await anyio.sleep(READY_POLL_S)
        if proc.returncode is None:
            self.logger.error("%s not ready after %.0fs; stopping it", self.label, self.ready_timeout_s)
            self.timed_out = True
            proc.terminate()

"""One supervised llama-server: command line, start, readiness, restart with backoff, reaping.

`server_args` is pure (tested without processes). `LlamaServer.run` is the supervisor loop: it starts
llama-server on 127.0.0.1 at a fresh ephemeral port, waits for `/health` to answer 200, reports state
changes, restarts a crashed server with exponential backoff, gives up (state `failed`) when the
server cannot even load, and always terminates and reaps the process when cancelled.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx2
from anyio.abc import Process, TaskStatus

from .exits import ExitReport, describe_exit
from .llamacpp import LlamaCpp
from .supervise import FAILED as FAILED  # the model states, re-exported
from .supervise import LOADING as LOADING
from .supervise import SERVING, supervise

log = logging.getLogger("mesh_llm.llama_server")

# Model states as the console and API report them.
DOWNLOADING, STOPPED = "downloading", "stopped"  # and LOADING, SERVING, FAILED (supervise.py)

StateFn = Callable[[str, str], None]  # (state, human-readable detail)


@dataclass(frozen=True)
class ServerSettings:
    ctx_per_slot: int = 4096
    slots: int = 4
    gpu_layers: int = 0  # -ngl; 0 on CPU-only machines, 999 puts every layer on the GPU
    embeddings: bool = False
    extra_args: tuple[str, ...] = ()
    load_timeout_s: float = 600.0
    max_start_failures: int = 3  # consecutive failures before ever becoming ready → failed
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    healthy_reset_s: float = 60.0  # after this long serving, a crash starts the backoff afresh


def server_args(binary: Path, model: Path, alias: str, port: int, s: ServerSettings) -> list[str]:
    """The llama-server command line. Every setting that has a surprising default is explicit."""
    args = [
        str(binary),
        "--model", str(model),
        "--alias", alias,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--ctx-size", str(s.ctx_per_slot * s.slots),
        "--parallel", str(s.slots),
        "--kv-unified",
        "--fit", "off",
        "--n-gpu-layers", str(s.gpu_layers),
        "--no-webui",
        "--metrics",
        "--jinja",
    ]  # fmt: skip
    if s.embeddings:
        args.append("--embeddings")
    return [*args, *s.extra_args]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class LlamaServer:
    """Supervises one llama-server for one model. `base_url` is set while it is serving."""

    llama: LlamaCpp
    model_path: Path
    alias: str
    log_path: Path
    settings: ServerSettings = field(default_factory=ServerSettings)
    on_state: StateFn = lambda state, detail: None
    base_url: str | None = None
    pid: int | None = None
    restarts: int = 0
    tool_calls: bool | None = None  # /props chat_template_caps.supports_tool_calls of the running server
    load_timed_out: bool = False  # the last run was stopped for not becoming ready in load_timeout_s

    def command(self, port: int) -> list[str]:
        args = server_args(self.llama.server, self.model_path, self.alias, port, self.settings)
        # The pdeathsig shim makes llama-server die with us even if we are SIGKILLed.
        return [sys.executable, "-m", "inference.pdeathsig", "--", *args]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep llama-server serving until cancelled. Signals `started` once it first serves."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

        async def attempt(ready: Callable[[], None]) -> ExitReport:
            def serving() -> None:
                self.on_state(SERVING, f"llama-server pid {self.pid} at {self.base_url}")
                ready()

            try:
                return describe_exit(await self.run_once(serving), "llama-server")
            except OSError as exc:
                return ExitReport(None, f"could not start {self.llama.server}: {exc}")
            finally:
                self.base_url, self.pid = None, None

        await supervise(
            noun="llama-server",
            label=f"llama-server for {self.alias}",
            verb="crashed",
            attempt=attempt,
            policy=self.settings,
            on_state=self.on_state,
            on_restart=self._count_restart,
            restarts=self.restarts,
            log_path=self.log_path,
            task_status=task_status,
        )

    def _count_restart(self) -> int:
        self.restarts += 1
        return self.restarts

    async def run_once(self, on_ready: Callable[[], None]) -> int:
        """Start llama-server, wait for readiness, then wait for it to exit; return its exit code."""
        port = free_port()
        self.load_timed_out = False
        cmd = self.command(port)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd[3:])}\n".encode())
            logf.flush()
            proc = await anyio.open_process(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid = proc.pid
        log.info("started llama-server pid %d for %s on 127.0.0.1:%d", proc.pid, self.alias, port)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_ready, proc, f"http://127.0.0.1:{port}", on_ready, tg.cancel_scope)
                code = await proc.wait()
                tg.cancel_scope.cancel()
            return code
        finally:
            with anyio.CancelScope(shield=True):
                await terminate(proc)

    async def _watch_ready(
        self, proc: Process, url: str, on_ready: Callable[[], None], scope: anyio.CancelScope
    ) -> None:
        deadline = time.monotonic() + self.settings.load_timeout_s
        async with httpx2.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                try:
                    resp = await client.get(url + "/health")
                    if resp.status_code == 200:
                        self.tool_calls = await _tool_calls(client, url)
                        self.base_url = url
                        on_ready()
                        return
                except httpx2.TransportError:
                    pass  # not listening yet
                await anyio.sleep(0.1)
        log.error("llama-server for %s not ready after %.0fs; stopping it", self.alias, self.settings.load_timeout_s)
        self.load_timed_out = True
        proc.terminate()


async def _tool_calls(client: httpx2.AsyncClient, url: str) -> bool | None:
    """Whether the chat template llama-server actually uses (its own, or `--chat-template-file`) can call
    tools: `/props` `chat_template_caps.supports_tool_calls`, found by rendering the template; None if unknown."""
    try:
        resp = await client.get(url + "/props")
        caps = resp.json().get("chat_template_caps") if resp.status_code == 200 else None
    except (httpx2.HTTPError, ValueError, AttributeError):
        return None
    value = caps.get("supports_tool_calls") if isinstance(caps, dict) else None
    return value if isinstance(value, bool) else None


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

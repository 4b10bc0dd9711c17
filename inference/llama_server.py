"""One supervised llama-server: its command line, readiness, and what it learns once ready.

`server_args` is pure (tested without processes). `LlamaServer` is a `ManagedProcess` (inference/process.py):
`run` starts llama-server on 127.0.0.1 at a fresh ephemeral port, waits for `/health` to answer 200 (then reads
what its chat template can do: call tools, from `/props`; think, from `/apply-template`), reports state changes,
restarts a crashed server with exponential backoff, gives up (state `failed`) when the server cannot even load,
and always terminates and reaps the process when cancelled. `run_once` is one start, for callers that re-plan
instead of restarting.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import httpx2
from anyio.abc import Process

from .exits import ExitReport, describe_exit
from .gguf_facts import template_thinks
from .llamacpp import LlamaCpp
from .process import ManagedProcess, ReadyCheck, StateFn, free_port
from .supervise import FAILED as FAILED  # the model states, re-exported
from .supervise import LOADING as LOADING
from .supervise import REAL_TIME, Clock, RestartPolicy
from .supervise import SERVING as SERVING

log = logging.getLogger("mesh_llm.llama_server")

# Model states as the console and API report them.
DOWNLOADING, STOPPED = "downloading", "stopped"  # and LOADING, SERVING, FAILED (supervise.py)


# Thinking parsed out of the answer (`reasoning_content`, Anthropic `thinking` blocks), off unless a request turns it
# on (a template's thinking switch rendered off; a model that always thinks made to end at once). A request turns it
# on with `chat_template_kwargs.enable_thinking` and a budget: mesh_mcp/api/reasoning.py writes both.
REASONING_ARGS = ("--reasoning-format", "deepseek", "--reasoning", "off", "--reasoning-budget", "0")


@dataclass(frozen=True)
class ServerSettings:
    ctx_per_slot: int = 4096
    slots: int = 4
    gpu_layers: int = 0  # -ngl; 0 on CPU-only machines, 999 puts every layer on the GPU
    embeddings: bool = False
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # added to our environment (a split's MESH_LLM_RPC_PEERS)
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
    else:
        args += REASONING_ARGS
    return [*args, *s.extra_args]


@dataclass
class LlamaServer(ManagedProcess):
    """Supervises one llama-server for one model. `base_url` is set while it is serving."""

    noun: ClassVar[str] = "llama-server"
    verb: ClassVar[str] = "crashed"
    logger: ClassVar[logging.Logger] = log

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
    thinking: bool | None = None  # the running server's template thinks (`_thinking`)
    timed_out: bool = False  # the last run was stopped for not becoming ready in load_timeout_s
    clock: Clock = REAL_TIME  # the restart backoff's

    @property
    def serving_what(self) -> str:
        return f" for {self.alias}"

    def env(self) -> dict[str, str] | None:
        return {**os.environ, **dict(self.settings.env)} if self.settings.env else None

    @property
    def binary(self) -> Path:
        return self.llama.server

    @property
    def policy(self) -> RestartPolicy:
        return self.settings

    @property
    def ready_timeout_s(self) -> float:
        return self.settings.load_timeout_s

    def args(self, port: int) -> list[str]:
        return server_args(self.llama.server, self.model_path, self.alias, port, self.settings)

    async def run_once(self, on_ready: Callable[[], None]) -> int:
        """Start llama-server, wait for readiness, then wait for it to exit; return its exit code."""
        self._prepare()
        port = free_port()
        self.timed_out = False
        return (await self._start_and_wait(port, on_ready)).code

    async def _attempt(self, on_ready: Callable[[], None]) -> ExitReport:
        return describe_exit(await self.run_once(on_ready), "llama-server")

    @asynccontextmanager
    async def _ready_probe(self, proc: Process, port: int) -> AsyncIterator[ReadyCheck]:
        """`/health` answers 200; then `tool_calls` and `thinking` are read from the server."""
        url = f"http://127.0.0.1:{port}"
        async with httpx2.AsyncClient(timeout=2.0) as client:

            async def healthy() -> bool:
                try:
                    resp = await client.get(url + "/health")
                except httpx2.TransportError:
                    return False  # not listening yet
                if resp.status_code != 200:
                    return False
                if not self.settings.embeddings:
                    props = await _props(client, url)
                    self.tool_calls = _tool_calls(props)
                    self.thinking = await _thinking(client, url, props)
                self.base_url = url
                return True

            yield healthy

    def template_caps(self) -> dict[str, bool]:
        """What the running server's chat template can do, as `ModelStatus` fields (`tools`, `thinking`); only the
        known ones (an embedding server has neither)."""
        caps = {"tools": self.tool_calls, "thinking": self.thinking}
        return {k: v for k, v in caps.items() if v is not None}

    def _serving_detail(self) -> str:
        return f"llama-server pid {self.pid} at {self.base_url}"

    def _forget(self) -> None:
        self.base_url = None


async def _props(client: httpx2.AsyncClient, url: str) -> dict[str, object]:
    """llama-server's `/props` (read once at readiness); empty if it cannot be read."""
    try:
        resp = await client.get(url + "/props")
        props = resp.json() if resp.status_code == 200 else None
    except (httpx2.HTTPError, ValueError):
        return {}
    return props if isinstance(props, dict) else {}


def _tool_calls(props: dict[str, object]) -> bool | None:
    """Whether the chat template llama-server actually uses (its own, or `--chat-template-file`) can call
    tools: `/props` `chat_template_caps.supports_tool_calls`, found by rendering the template; None if unknown."""
    caps = props.get("chat_template_caps")
    value = caps.get("supports_tool_calls") if isinstance(caps, dict) else None
    return value if isinstance(value, bool) else None


_PROBE = [{"role": "user", "content": "hi"}]


async def _thinking(client: httpx2.AsyncClient, url: str, props: dict[str, object]) -> bool | None:
    """Whether the template llama-server uses makes a thinking model: it renders differently with thinking on and
    off (`/apply-template`, a switch as in Qwen3, GLM-4.x, SmolLM3), or its text has thinking tags (a model that
    always thinks, as the DeepSeek-R1 distills: `gguf_facts.template_thinks`); None if unknown."""
    try:
        prompts = []
        for on in (True, False):
            body = {"messages": _PROBE, "chat_template_kwargs": {"enable_thinking": on}}
            resp = await client.post(url + "/apply-template", json=body)
            prompt = resp.json().get("prompt") if resp.status_code == 200 else None
            prompts.append(prompt if isinstance(prompt, str) else None)
    except (httpx2.HTTPError, ValueError, AttributeError):
        return None
    if None not in prompts and prompts[0] != prompts[1]:
        return True
    template = props.get("chat_template")
    if isinstance(template, str):
        return template_thinks(template)
    return None

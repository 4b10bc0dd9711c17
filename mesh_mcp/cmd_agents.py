"""`mesh-llm goose` and `mesh-llm claude`: run a coding agent on the mesh's models (the processes;
what is decided lives in `agents.py`).

mesh-llm goose  [--model M] [--join TOKEN] [--port P] [-- GOOSE ARGS]    default: goose session
mesh-llm claude [--model M] [--join TOKEN] [--port P] [-- CLAUDE ARGS]

In order: the agent's binary must be on PATH (else: how to install it); the local node is used, or a
client node started for as long as the agent runs (`local.attach_or_start`); the model is picked from
the node's `/v1/models`, polled while models load or gossip arrives (`agents.pick_model`); Goose's
provider file is merged, each agent's environment built; the agent runs in the foreground.

Signals: the agent stays in the terminal's process group, so Ctrl-C reaches it directly (Claude Code
and Goose use it to interrupt a turn) and the launcher does not pass SIGINT on; it waits for the agent
to exit, whatever the reason, then stops the node it started. SIGTERM and SIGHUP are passed on to the
agent. Before the agent starts, any of them stops the launch. The exit status is the agent's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx2
from anyio.abc import Process

from inference import paths
from mesh_mcp.errors import MeshLLMError, user_error
from mesh_mcp.mcp.local import api_root, attach_or_start

from . import agents
from .agents import MeshModel, NotYet, Picked

log = logging.getLogger("mesh_llm.agents")

AGENTS = ("goose", "claude")
DEFAULT_ARGS = {"goose": ["session"], "claude": []}
POLL_S = 0.25
SETTLE_S = 3.0  # models known but none fits: wait this long for more records before saying so
STOP_AGENT_S = 10.0
INTERRUPTED = 130


def parser(agent: str) -> argparse.ArgumentParser:
    name = {"goose": "Goose", "claude": "Claude Code"}[agent]
    p = argparse.ArgumentParser(
        prog=f"mesh-llm {agent}",
        description=f"Run {name} on the mesh's models: uses the node running here, or starts a client node "
        "for as long as the agent runs.",
        epilog=f"Arguments after `--` go to {agent} (default: `{' '.join([agent, *DEFAULT_ARGS[agent]])}`). "
        "Without --model the strongest tool-capable model serving on the mesh is picked: one whose chat template "
        "has tool calls, the largest first.",
    )
    p.add_argument("--model", metavar="MODEL", help="model of the mesh to use (exact, case-insensitive or prefix)")
    p.add_argument(
        "--join",
        action="append",
        default=[],
        metavar="TOKEN",
        help="mesh to join if no node runs here (default: the mesh this machine last used)",
    )
    p.add_argument("--port", type=int, metavar="P", help="API port of the node to use, or to start one on")
    p.add_argument("--name", help="name of a node started for the agent (default: host name)")
    p.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to wait for a model to serve on the mesh (default 60)",
    )
    return p


def main(agent: str, argv: list[str]) -> int:
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, None)
    args = parser(agent).parse_args(own)
    env = dict(os.environ)
    binary = shutil.which(agent, path=env.get("PATH", os.defpath))
    if binary is None:
        print(f"mesh-llm: {agents.INSTALL[agent]}", file=sys.stderr)
        return 127
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mesh-llm: %(message)s"))
    ours = logging.getLogger("mesh_llm")  # our messages only, not the HTTP client's
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    launch = Launch(agent, binary, args.model, tuple(args.join), args.port, args.name, args.wait, extra, env)
    try:
        return anyio.run(launch.run)
    except MeshLLMError as exc:
        print(f"mesh-llm: {exc}", file=sys.stderr)
        return 1


@dataclass
class Launch:
    agent: str
    binary: str
    model: str | None
    join: tuple[str, ...]
    port: int | None
    name: str | None
    wait_s: float
    extra: list[str] | None  # the agent's arguments after `--`
    env: dict[str, str]

    def __post_init__(self) -> None:
        self.process: Process | None = None
        self.status = INTERRUPTED

    async def run(self) -> int:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._signals, tg.cancel_scope)
                await self._launch()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the task group wraps a failed start: show the user its message
            if (first := user_error(group)) is None:
                raise
            raise first from None
        return self.status

    async def _launch(self) -> None:
        home = paths.home_dir()
        async with attach_or_start(home, self.join, self.name, api_port=self.port, purpose=self.agent) as info:
            root = api_root(info.api_url)
            choice, models = await wait_for_model(root, self.model, self.wait_s)
            if isinstance(choice, NotYet):
                print(f"mesh-llm: {choice.message}", file=sys.stderr)
                self.status = 1
                return
            print(f"mesh-llm: {self.agent} on {choice.why}", file=sys.stderr)
            chosen = next((m for m in models if m.name == choice.name), None)
            if (warning := agents.context_warning(self.agent, chosen)) is not None:
                print(f"mesh-llm: warning: {warning}", file=sys.stderr)
            cmd = [self.binary, *(DEFAULT_ARGS[self.agent] if self.extra is None else self.extra)]
            if self.agent == "goose":
                env = self._goose(root, choice, models)
            else:
                env = agents.claude_env(self.env, root, choice.name)
            self.status = agents.exit_status(await self._run_agent(cmd, env))

    def _goose(self, root: str, choice: Picked, models: list[MeshModel]) -> dict[str, str]:
        home = Path(self.env.get("HOME") or Path.home())
        path = agents.goose_config_dir(self.env, home) / "custom_providers" / f"{agents.GOOSE_PROVIDER}.json"
        others = [m.name for m in sorted(models, key=agents.strength, reverse=True) if m.state == agents.SERVING]
        names = [choice.name, *(n for n in others if n != choice.name)]
        contexts = {m.name: m.context for m in models if m.context}
        write_json(path, agents.goose_provider(read_json(path), root, names, contexts))
        log.info("Goose provider %r (%s) in %s", agents.GOOSE_PROVIDER, root, path)
        return agents.goose_env(self.env, choice.name)

    async def _run_agent(self, cmd: list[str], env: dict[str, str]) -> int:
        """Run the agent with our terminal (stdin/stdout/stderr inherited, same process group)."""
        process = await anyio.open_process(cmd, stdin=None, stdout=None, stderr=None, env=env)
        self.process = process
        try:
            return await process.wait()
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:  # we were cancelled: do not leave the agent behind
                    process.terminate()
                    with anyio.move_on_after(STOP_AGENT_S):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                    await process.wait()
                await process.aclose()
            self.process = None

    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                process = self.process
                if process is None:  # not started yet: stop the launch (and the node started for it)
                    log.info("%s received: stopping", signal.Signals(signum).name)
                    self.status = 128 + signum
                    scope.cancel()
                    return
                if signum != signal.SIGINT and process.returncode is None:  # Ctrl-C reached the agent itself
                    process.send_signal(signum)


async def wait_for_model(root: str, requested: str | None, wait_s: float) -> tuple[Picked | NotYet, list[MeshModel]]:
    """Poll `/v1/models` until a model fits (`agents.pick_model`), or waiting cannot help: nothing is
    loading and the models have been seen for `SETTLE_S`, or `wait_s` has passed."""
    start = anyio.current_time()
    seen: float | None = None
    told = False
    async with httpx2.AsyncClient(timeout=5.0) as client:
        while True:
            try:
                models = agents.parse_models((await client.get(root + "/v1/models")).json())
            except (httpx2.HTTPError, ValueError):
                models = []
            choice = agents.pick_model(models, requested)
            now = anyio.current_time()
            if models and seen is None:
                seen = now
            if isinstance(choice, Picked):
                return choice, models
            if now - start >= wait_s or (seen is not None and now - seen >= SETTLE_S and not choice.loading):
                return choice, models
            if not told and now - start >= 2.0:
                log.info("waiting up to %.0f s for a model on the mesh (%s)", wait_s, choice.message)
                told = True
            await anyio.sleep(POLL_S)


def read_json(path: Path) -> dict[str, object] | None:
    """The JSON object in `path`, None if there is no file; a clear error for anything else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MeshLLMError(f"{path} is not readable JSON ({exc}); fix or remove it") from exc
    if not isinstance(data, dict):
        raise MeshLLMError(f"{path} does not hold a JSON object; fix or remove it")
    return data


def write_json(path: Path, data: Mapping[str, object]) -> None:
    """Replace `path` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

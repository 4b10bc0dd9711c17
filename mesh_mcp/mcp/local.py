"""The node running on this machine, as `mesh-llm blackboard --mcp` and the agent launchers
(`mesh-llm goose`, `mesh-llm claude`) find it, or start one.

A running node announces itself in `HOME/node.json` (`write_runtime` after it listens,
`remove_runtime` when it stops): its pid, node id and URLs. `read_runtime` trusts that file only
while its process lives. `attach_or_start` uses the node it describes if that node answers, and
otherwise starts a client node (`--client --blackboard`) in the background for as long as it is
needed, and stops it afterwards, also when cancelled. Without `--join` the started node uses this
home's `mesh.toml` (the mesh it last joined or created) and dials the members listed in `peers.json`,
i.e. it rejoins the last mesh this machine used. `stdio.run_stdio` serves the MCP tools over stdio on top.

Nothing here prints (in stdio mode stdout carries the MCP protocol): logs go to stderr (logging) and the
started node's output to `HOME/logs/mcp-node.log` (`agent-node.log` for the launchers).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
from anyio.abc import Process

from mesh_mcp.errors import MeshLLMError

log = logging.getLogger("mesh_llm.mcp")

RUNTIME_FILE = "node.json"
LOG_FILE = "mcp-node.log"
AGENT_LOG_FILE = "agent-node.log"
DEFAULT_API_PORT = 9337
DEFAULT_CONSOLE_PORT = 3131
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
PROBE_TIMEOUT_S = 3.0


MCP_PATHS = frozenset({"/mcp", "/mcp/"})  # where a node's API port serves MCP (streamable HTTP)


def api_root(api_url: str) -> str:
    """`http://127.0.0.1:9337/v1/` → `http://127.0.0.1:9337` (the node reports its API with /v1)."""
    return api_url.rstrip("/").removesuffix("/v1")


@dataclass(frozen=True)
class RuntimeInfo:
    """How to reach a running node."""

    pid: int
    node_id: str
    api_url: str  # the API's root, e.g. http://127.0.0.1:9337 (a trailing /v1 is tolerated)
    console_url: str  # e.g. http://127.0.0.1:3131

    @property
    def mcp_url(self) -> str:
        """The node's MCP endpoint (streamable HTTP)."""
        return api_root(self.api_url) + "/mcp"


def runtime_path(home: Path) -> Path:
    return home / RUNTIME_FILE


def write_runtime(home: Path, info: RuntimeInfo) -> None:
    """Announce a running node: `home/node.json`, replaced atomically (readers never see half a file)."""
    home.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=home, prefix=".node.", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(asdict(info), fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, runtime_path(home))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def withdraw_on_exit(home: Path) -> None:
    """Wait until cancelled, then withdraw this node's announcement (`remove_runtime`)."""
    try:
        await anyio.sleep_forever()
    finally:
        remove_runtime(home)


def remove_runtime(home: Path, pid: int | None = None) -> None:
    """Withdraw the announcement of the node with `pid` (default: this process), if the file is its.

    A file written by another node (which took over this home since) is left alone; so is a missing one."""
    pid = os.getpid() if pid is None else pid
    path = runtime_path(home)
    info = _load(path)
    if info is not None and info.pid != pid:
        return
    if info is None and path.exists():
        return  # malformed: not knowably ours
    path.unlink(missing_ok=True)


def read_runtime(home: Path) -> RuntimeInfo | None:
    """The node `home/node.json` describes, or None: no file, a malformed one, or its process is gone."""
    info = _load(runtime_path(home))
    if info is None or not pid_alive(info.pid):
        return None
    return info


def _load(path: Path) -> RuntimeInfo | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    pid, node_id, api_url, console_url = (data.get(k) for k in ("pid", "node_id", "api_url", "console_url"))
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    if not all(isinstance(v, str) and v for v in (node_id, api_url, console_url)):
        return None
    if not all(str(u).startswith(("http://", "https://")) for u in (api_url, console_url)):
        return None
    return RuntimeInfo(pid=pid, node_id=str(node_id), api_url=str(api_url), console_url=str(console_url))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OverflowError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) is all we know


async def node_status(console_url: str, wait_s: float = PROBE_TIMEOUT_S) -> dict[str, Any] | None:
    """The node's `/api/status`, or None if nothing (sane) answers there."""
    try:
        async with httpx2.AsyncClient(timeout=wait_s) as client:
            resp = await client.get(console_url.rstrip("/") + "/api/status")
        data = resp.json() if resp.status_code == 200 else None
    except (httpx2.HTTPError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def find_running(home: Path) -> RuntimeInfo | None:
    """The node announced in `home` if it answers as itself (a recycled pid or a stale file does not)."""
    info = read_runtime(home)
    if info is None:
        return None
    status = await node_status(info.console_url)
    if status is None or status.get("node_id") != info.node_id:
        return None
    return info


async def node_on_port(api_port: int) -> str | None:
    """The id of the mesh-llm node whose API answers on 127.0.0.1:`api_port` (its `/health`), or None."""
    try:
        async with httpx2.AsyncClient(timeout=PROBE_TIMEOUT_S) as client:
            resp = await client.get(f"http://127.0.0.1:{api_port}/health")
        data = resp.json() if resp.status_code == 200 else None
    except (httpx2.HTTPError, ValueError):
        return None
    node_id = data.get("node_id") if isinstance(data, dict) else None
    return node_id if isinstance(node_id, str) and node_id else None


def _port_of(url: str) -> int | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).port
    except ValueError:
        return None


@asynccontextmanager
async def attach_or_start(
    home: Path,
    join: Sequence[str] = (),
    name: str | None = None,
    *,
    start_timeout: float = START_TIMEOUT_S,
    api_port: int | None = None,
    purpose: str = "blackboard --mcp",
) -> AsyncIterator[RuntimeInfo]:
    """The local node: the running one, or a client node started now and stopped on exit.

    With `api_port`, only a node whose API is on that port counts as running: the one announced in
    `home`, or any mesh-llm node answering there (then `pid` is 0 and `console_url` empty: it belongs to
    another home). A started node runs `python -m mesh_mcp.cli --client --blackboard` with this `home`, on
    `api_port` or the default ports when they are free (else on free ports picked now), joining the mesh
    of `join` (else the home's last mesh), logging to `home/logs/` (`mcp-node.log`, or `agent-node.log`
    when started for an agent launcher); it dies with this process even if this one is killed (Linux)."""
    running = await find_running(home)
    if running is not None and api_port is not None and _port_of(running.api_url) != api_port:
        running = None
    if running is None and api_port is not None and (node_id := await node_on_port(api_port)) is not None:
        running = RuntimeInfo(pid=0, node_id=node_id, api_url=f"http://127.0.0.1:{api_port}", console_url="")
    if running is not None:
        if join or name:
            log.warning(
                "a node already runs here (%s, pid %d): using it; --join/--name apply only to a node started now",
                running.node_id,
                running.pid,
            )
        log.info("using the running node %s (console %s)", running.node_id, running.console_url)
        yield running
        return
    async with _started_node(home, list(join), name, start_timeout, api_port, purpose) as info:
        yield info


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def node_command(join: Sequence[str], name: str | None, api_port: int, console_port: int) -> list[str]:
    """The command of a client node (wrapped so that it dies with this process on Linux)."""
    cmd = [sys.executable, "-m", "inference.pdeathsig", "--", sys.executable, "-m", "mesh_mcp.cli"]
    cmd += ["--client", "--blackboard", "--port", str(api_port), "--console-port", str(console_port)]
    for token in join:
        cmd += ["--join", token]
    if name:
        cmd += ["--name", name]
    return cmd


@asynccontextmanager
async def _started_node(
    home: Path, join: list[str], name: str | None, wait_s: float, wanted_port: int | None, purpose: str
) -> AsyncIterator[RuntimeInfo]:
    if wanted_port is not None:
        if not port_is_free(wanted_port):
            raise MeshLLMError(
                f"port {wanted_port} is taken by something that is not a mesh-llm node; pick another --port"
            )
        api_port = wanted_port
        console_port = DEFAULT_CONSOLE_PORT if port_is_free(DEFAULT_CONSOLE_PORT) else free_port()
    elif port_is_free(DEFAULT_API_PORT) and port_is_free(DEFAULT_CONSOLE_PORT):
        api_port, console_port = DEFAULT_API_PORT, DEFAULT_CONSOLE_PORT
    else:
        api_port, console_port = free_port(), free_port()
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / (LOG_FILE if purpose == "blackboard --mcp" else AGENT_LOG_FILE)
    cmd = node_command(join, name, api_port, console_port)
    env = {**os.environ, "MESH_LLM_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    log.info("no node is running here: starting a client node (log: %s)", log_path)
    with open(log_path, "ab") as out:
        shown = " ".join("***" if arg in join else arg for arg in cmd[6:])  # invite tokens are secrets
        out.write(f"\n--- started by mesh-llm {purpose}: {shown}\n".encode())
        out.flush()
        process = await anyio.open_process(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    started = False
    try:
        api_url, console_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{console_port}"
        status = await _wait_ready(process, console_url, log_path, wait_s)
        info = RuntimeInfo(
            pid=process.pid, node_id=str(status.get("node_id", "")), api_url=api_url, console_url=console_url
        )
        log.info("started node %s (pid %d, console %s)", info.node_id, info.pid, console_url)
        started = True
        yield info
    finally:
        if process.returncode is not None and started:
            log.error(
                "the node this session started exited by itself (%s); its log (%s) ends:\n%s",
                process.returncode,
                log_path,
                _tail(log_path),
            )
        with anyio.CancelScope(shield=True):
            await stop_process(process)
            log.info("stopped the node this session started (pid %d)", process.pid)


async def _wait_ready(process: Process, console_url: str, log_path: Path, wait_s: float) -> dict[str, Any]:
    """The started node's status once its console answers; a clear error if it exits or takes too long."""
    deadline = anyio.current_time() + wait_s
    while True:
        if process.returncode is not None:
            raise MeshLLMError(
                f"the mesh-llm node exited ({process.returncode}) before it was ready; "
                f"the end of its log ({log_path}):\n{_tail(log_path)}"
            )
        status = await node_status(console_url, wait_s=1.0)
        if status is not None and status.get("node_id"):
            return status
        if anyio.current_time() > deadline:
            raise MeshLLMError(
                f"the mesh-llm node did not answer on {console_url} within {wait_s:g} s; "
                f"the end of its log ({log_path}):\n{_tail(log_path)}"
            )
        await anyio.sleep(0.1)


async def stop_process(process: Process, grace: float | None = None) -> None:
    """SIGTERM, wait up to `grace` seconds (default `STOP_TIMEOUT_S`), then SIGKILL; always reaped."""
    grace = STOP_TIMEOUT_S if grace is None else grace
    if process.returncode is None:
        try:
            process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        with anyio.move_on_after(grace):
            await process.wait()
    if process.returncode is None:
        log.warning("the node (pid %d) ignored SIGTERM for %g s: killing it", process.pid, grace)
        try:
            process.kill()
        except ProcessLookupError:
            pass
    await process.wait()
    await process.aclose()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])

"""Real mesh-llm node processes for integration tests (reused by every multi-node test).

`NodeProcess` starts `python -m mesh_mcp.cli ...` with its own home directory and ports, captures
its log to a file, waits (bounded) for states through the console's /api/status, and always cleans
up: the node's process group is terminated and reaped, and its llama-server children die with it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

_HANDED_OUT: set[int] = set()  # ports given to tests in this process: never handed out twice


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now and not handed out before in this process. The kernel may give the same ephemeral port to
    two binds in a row once the first socket closed (a node got --port and --console-port equal: it could not
    start), so remembering what was handed out is what makes two calls differ."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port that was not handed out already")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class NodeProcess:
    home: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    api_port: int = field(default_factory=free_port)
    console_port: int = field(default_factory=free_port)
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", "ns1"]: run it in a namespace
    proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def console(self) -> str:
        return f"http://{self.host}:{self.console_port}"

    @property
    def log_path(self) -> Path:
        return self.home / "node.log"

    def start(self) -> NodeProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MESH_LLM_HOME": str(self.home), "PYTHONUNBUFFERED": "1", **self.env}
        cmd = [*self.prefix, sys.executable, "-m", "mesh_mcp.cli", "--port", str(self.api_port)]
        cmd += ["--console-port", str(self.console_port), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 5) -> re.Match[str]:
        """Wait until the node's log matches `pattern` (logs trail state changes by up to a tick)."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log())
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matching {pattern!r} in {timeout} s\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def dataplane_bytes(self) -> float:
        """Everything this node moved on the data plane, in and out, with every peer (from its /metrics)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx2.get(self.console + "/metrics", timeout=10).text
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "mesh_llm_peer_traffic_bytes_total" and s.labels.get("plane") == "dataplane"
        )

    def status(self) -> dict[str, Any]:
        return httpx2.get(self.console + "/api/status", timeout=5).json()  # type: ignore[no-any-return]

    def wait_for(self, what: str, check: Callable[[dict[str, Any]], bool], timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited ({self.proc.returncode}) waiting for {what}\n{self.log()[-4000:]}")
            try:
                last = self.status()
                if check(last):
                    return last
            except httpx2.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last status {last}\n{self.log()[-4000:]}")

    def model(self, status: dict[str, Any], name: str) -> dict[str, Any] | None:
        return next((m for m in status["models"] if m["name"] == name), None)

    def wait_model_state(self, name: str, state: str, timeout: float = 300) -> dict[str, Any]:
        status = self.wait_for(
            f"{name} {state}", lambda s: (m := self.model(s, name)) is not None and m["state"] == state, timeout
        )
        model = self.model(status, name)
        assert model is not None
        return model

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Terminate the node's whole process group (node + llama-servers) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


def post_served(url: str, body: dict[str, Any], wait: float = 30) -> httpx2.Response:
    """POST, retrying while the model answers 503 (another node's state arrives by gossip within a round or two)."""
    deadline = time.monotonic() + wait
    while True:
        r = httpx2.post(url, json=body, timeout=120)
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


@contextmanager
def serving_node(home: Path, model: str, models_dir: Path, *args: str) -> Iterator[NodeProcess]:
    """A node serving `model` from `models_dir` (`--ctx-size 2048`), once it serves; stopped after."""
    node = NodeProcess(
        home=home, args=["--model", model, "--ctx-size", "2048", *args], env={"MESH_LLM_MODELS": str(models_dir)}
    )
    node.start()
    try:
        node.wait_model_state(model, "serving", timeout=180)
        yield node
    finally:
        node.stop()

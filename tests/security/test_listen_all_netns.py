"""`--listen-all` as another machine sees it (issue 12 item 1): a client in its own network namespace,
joined to this one by a veth pair, probes a node that listens on all interfaces with an API key.

The namespace and the veth pair get names unique to the test and are removed afterwards; the tests skip,
saying why, where namespaces cannot be made (not root, no iproute2, no CAP_NET_ADMIN). Nothing is installed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.harness import NodeProcess, free_port

KEY = "netns-test-key-4f9c2a"


@dataclass(frozen=True)
class Netns:
    name: str
    host_ip: str  # this (root) namespace's end of the veth pair: where the node is reached
    peer_ip: str  # the namespace's end: the "other machine"

    def run(self, script: str, timeout: float = 60) -> dict[str, Any]:
        """Run a Python script inside the namespace; it prints one JSON object."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def netns() -> Iterator[Netns]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed: network namespaces cannot be made here")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_NET_ADMIN); run the security suite as root")
    tag = f"{os.getpid() % 10000}{random.randrange(100):02d}"
    name, host_if, peer_if = f"mlt{tag}", f"mlh{tag}", f"mlp{tag}"
    used = _ip("-o", "-4", "addr").stdout
    for _ in range(50):
        a, b = random.randrange(200, 255), random.randrange(0, 64) * 4
        host_ip, peer_ip = f"10.{a}.{b}.1", f"10.{a}.{b}.2"
        if f" 10.{a}.{b}." not in used:
            break
    added = _ip("netns", "add", name)
    if added.returncode != 0:
        pytest.skip(f"`ip netns add` failed ({added.stderr.strip()}): network namespaces are not possible here")
    try:
        for cmd in (
            ["link", "add", host_if, "type", "veth", "peer", "name", peer_if],
            ["link", "set", peer_if, "netns", name],
            ["addr", "add", f"{host_ip}/30", "dev", host_if],
            ["link", "set", host_if, "up"],
            ["netns", "exec", name, "ip", "addr", "add", f"{peer_ip}/30", "dev", peer_if],
            ["netns", "exec", name, "ip", "link", "set", peer_if, "up"],
            ["netns", "exec", name, "ip", "link", "set", "lo", "up"],
        ):
            done = _ip(*cmd)
            assert done.returncode == 0, f"ip {' '.join(cmd)}: {done.stderr}"
        yield Netns(name, host_ip, peer_ip)
    finally:
        _ip("link", "del", host_if)  # removes both ends
        _ip("netns", "del", name)


PROBE = textwrap.dedent(
    """
    import json, sys, urllib.request, urllib.error
    HOST, API, CONSOLE, KEY = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    out = {}

    def ask(name, port, path, method="GET", body=None, headers=None, stream=False):
        url = f"http://{HOST}:{port}{path}"
        data = None if body is None else json.dumps(body).encode()
        h = {"content-type": "application/json"} if body is not None else {}
        req = urllib.request.Request(url, data=data, method=method, headers={**h, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=40) as resp:
                if stream:  # the first event of an SSE stream
                    text = ""
                    while not text.startswith("data:"):
                        text = resp.readline().decode()
                else:
                    text = resp.read().decode()
                out[name] = [resp.status, text]
        except urllib.error.HTTPError as err:
            out[name] = [err.code, err.read().decode()]

    bearer, xkey = {"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}
    mcp = {"accept": "application/json, text/event-stream"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
            "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}}}
    ask("status", CONSOLE, "/api/status")
    ask("events", CONSOLE, "/api/events", stream=True)
    ask("models", API, "/v1/models")
    ask("models_bearer", API, "/v1/models", headers=bearer)
    ask("models_xkey", API, "/v1/models", headers=xkey)
    ask("models_wrong", API, "/v1/models", headers={"authorization": "Bearer not-the-key"})
    ask("messages", API, "/v1/messages", "POST", {"model": "m", "max_tokens": 5, "messages": []})
    ask("health", API, "/health")
    ask("mcp", API, "/mcp", "POST", init, mcp)
    ask("mcp_key", API, "/mcp", "POST", init, {**mcp, **bearer})
    ask("post", CONSOLE, "/api/blackboard", "POST", {"text": "from the namespace, no key"})
    ask("post_key", CONSOLE, "/api/blackboard", "POST", {"text": "FINDING: from the namespace with a key"}, bearer)
    ask("feed", CONSOLE, "/api/blackboard")
    ask("rotate", CONSOLE, "/api/rotate-key", "POST", {}, bearer)
    ask("drop", CONSOLE, "/api/drop", "POST", {"model": "x"}, bearer)
    print(json.dumps(out))
    """
)


def test_listen_all_from_another_machine(netns: Netns, tmp_path: Path) -> None:
    node = NodeProcess(home=tmp_path / "node", args=["--client", "--listen-all", "--api-key", KEY]).start()
    try:
        node.wait_for("the blackboard", lambda s: (s.get("blackboard") or {}).get("state") == "ready", timeout=120)
        token = node.status()["invite_token"]  # this machine (loopback) sees it
        assert token and token.startswith("mesh1")
        assert KEY not in node.log()  # keys are never logged
        assert "API key" in node.log()
        # This machine needs no key, even on --listen-all (mesh-llm's own CLI, launchers and MCP attach).
        assert httpx2.get(node.api + "/v1/models", timeout=10).status_code == 200

        args = [netns.host_ip, str(node.api_port), str(node.console_port), KEY]
        got = netns.run(PROBE.replace("sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]", repr(tuple(args))[1:-1]))

        def status(name: str) -> int:
            return int(got[name][0])

        def body(name: str) -> Any:
            return json.loads(got[name][1])

        assert status("status") == 200 and "invite_token" not in body("status")
        assert "token" not in body("status") and node.status()["token"] == token  # the reference's name (issue 19)
        assert token not in got["status"][1] and token not in got["events"][1]
        assert status("models") == 401
        assert body("models")["error"]["code"] == "invalid_api_key" and "Bearer" in body("models")["error"]["message"]
        assert status("models_bearer") == 200 and body("models_bearer")["object"] == "list"
        assert status("models_xkey") == 200
        assert status("models_wrong") == 401
        assert status("messages") == 401 and body("messages")["error"]["type"] == "authentication_error"
        assert status("health") == 200
        assert status("mcp") == 401
        assert status("mcp_key") == 200, got["mcp_key"]  # the remote Host is fine once the key is
        assert status("post") == 401
        assert status("post_key") == 201, got["post_key"]
        assert status("feed") == 401  # the blackboard is read with a key too
        assert status("rotate") == 403 and status("drop") == 403  # node controls: this machine only
        assert node.status()["invite_token"] == token
        assert KEY not in node.log()
    finally:
        node.stop()


def test_no_auth_is_explicit_and_logged(netns: Netns, tmp_path: Path) -> None:
    node = NodeProcess(home=tmp_path / "open", args=["--listen-all", "--no-auth"]).start()
    try:
        node.wait_for("the console", lambda s: bool(s.get("node_id")), timeout=60)
        node.wait_log(r"--no-auth: anyone who can reach this machine", timeout=10)
        script = (
            "import json, urllib.request\n"
            f"r = urllib.request.urlopen('http://{netns.host_ip}:{node.api_port}/v1/models', timeout=20)\n"
            "print(json.dumps({'status': r.status}))\n"
        )
        assert netns.run(script)["status"] == 200
    finally:
        node.stop()


def test_listen_all_without_keys_refuses_to_start(tmp_path: Path) -> None:
    env = {**os.environ, "MESH_LLM_HOME": str(tmp_path)}
    env.pop("MESH_LLM_API_KEYS", None)
    cmd = [sys.executable, "-m", "mesh_mcp.cli", "--listen-all", "--port", str(free_port())]
    cmd += ["--console-port", str(free_port())]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--listen-all lets other machines use this node, so it needs API keys" in done.stderr
    assert "--api-key" in done.stderr and "--no-auth" in done.stderr
    # A keys file that holds none is refused too, with the file named.
    (tmp_path / "keys").write_text("# to do\n")
    env["MESH_LLM_API_KEYS"] = str(tmp_path / "keys")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "holds no key" in done.stderr, done.stderr

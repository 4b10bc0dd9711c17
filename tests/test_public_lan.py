"""Issue 15's "done when", on the LAN alone: three machines — three network namespaces on one bridge, no relay
reachable — each run the same `mesh-llm --auto --mesh-name lan --model SmolLM2`, and end in one mesh that serves
the model through every node's API; `mesh-llm discover` on a fourth host of the LAN (the root namespace, on the
bridge) shows that mesh. Needs root and `ip netns` (skipped otherwise, saying why).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import SMOLLM
from tests.harness import NodeProcess

pytestmark = pytest.mark.slow

SUBNET = "10.213.7"
DEAD_RELAY = "ws://127.0.0.1:9"
CHAT: dict[str, Any] = {"model": SMOLLM, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def lan() -> Iterator[list[str]]:
    """Three namespaces on one bridge (10.213.7.1-3), the root namespace on it too (.254); torn down after."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (`ip netns`) to make three hosts on one LAN")
    tag = secrets.token_hex(2)
    bridge, names = f"mlbr{tag}", [f"mlns{tag}{i}" for i in range(1, 4)]
    try:
        _ip("link", "add", bridge, "type", "bridge")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a bridge here: {exc.stderr.decode().strip()}")
    try:
        _ip("addr", "add", f"{SUBNET}.254/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, ns in enumerate(names, start=1):
            _ip("netns", "add", ns)
            _ip("link", "add", f"mlv{tag}{i}", "type", "veth", "peer", "name", f"mlp{tag}{i}")
            _ip("link", "set", f"mlp{tag}{i}", "netns", ns)
            _ip("link", "set", f"mlv{tag}{i}", "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", f"mlp{tag}{i}")
            _ip("-n", ns, "link", "set", f"mlp{tag}{i}", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)


def test_three_hosts_with_only_the_lan_form_one_mesh_and_discover_shows_it(
    lan: list[str], tmp_path: Path, test_models_dir: Path, smollm: object
) -> None:
    nodes = []
    try:
        for i, ns in enumerate(lan, start=1):
            host = f"{SUBNET}.{i}"
            args = ["--mesh-host", host, "--listen-all", "--no-auth", "--auto", "--mesh-name", "lan"]
            args += ["--model", SMOLLM, "--nostr-relay", DEAD_RELAY]
            node = NodeProcess(tmp_path / f"h{i}", args, env={"MESH_LLM_MODELS": str(test_models_dir)}, host=host,
                               prefix=["ip", "netns", "exec", ns])  # fmt: skip
            nodes.append(node.start())

        def one_mesh() -> str | None:
            try:
                statuses = [n.status() for n in nodes]
            except httpx2.TransportError:  # a node that lost the name race restarts: its API is down a moment
                return None
            ids = {s.get("mesh_id") for s in statuses}
            return (
                ids.pop() if len(ids) == 1 and None not in ids and {len(s["peers"]) for s in statuses} == {3} else None
            )

        deadline, mesh = time.monotonic() + 300, None
        while mesh is None and time.monotonic() < deadline:
            mesh = one_mesh()
            time.sleep(0.5)
        assert mesh is not None, "\n\n".join(n.log()[-2500:] for n in nodes)
        for n in nodes:
            n.wait_model_state(SMOLLM, "serving", timeout=300)
            r = httpx2.post(n.api + "/v1/chat/completions", json=CHAT, timeout=120)
            assert r.status_code == 200, r.text

        env = {**os.environ, "MESH_LLM_HOME": str(tmp_path / "discover")}
        out = subprocess.run(
            [sys.executable, "-m", "mesh_mcp.cli", "discover", "--json", "--nostr-relay", DEAD_RELAY],
            capture_output=True, text=True, timeout=120, env=env, check=True,
        )  # fmt: skip
        found = {row["mesh_id"]: row for row in json.loads(out.stdout)}
        assert mesh in found, out.stdout
        assert found[mesh]["name"] == "lan" and found[mesh]["served"] == [SMOLLM] and found[mesh]["via"] == ["lan"]
        assert found[mesh]["latency_ms"] is not None  # probed across the bridge
    finally:
        for n in nodes:
            n.stop()

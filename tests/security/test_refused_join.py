"""A refused join says why in words a user can act on, stops after a few tries with a non-zero exit, prints no
invite token of its own and leaves the node's existing mesh.toml as it was (real node processes)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mesh_mcp.mesh import meshfile, tokens
from tests.harness import NodeProcess, free_port

pytestmark = pytest.mark.slow
Spawn = Callable[..., NodeProcess]
JOIN_WAIT_S = 90  # start-up (imports) + 3 refused tries; generous for a loaded 2-core machine


def start(spawn: Spawn, name: str, ip: str, *args: str) -> NodeProcess:
    return spawn("--mesh-host", ip, "--client", *args, name=name)


def token_of(node: NodeProcess) -> str:
    return str(node.wait_for("invite token", lambda s: bool(s.get("invite_token")), 60)["invite_token"])


def join(home: Path, ip: str, token: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`mesh-llm --client --join TOKEN` as a user runs it: its exit status, stdout and stderr apart."""
    env = {**os.environ, "MESH_LLM_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mesh_mcp.cli", "--port", str(free_port()), "--console-port", str(free_port())]
    cmd += ["--mesh-host", ip, "--client", "--join", token]
    t0 = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=JOIN_WAIT_S, stdin=subprocess.DEVNULL)
    return out, time.monotonic() - t0


@pytest.fixture
def owner(spawn: Spawn) -> NodeProcess:
    return start(spawn, "owner", "127.0.0.2")


@pytest.fixture
def own_mesh(tmp_path: Path) -> Path:
    """A home whose node created a mesh of its own before (its mesh.toml must survive a refused join)."""
    home = tmp_path / "joiner"
    meshfile.save(home, meshfile.create(owner=b"\x07" * 32))
    return home


def refused_join(home: Path, token: str) -> str:
    before = (home / "mesh.toml").read_bytes()
    out, took = join(home, "127.0.0.7", token)
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "mesh1" not in out.stdout, "a refused node prints no invite token of its own"
    assert (home / "mesh.toml").read_bytes() == before, "a refused join leaves mesh.toml as it was"
    assert took < JOIN_WAIT_S
    print(f"refused join exited after {took:.1f} s")
    lines = [line for line in out.stderr.splitlines() if line.startswith("mesh-llm: ")]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_a_token_from_before_a_rotation_says_so_and_stops(owner: NodeProcess, own_mesh: Path) -> None:
    old = token_of(owner)
    rotated = subprocess.run(
        [sys.executable, "-m", "mesh_mcp.cli", "rotate-key", "--console-port", str(owner.console_port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rotated.returncode == 0, rotated.stderr
    said = refused_join(own_mesh, old)
    assert "from before a key rotation (this mesh is now at epoch 2)" in said and "new invite token" in said
    assert owner.proc is not None and owner.proc.poll() is None


def test_a_token_of_another_mesh_says_so(owner: NodeProcess, own_mesh: Path) -> None:
    real = tokens.decode(token_of(owner))
    foreign = tokens.encode(dataclasses.replace(real, mesh_id=b"\x42" * 16))
    said = refused_join(own_mesh, foreign)
    assert "invite token is for another mesh" in said and "epoch" not in said


def test_a_wrong_secret_says_so(owner: NodeProcess, own_mesh: Path) -> None:
    real = tokens.decode(token_of(owner))
    forged = tokens.encode(dataclasses.replace(real, secret=b"\x01" * 32))
    said = refused_join(own_mesh, forged)
    assert "wrong secret" in said and "epoch" not in said
    owner.wait_log("refused|refusing", timeout=30)  # and the owner logged the attempt

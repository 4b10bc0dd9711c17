"""`mesh-llm blackboard` without a node: installing the skill, and a clear error when no node runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.harness import free_port


def blackboard(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(tmp_path), "MESH_LLM_HOME": str(tmp_path / "mesh")}
    return subprocess.run(
        [sys.executable, "-m", "mesh_mcp.cli", "blackboard", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_install_skill_writes_each_agents_copy_once(tmp_path: Path) -> None:
    r = blackboard(tmp_path, "install-skill")
    assert r.returncode == 0, r.stderr
    for where in (".claude/skills", ".config/goose/skills", ".pi/agent/skills"):
        assert (tmp_path / where / "mesh-blackboard" / "SKILL.md").is_file()
        assert f"installed  ~/{where}/mesh-blackboard/SKILL.md" in r.stdout
    again = blackboard(tmp_path, "install-skill")
    assert again.returncode == 0 and again.stdout.count("unchanged") == 3


def test_no_node_running_says_how_to_start_one(tmp_path: Path) -> None:
    port = str(free_port())
    for args in (("STATUS: hello",), ("--search", "x"), ()):
        r = blackboard(tmp_path, *args, "--console-port", port)
        assert r.returncode == 1 and "mesh-llm --client --blackboard" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    r = blackboard(tmp_path, "text", "--search", "both")
    assert r.returncode == 2 and "not both" in r.stderr

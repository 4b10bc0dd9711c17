"""The `mesh-blackboard` skill: its content, and installing it for Claude Code, Goose and pi.

Installs go into a temporary HOME. Covered: first install, idempotence (a second run changes nothing, not even
mtimes), updating a stale copy, the front matter (Agent Skills rules, name = directory), every MCP tool and CLI
form mentioned, and the skill shipping in the wheel and loading from the installed package.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from blackboard.skill import (
    AGENTS,
    SKILL_NAME,
    InstallResult,
    format_results,
    install_skill,
    skill_bytes,
    skill_path,
)

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "skills" / SKILL_NAME / "SKILL.md"
EXPECTED = {
    "claude-code": Path(".claude/skills/mesh-blackboard/SKILL.md"),
    "goose": Path(".config/goose/skills/mesh-blackboard/SKILL.md"),
    "pi": Path(".pi/agent/skills/mesh-blackboard/SKILL.md"),
}
TOOLS = ("blackboard_post", "blackboard_search", "blackboard_feed", "mesh_models", "mesh_status", "mesh_ask")
OLD = 1_000_000_000  # an mtime (2001) that a rewrite would change


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert Path.home() == home
    return home


def front_matter(text: str) -> tuple[dict[str, Any], str]:
    m = re.match(r"---\n(.*?)\n---\n(.*)", text, re.DOTALL)
    assert m, "SKILL.md starts with YAML front matter between --- lines"
    meta = yaml.safe_load(m.group(1))
    assert isinstance(meta, dict)
    return meta, m.group(2)


def snapshot(home: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(home)): (p.read_bytes(), p.stat().st_mtime_ns) for p in home.rglob("*") if p.is_file()}


# --- the skill itself ---


def test_packaged_skill_is_the_source_file() -> None:
    assert skill_bytes() == SOURCE.read_bytes()


def test_front_matter_follows_agent_skills_rules() -> None:
    text = SOURCE.read_text(encoding="utf-8")
    meta, body = front_matter(text)
    assert set(meta) == {"name", "description"}
    assert meta["name"] == SOURCE.parent.name == SKILL_NAME
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", meta["name"]) and len(meta["name"]) <= 64
    assert isinstance(meta["description"], str) and 0 < len(meta["description"]) <= 1024
    # pi's first parser read only single-line `key: value` pairs
    raw = text.split("\n---\n", 1)[0].removeprefix("---\n")
    assert raw.splitlines() == [f"name: {meta['name']}", f"description: {meta['description']}"]
    assert body.strip()
    assert len(text.splitlines()) < 500  # goose: keep a skill under 500 lines


def test_skill_mentions_every_tool_and_cli_form() -> None:
    text = SOURCE.read_text(encoding="utf-8")
    for tool in TOOLS:
        assert f"`{tool}`" in text, tool
    for arg in ("reply_to", "query", "author", "kind", "since_hours", "limit", "model", "question"):
        assert arg in text, arg
    for kind in ("STATUS:", "FINDING:", "QUESTION:", "ANSWER:"):
        assert kind in text, kind
    assert "STATUS: [org/repo branch:x]" in text
    for cli in ('mesh-llm blackboard "', "mesh-llm blackboard --search", "--from", "--since", "--mcp"):
        assert cli in text, cli
    assert re.search(r"^mesh-llm blackboard\s+#", text, re.MULTILINE), "the bare command shows the feed"
    for rule in ("4 KiB", "48 hours", "secrets", "personal data"):
        assert rule in text, rule


# --- installing ---


def test_install_into_every_agent(home: Path) -> None:
    results = install_skill()
    assert [r.agent for r in results] == list(AGENTS) == list(EXPECTED)
    for r in results:
        assert r.action == "installed"
        assert r.path == home / EXPECTED[r.agent] == skill_path(r.agent)
        assert r.path.read_bytes() == SOURCE.read_bytes()
    assert format_results(results).splitlines() == [f"installed  ~/{EXPECTED[a]}" for a in AGENTS]
    assert {str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()} == {str(p) for p in EXPECTED.values()}


def test_second_run_changes_nothing(home: Path) -> None:
    for path in (r.path for r in install_skill()):
        os.utime(path, ns=(OLD * 10**9, OLD * 10**9))
    before = snapshot(home)
    results = install_skill()
    assert [r.action for r in results] == ["unchanged"] * len(AGENTS)
    assert snapshot(home) == before  # same files, same bytes, same mtimes: nothing rewritten, no temp files
    assert format_results(results).splitlines()[0] == "unchanged  ~/.claude/skills/mesh-blackboard/SKILL.md"


def test_stale_copy_is_updated(home: Path) -> None:
    stale = home / EXPECTED["goose"]
    stale.parent.mkdir(parents=True)
    stale.write_text("---\nname: mesh-blackboard\ndescription: an older version\n---\nold\n", encoding="utf-8")
    results = {r.agent: r.action for r in install_skill()}
    assert results == {"claude-code": "installed", "goose": "updated", "pi": "installed"}
    assert stale.read_bytes() == SOURCE.read_bytes()
    assert not [p for p in stale.parent.iterdir() if p.name != "SKILL.md"], "no temp file left behind"
    assert {r.action for r in install_skill()} == {"unchanged"}


def test_targets_and_explicit_home(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    results = install_skill(home=other, targets=["pi", "claude-code", "pi"])
    assert [(r.agent, r.action) for r in results] == [("pi", "installed"), ("claude-code", "installed")]
    assert [r.path for r in results] == [other / EXPECTED["pi"], other / EXPECTED["claude-code"]]
    assert not any(home.iterdir()), "an explicit home keeps $HOME untouched"
    assert format_results(results, home=other).splitlines() == [
        "installed  ~/.pi/agent/skills/mesh-blackboard/SKILL.md",
        "installed  ~/.claude/skills/mesh-blackboard/SKILL.md",
    ]
    # outside the home the path is written in full
    assert format_results(results) == "\n".join(f"installed  {r.path}" for r in results)
    assert format_results([]) == ""


def test_unknown_target_writes_nothing(home: Path) -> None:
    with pytest.raises(ValueError, match="cursor"):
        install_skill(targets=["claude-code", "cursor"])
    assert not any(home.iterdir())


def test_result_is_plain_data(home: Path) -> None:
    (r,) = install_skill(targets=["goose"])
    assert r == InstallResult("goose", home / EXPECTED["goose"], "installed")


# --- packaging ---


def test_pyproject_ships_the_skill() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert "mesh_skills" in setuptools["packages"]
    assert setuptools["package-dir"]["mesh_skills"] == "skills"
    assert "*/SKILL.md" in setuptools["package-data"]["mesh_skills"]


def test_wheel_ships_the_skill_and_it_loads_from_there(tmp_path: Path) -> None:
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)], check=True, timeout=300, capture_output=True
    )
    (wheel,) = wheels.glob("mesh_llm-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-compile", "-q", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    assert (target / "mesh_skills" / SKILL_NAME / "SKILL.md").read_bytes() == SOURCE.read_bytes()
    # -I -S: no site-packages, no editable install, no source tree; only the installed wheel
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import blackboard.skill as s; assert s.__file__.startswith(sys.argv[1]), s.__file__; "
        "sys.stdout.buffer.write(s.skill_bytes())"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe, str(target)], check=True, timeout=60, capture_output=True
    )
    assert out.stdout == SOURCE.read_bytes()

"""Install the `mesh-blackboard` agent skill where coding agents look for their user-level skills.

The skill is `skills/mesh-blackboard/SKILL.md` (Agent Skills format: YAML front matter with `name` and
`description`, then instructions). It ships in the wheel as package data of `mesh_skills` (pyproject maps that
package to the `skills/` directory) and is read with `importlib.resources`. `install_skill` copies it into each
agent's skills directory under the home directory (`Path.home()`, so `$HOME`), and `format_results` describes
what it did; `mesh-llm blackboard install-skill` prints that.

Where each agent looks for user-level skills (`~` is the home directory):

- Claude Code: `~/.claude/skills/<name>/SKILL.md`. Source: Claude Code docs, "Extend Claude with skills"
  (https://code.claude.com/docs/en/skills): personal skills, available in all projects, are
  `~/.claude/skills/<skill-name>/SKILL.md`.
- Goose: `~/.config/goose/skills/<name>/SKILL.md`. Source: goose `crates/goose/src/skills/mod.rs`
  (`all_skill_dirs`): global skills come from `~/.agents/skills`, `Paths::config_dir()/skills` (goose's config
  directory, `~/.config/goose` on Linux and macOS, as in the docs' `~/.config/goose/config.yaml`),
  `~/.claude/skills` and `~/.config/agents/skills`; a name found twice keeps its first copy, silently. The goose
  guide "Using Skills" (https://block.github.io/goose/docs/guides/context-engineering/using-skills) lists the
  same directories.
- pi (`@mariozechner/pi-coding-agent`): `~/.pi/agent/skills/<name>/SKILL.md`. Source: pi-mono
  `packages/coding-agent/docs/skills.md` ("Locations": global `~/.pi/agent/skills/`, and in recent versions
  `~/.agents/skills/`) and `src/core/skills.ts` (`join(getAgentDir(), "skills")`, subdirectories searched for
  `SKILL.md`).

Each agent gets a directory that, of the three, only it reads, except that goose also reads Claude Code's. The
shared `~/.agents/skills` is avoided on purpose: recent pi reads it as well as `~/.pi/agent/skills` and reports a
name collision when it finds a skill twice (goose does not). Only the home directory decides the paths:
`XDG_CONFIG_HOME`, `GOOSE_PATH_ROOT`, `PI_CODING_AGENT_DIR` and Windows' `%APPDATA%` are not consulted, so
installing never writes outside the home directory. Where such an override moves goose's directory, goose
still finds the skill through `~/.claude/skills`.

Idempotent: a copy identical to the packaged skill is left alone ("unchanged", not rewritten, mtime kept), a
different one is replaced ("updated"), a missing one is written ("installed"). Writes go through a temporary
file in the same directory and `os.replace`, so an agent never reads a half-written skill.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

SKILL_NAME = "mesh-blackboard"
SKILL_FILE = "SKILL.md"
PACKAGE = "mesh_skills"  # the installed name of the top-level `skills/` directory

# agent → (display name, its user-level skills directory relative to the home directory)
AGENTS: dict[str, tuple[str, Path]] = {
    "claude-code": ("Claude Code", Path(".claude", "skills")),
    "goose": ("Goose", Path(".config", "goose", "skills")),
    "pi": ("pi", Path(".pi", "agent", "skills")),
}

Action = Literal["installed", "updated", "unchanged"]


@dataclass(frozen=True)
class InstallResult:
    agent: str  # a key of AGENTS
    path: Path  # the SKILL.md written, or found up to date
    action: Action


def skill_bytes() -> bytes:
    """The packaged SKILL.md, byte for byte."""
    try:
        root = resources.files(PACKAGE)
    except ModuleNotFoundError:
        # A development checkout whose editable install predates the `mesh_skills` package: the source tree.
        return (Path(__file__).resolve().parent.parent / "skills" / SKILL_NAME / SKILL_FILE).read_bytes()
    return root.joinpath(SKILL_NAME, SKILL_FILE).read_bytes()


def skill_path(agent: str, home: Path | None = None) -> Path:
    """Where `agent` (a key of AGENTS) finds the skill."""
    if agent not in AGENTS:
        raise ValueError(f"unknown agent {agent!r}; known: {', '.join(AGENTS)}")
    return (Path.home() if home is None else home) / AGENTS[agent][1] / SKILL_NAME / SKILL_FILE


def install_skill(home: Path | None = None, targets: Iterable[str] | None = None) -> list[InstallResult]:
    """Install the skill for each agent in `targets` (default: all of AGENTS, in that order) under `home`
    (default: `Path.home()`). Unknown agent names raise `ValueError` before anything is written; file system
    errors (`OSError`) propagate.
    """
    agents = list(dict.fromkeys(AGENTS if targets is None else targets))
    paths = [(agent, skill_path(agent, home)) for agent in agents]  # validates every name first
    data = skill_bytes()
    return [InstallResult(agent, path, _write_if_changed(path, data)) for agent, path in paths]


def format_results(results: Iterable[InstallResult], home: Path | None = None) -> str:
    """One line per result, e.g. `installed  ~/.claude/skills/mesh-blackboard/SKILL.md`; paths under `home`
    (default: `Path.home()`) are written with `~`.
    """
    home = Path.home() if home is None else home
    return "\n".join(f"{r.action:<9}  {_tilde(r.path, home)}" for r in results)


def _write_if_changed(path: Path, data: bytes) -> Action:
    try:
        current: bytes | None = path.read_bytes()
    except FileNotFoundError:
        current = None
    if current == data:
        return "unchanged"
    path.parent.mkdir(parents=True, exist_ok=True)
    # A dot name: pi skips dot entries and goose only reads files named SKILL.md.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return "installed" if current is None else "updated"


def _tilde(path: Path, home: Path) -> str:
    try:
        return str(Path("~") / path.relative_to(home))
    except ValueError:
        return str(path)

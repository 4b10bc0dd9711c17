"""Where mesh-llm keeps things on disk, each overridable by environment.

- home (`MESH_LLM_HOME`, default `~/.mesh-llm`): node key, logs, runtime state.
- models (`MESH_LLM_MODELS`, default `~/.models`): GGUF files.
- cache (`MESH_LLM_CACHE`, default `$XDG_CACHE_HOME/mesh-llm` or `~/.cache/mesh-llm`): llama.cpp
  builds and downloaded packages; safe to delete.
"""

from __future__ import annotations

import os
from pathlib import Path


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else default


def home_dir() -> Path:
    return _env_path("MESH_LLM_HOME", Path.home() / ".mesh-llm")


def models_dir() -> Path:
    return _env_path("MESH_LLM_MODELS", Path.home() / ".models")


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return _env_path("MESH_LLM_CACHE", base / "mesh-llm")


def logs_dir() -> Path:
    return home_dir() / "logs"

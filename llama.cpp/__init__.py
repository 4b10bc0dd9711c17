"""The pinned llama.cpp source and its CMake flags (installed as the package `mesh_llamacpp`).

`pin.toml` beside this file is the one place that says which llama.cpp mesh-llm builds and how.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class SourceEdit:
    """A literal edit of the pinned source, applied after unpacking; `find` must occur exactly once."""

    file: str  # relative to the llama.cpp tree
    find: str
    replace: str
    why: str
    rpc: bool = True  # it changes what crosses the RPC wire: part of the build identity nodes of a split share


@dataclass(frozen=True)
class Pin:
    package: str
    version: str
    url: str
    sha256: str
    size: int
    subdir: str
    common_flags: tuple[str, ...]
    targets: tuple[str, ...]
    backend_flags: dict[str, tuple[str, ...]]
    edits: tuple[SourceEdit, ...] = ()
    rpc_hash_threshold: int = 10 * 1024 * 1024  # what our build's RPC client sends by hash (> this many bytes)


def load_pin() -> Pin:
    raw = tomllib.loads(resources.files(__name__).joinpath("pin.toml").read_text(encoding="utf-8"))
    src, cm = raw["source"], raw["cmake"]
    return Pin(
        package=src["package"],
        version=src["version"],
        url=src["url"],
        sha256=src["sha256"],
        size=int(src["size"]),
        subdir=src["subdir"],
        common_flags=tuple(cm["common"]),
        targets=tuple(cm["targets"]),
        backend_flags={name: tuple(b["flags"]) for name, b in raw["backends"].items()},
        edits=tuple(
            SourceEdit(e["file"], e["find"], e["replace"], e["why"], bool(e.get("rpc", True)))
            for e in raw.get("edits", [])
        ),
        rpc_hash_threshold=int(raw.get("rpc", {}).get("hash_threshold", 10 * 1024 * 1024)),
    )

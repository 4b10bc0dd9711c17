"""What every runner of one model is given: the model (file, alias, GGUF facts, llama-server settings), this node's
llama.cpp build, capacity and threads, where to report state, and the clock — `ModelRun`; `MeshRun` adds the mesh
for the modes that serve over several nodes. Each serving mode is a subclass with an `async run()` that serves until
cancelled (see `serving/runners.py`), or raises `ShardingRefused` when its mode cannot serve the model well."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from inference.gguf_facts import GGUFFacts
from inference.llama_server import ServerSettings
from inference.llamacpp import LlamaCpp
from inference.speculation import Speculation
from mesh_mcp.clock import SYSTEM_CLOCK, Clock
from mesh_mcp.errors import MeshLLMError
from mesh_mcp.mesh.runtime import Mesh

T = TypeVar("T", bound="ModelRun")


@dataclass
class ModelRun:
    """One model served by this node, whatever the way."""

    llama: LlamaCpp
    home: Path
    model_path: Path
    alias: str
    facts: GGUFFacts
    settings: ServerSettings
    capacity_bytes: int
    threads: int | None = None
    speculation: tuple[Speculation, ...] = ()  # the candidates (inference/speculation.py); () serves without
    on_state: Callable[..., object] = lambda **changes: None  # NodeState.update_model for this model
    clock: Clock = SYSTEM_CLOCK

    @classmethod
    def of(cls: type[T], run: ModelRun, **extra: Any) -> T:
        """This kind of run of `run`'s model (the fields both kinds have), with its own settings `extra`."""
        mine = {f.name for f in fields(cls)} - extra.keys()
        return cls(**{f.name: getattr(run, f.name) for f in fields(run) if f.name in mine}, **extra)


@dataclass
class MeshRun(ModelRun):
    """A model served over several nodes of the mesh."""

    mesh: Mesh = field(kw_only=True)


class ShardingRefused(MeshLLMError):
    """Expert shards cannot serve this model well (the gate refused a shard, or the trunk fits no node): serve it
    as a pipeline split instead (the supervisor decides again with this reason)."""


def safe_name(name: str) -> str:
    """A model name as a file name (logs)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)

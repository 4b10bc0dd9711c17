"""The node's own state as the API and console see it: models and their lifecycle, plus a
broadcast of every change (the console's `/api/events`).

Model states: downloading → loading → serving, or failed (with why); stopped after a drop.
Changes go through `update_model`, which publishes a snapshot to every subscriber.

A snapshot never holds the invite token (the mesh secret): it is streamed to every console client. The
console adds `invite_token` to `/api/status` only for a request `httpguard` found local.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mesh_mcp.api.router import match_model

SERVING = "serving"


@dataclass(frozen=True)
class ModelStatus:
    name: str
    state: str  # downloading | loading | serving | failed | stopped
    detail: str = ""
    path: str | None = None
    size_bytes: int | None = None
    progress: float | None = None  # 0..1 while downloading
    architecture: str | None = None
    layers: int | None = None
    embeddings: bool = False
    tools: bool | None = None  # its chat template can call tools (llama-server's /props; else the GGUF's template)
    thinking: bool | None = None  # a thinking model (llama-server renders its template; else the GGUF's template)
    upstream: str | None = None  # llama-server base URL while serving (never leaves the node)
    in_flight: int = 0
    pid: int | None = None  # llama-server's process id while it runs
    restarts: int = 0
    context: int | None = None  # tokens one request may hold (slot context, capped at the training context)
    slots: int | None = None  # requests its server runs at once (--parallel)
    placement: dict[str, Any] | None = None  # solo/split plan: stages, reasons, predicted tok/s
    measured_tok_s: float | None = None  # decode tokens/s its llama-server reports (serving/throughput.py)
    # Speculative decoding: its mode, candidates, the controller's decision and why, tokens/s and acceptance per
    # mode (serving/spec_control.status); None when the model has no candidates
    speculation: dict[str, Any] | None = None
    updated_at: float = 0.0

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("upstream")
        return d


@dataclass
class NodeState:
    node_id: str
    name: str
    version: str
    api_url: str
    console_url: str
    llama_cpp: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    models: dict[str, ModelStatus] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    invite_token: str | None = field(default=None, repr=False)  # the mesh secret: never in `snapshot()`
    models_on_disk: tuple[str, ...] = ()
    mesh_id: str | None = None
    blackboard: dict[str, Any] | None = None  # {"state": "loading" | "ready"} when carried
    peers: Callable[[], list[dict[str, Any]]] = field(default=lambda: [], repr=False)
    traffic: Callable[[], dict[str, int]] = field(default=lambda: {}, repr=False)  # bytes this node moved to peers
    # Per model: (ok, errors) of the requests this node's own llama-servers answered (its metrics install the reader:
    # metrics/families.py `metrics_of`); the record carries them (mesh/runtime.py `served_models`)
    served: Callable[[], dict[str, tuple[int, int]]] = field(default=lambda: {}, repr=False)
    # The mesh's demand map, hottest first (bounded: serving/mesh_demand.py): [{"model", "rate_per_min", ...}]
    demand: Callable[[], list[dict[str, Any]]] = field(default=lambda: [], repr=False)
    # A standby's latest decision and its reasons (serving/standby.py); None when this node is no standby
    standby: Callable[[], dict[str, Any] | None] = field(default=lambda: None, repr=False)
    # The console's picture of the mesh (api/console_view.py), given the demand rows above: members, models, links
    mesh: Callable[[list[dict[str, Any]]], dict[str, Any]] = field(
        default=lambda demand: {"members": [], "models": [], "links": []}, repr=False
    )
    _subscribers: list[MemoryObjectSendStream[dict[str, Any]]] = field(default_factory=list)

    def update_model(self, name: str, **changes: Any) -> ModelStatus:
        current = self.models.get(name) or ModelStatus(name=name, state="loading")
        if "progress" in changes and changes["progress"] is not None:
            old = current.progress
            # Throttle download progress to whole percents: the console needs no more.
            if old is not None and math.floor(old * 100) == math.floor(changes["progress"] * 100):
                self.models[name] = replace(current, **changes)
                return self.models[name]
        status = replace(current, **changes, updated_at=time.time())
        self.models[name] = status
        self.publish()
        return status

    def set_info(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self, key, value)
        self.publish()

    def find_model(self, requested: str | None) -> ModelStatus | None:
        """The local model a request names (see `router.match_model`)."""
        name = match_model(requested, self.served_names())
        return self.models[name] if name is not None else None

    def served_names(self) -> list[str]:
        return [m.name for m in self.models.values() if m.state != "stopped"]

    def snapshot(self) -> dict[str, Any]:
        demand = self.demand()
        return {
            "node_id": self.node_id,
            "name": self.name,
            "version": self.version,
            "api_url": self.api_url,
            "console_url": self.console_url,
            "llama_cpp": self.llama_cpp,
            "hardware": self.hardware,
            "uptime_s": round(time.time() - self.started_at, 1),
            "mesh_id": self.mesh_id,
            "peers": self.peers(),
            "traffic": self.traffic(),
            "demand": demand,
            "standby": self.standby(),
            "models": [m.public() for m in self.models.values()],
            "blackboard": self.blackboard,
            "mesh": self.mesh(demand),
        }

    def publish(self) -> None:
        if not self._subscribers:
            return
        snap = self.snapshot()
        for stream in list(self._subscribers):
            try:
                stream.send_nowait(snap)
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                # A subscriber that cannot keep up is dropped; its SSE stream ends and the page reconnects.
                self._subscribers.remove(stream)
                stream.close()

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[MemoryObjectReceiveStream[dict[str, Any]]]:
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](64)
        self._subscribers.append(send)
        try:
            yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()
            receive.close()

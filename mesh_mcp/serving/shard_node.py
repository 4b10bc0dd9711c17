"""Expert shards over the mesh: a node serves one shard of a mixture-of-experts model for as long as the
coordinator holds a lease on it — and only once every shard has passed the quality gate.

Stream `moe-shard` (QUIC control plane), coordinator → shard node:

    {"t": "moe-shard", "id": ID, "model": ALIAS, "file": NAME, "size": BYTES, "model_key": SHA256,
     "experts": [[ids of layer 0], ...], "reference": REFERENCE, "stats": EXPERT_STATS?,
     "gate": {"min_agreement": A, "max_kl": K}, "ctx": TOKENS_PER_SLOT, "slots": N, "shard": I, "of": N}

The node keeps the model's reference and routing statistics in its own cache (`HOME/moe-stats`, by model sha256),
validated, so whichever node coordinates this model next measures nothing again: computed once for the mesh.

The node finds the GGUF in its models directory (same name and size), writes (or reuses from its cache) its shard
(`moe_shard.ensure_shard`: trunk + the listed experts), starts llama-server on it — the model shows as `loading`,
so nothing is routed to it yet — and scores it against the full model's reference (`moe_quality.score`:
teacher-forced top-1 agreement and KL on held-out prompts). It answers
`{"ok": true, "quality": {...}, "passed": BOOL, "bytes": SHARD_BYTES}` (or `{"ok": false, "error": ...}`).

The coordinator answers `{"t": "serve"}` when every shard passed: the model becomes `serving` here, gossiped like any
local model, and the router sends it whole sessions. Closing the stream instead (a shard failed the gate, the
coordinator re-plans or stops, or its connection dies) ends the lease, and so does membership declaring the
coordinator dead (`Mesh.cancel_when_gone`): llama-server is stopped and the model is gone from this node (both
halves of the lease: `lease.py`). Per
token nothing crosses the network: every shard is a complete model on its node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from inference.llama_server import LlamaServer, ServerSettings
from inference.llamacpp import LlamaCpp
from inference.supervise import SERVING
from mesh_mcp.errors import BackendError, MeshLLMError, ProtocolError
from mesh_mcp.mesh import wire
from mesh_mcp.mesh.runtime import Mesh
from mesh_mcp.mesh.transport import PeerConnection
from mesh_mcp.serving.lease import Grant, hold, lease_id, local_copy, requested_file
from mesh_mcp.serving.run import safe_name
from mesh_mcp.state import NodeState

log = logging.getLogger("mesh_llm.moe")

SHARD_START_TIMEOUT_S = 1800.0  # writing a large shard, loading it and scoring it
MAX_EXPERTS = 4096


@dataclass(frozen=True)
class ShardReport:
    node_id: str
    shard: int
    passed: bool
    quality: dict[str, Any]
    bytes: int


class ShardLink:
    """The shard node's half. Needs llama.cpp built before it can serve."""

    def __init__(self, mesh: Mesh, state: NodeState, models_dir: Path, home: Path) -> None:
        self.mesh, self.state, self.models_dir, self.home = mesh, state, models_dir, home
        self.llama: LlamaCpp | None = None
        self.threads: int | None = None
        mesh.transport.handlers.update({"moe-shard": self._on_lease})

    async def _on_lease(
        self, conn: PeerConnection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        from inference.moe_quality import Gate, Reference

        grant = Grant(self.mesh, conn, reader, writer)
        coordinator = grant.holder
        lease_id(header, "id", "shard")
        alias = wire.field(header, "model", str, 128)
        name, size = requested_file(header)
        model_key = wire.field(header, "model_key", str, 64)
        shard, of = wire.field(header, "shard", int), wire.field(header, "of", int)
        ctx, slots = wire.field(header, "ctx", int), wire.field(header, "slots", int)
        experts = _experts(header.get("experts"))
        gate_obj = header.get("gate")
        if not isinstance(gate_obj, dict):
            raise ProtocolError("gate must be an object")
        gate = Gate(_number(gate_obj, "min_agreement"), _number(gate_obj, "max_kl"))
        try:
            ref = Reference.from_json(json.dumps(header.get("reference")).encode())
        except (MeshLLMError, ValueError, TypeError) as exc:
            raise ProtocolError(f"bad reference: {exc}") from exc
        if not (0 <= shard < of <= 64 and 256 <= ctx <= 1 << 20 and 1 <= slots <= 256):
            raise ProtocolError("shard/of/ctx/slots out of range")
        if ref.model_key != model_key:
            raise ProtocolError("the reference is for another model")
        await self._keep(model_key, ref, header.get("stats"))
        where = f"expert shard {shard + 1}/{of} of {alias}"
        with grant.refusals(lambda exc: log.warning("%s for %s: %s", where, coordinator, exc)):
            if self.llama is None:
                raise BackendError("llama.cpp is not built on this node yet")
            path = local_copy(self.models_dir, name, size)
            if path is None:
                raise BackendError(
                    f"this node does not have {name} ({size} bytes) in {self.models_dir}: an expert shard is written "
                    "from the node's own copy of the model"
                )
            # Held while the coordinator keeps this stream open and membership holds it alive: a coordinator
            # declared dead ends the lease at once.
            with grant.held() as gone:
                async with serve_shard(
                    self.llama,
                    lambda **changes: self.state.update_model(alias, **changes),
                    self.home,
                    alias=alias,
                    source=path,
                    model_key=model_key,
                    experts=experts,
                    settings=ServerSettings(ctx_per_slot=ctx, slots=slots),
                    threads=self.threads,
                    where=where,
                    coordinator=coordinator,
                ) as shard_server:
                    quality = await shard_server.check(ref)
                    passed = quality.passes(gate)
                    log.info(
                        "%s for %s: %s — %s", where, coordinator, quality.describe(), "passed" if passed else "REFUSED"
                    )
                    grant.ready(quality=asdict(quality), passed=passed, bytes=shard_server.n_bytes)
                    go = await grant.next_message()
                    if go is None or go.get("t") != "serve" or not passed:
                        log.info("%s: not served (the coordinator ended the lease)", where)
                        return
                    shard_server.go()
                    log.info("%s: serving sessions the mesh routes here (coordinator %s)", where, coordinator)
                    await grant.until_closed()
                    log.info("%s: lease ended by %s; llama-server stopped", where, coordinator)
            if gone.cancel_called:
                log.info("%s: the coordinator %s was declared dead; llama-server stopped", where, coordinator)

    async def _keep(self, model_key: str, ref: Any, stats: object) -> None:
        """Cache what the coordinator measured (reference, statistics) unless this node has it already."""
        from inference.moe_quality import reference_path
        from inference.moe_stats import ExpertStats, stats_path, write_atomic

        cache = self.home / "moe-stats"
        todo: list[tuple[Path, bytes]] = []
        if not reference_path(cache, model_key).exists():
            todo.append((reference_path(cache, model_key), ref.to_json()))
        if stats is not None and not stats_path(cache, model_key).exists():
            try:
                parsed = ExpertStats.from_json(json.dumps(stats).encode())
            except (MeshLLMError, ValueError, TypeError) as exc:
                raise ProtocolError(f"bad expert statistics: {exc}") from exc
            if parsed.model_key != model_key:
                raise ProtocolError("the expert statistics are for another model")
            todo.append((stats_path(cache, model_key), parsed.to_json()))
        for path, data in todo:
            await anyio.to_thread.run_sync(write_atomic, path, data)


class ShardServer:
    """A llama-server on a shard whose `serving` state is held back until `go()`: a shard is scored before the
    router may send it anything."""

    def __init__(self, server: LlamaServer, on_state: Callable[..., object], placement: dict[str, Any]) -> None:
        self.server, self.on_state, self.placement = server, on_state, placement
        self.n_bytes = 0
        self._open = False
        server.on_state = self._on_state

    def _on_state(self, state: str, detail: str) -> None:
        if state == SERVING and not self._open:
            state, detail = "loading", "expert shard loaded; checking its quality"
        self.on_state(
            state=state,
            detail=detail,
            upstream=self.server.base_url if state == SERVING else None,
            pid=self.server.pid,
            restarts=self.server.restarts,
            **self.server.template_caps(),
        )

    async def check(self, ref: Any) -> Any:
        from inference.moe_quality import score

        assert self.server.base_url is not None
        quality = await score(self.server.base_url, ref)
        self.placement = {**self.placement, "quality": asdict(quality)}
        self.on_state(placement=self.placement)
        return quality

    def go(self) -> None:
        self._open = True
        self._on_state(SERVING, f"expert shard; llama-server pid {self.server.pid} at {self.server.base_url}")


@asynccontextmanager
async def serve_shard(
    llama: LlamaCpp,
    on_state: Callable[..., object],
    home: Path,
    *,
    alias: str,
    source: Path,
    model_key: str,
    experts: tuple[tuple[int, ...], ...],
    settings: ServerSettings,
    threads: int | None,
    where: str,
    coordinator: str,
) -> AsyncIterator[ShardServer]:
    """Write (or reuse) the shard, start its llama-server and yield once it answers (not yet `serving`); on exit the
    server is stopped and the model leaves this node's list. `on_state`: `NodeState.update_model` for this model."""
    from inference.moe_shard import ensure_shard

    on_state(state="loading", detail=f"{where}: writing the shard", upstream=None)
    t0 = time.monotonic()
    shard = await anyio.to_thread.run_sync(
        lambda: ensure_shard(source, experts, cache_dir=home / "moe-shards", model_key=model_key)
    )
    k = max((len(layer) for layer in experts), default=0)
    log.info(
        "%s: %s shard %s (%.1f MB, %d experts per layer) in %.1f s",
        where,
        "reused" if shard.reused else "wrote",
        shard.path.name,
        shard.n_bytes / 1e6,
        k,
        time.monotonic() - t0,
    )
    placement = {
        "kind": "expert-shard",
        "shard": where,
        "coordinator": coordinator,
        "experts_per_layer": k,
        "bytes": shard.n_bytes,
        "file": shard.path.name,
    }
    server = LlamaServer(
        llama=llama,
        model_path=shard.path,
        alias=alias,
        log_path=home / "logs" / f"llama-server-{safe_name(alias)}-shard.log",
        settings=replace(
            settings,
            gpu_layers=999,
            max_start_failures=1,
            extra_args=(*settings.extra_args, *(("--threads", str(threads)) if threads else ())),
        ),
    )
    holder = ShardServer(server, on_state, placement)
    holder.n_bytes = shard.n_bytes
    on_state(placement=placement, size_bytes=shard.n_bytes, path=str(shard.path))
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            yield holder
            tg.cancel_scope.cancel()
    finally:
        on_state(state="stopped", detail=f"{where}: lease ended", upstream=None, pid=None)


def _number(obj: dict[str, Any], key: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{key} must be a number")
    return float(value)


def _experts(value: object) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= 1024:
        raise ProtocolError("experts is a list of per-layer expert id lists")
    out = []
    for layer in value:
        if not isinstance(layer, list) or len(layer) > MAX_EXPERTS:
            raise ProtocolError("experts is a list of per-layer expert id lists")
        if not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < MAX_EXPERTS for e in layer):
            raise ProtocolError("expert ids are integers ≥ 0")
        out.append(tuple(sorted(set(layer))))
    return tuple(out)


@asynccontextmanager
async def lease_shard(
    mesh: Mesh,
    node_id: str,
    request: dict[str, Any],
) -> AsyncIterator[tuple[ShardReport, asyncio.StreamWriter, asyncio.StreamReader]]:
    """Ask `node_id` to write, load and score its shard (`request`: the stream header without `t`); yields its report
    and the open stream (write `{"t": "serve"}` to open it to sessions; leaving the context ends the lease)."""
    async with hold(
        mesh, node_id, "moe-shard", request, reply_within_s=SHARD_START_TIMEOUT_S, refused="cannot serve its shard"
    ) as held:
        reply = held.reply
        quality = reply.get("quality")
        report = ShardReport(
            node_id,
            int(request["shard"]),
            reply.get("passed") is True,
            quality if isinstance(quality, dict) else {},
            wire.field(reply, "bytes", int),
        )
        yield report, held.writer, held.reader

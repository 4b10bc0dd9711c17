"""Serving a mixture-of-experts model as expert shards, on the coordinator: plan, statistics, assignment, reference,
leases, the quality gate, serve, watch, re-plan.

Decide, then do:
1. `moe_plan.plan_shards` (pure) picks N nodes and K experts per layer from gossiped capacity, files and builds;
2. routing statistics (`moe_stats.ensure_stats`: llama-imatrix over calibration text, cached by the model's sha256)
   and `moe_assign.assign` choose each shard's experts: the most-used ones on every shard, the rest dealt out;
3. the full model's reference on held-out prompts (`moe_quality.reference_for`, cached the same way);
4. every shard node — this one included — writes its shard from its own copy of the GGUF, loads it and scores it
   against the reference (top-1 agreement, KL) over a `moe-shard` lease (`serving/shard_node.py`);
5. only when **every** shard passes the gate are they opened to sessions (`serve`); the router then hashes each
   session to one shard node (rendezvous on the session key: a node joining or leaving moves only its share).
   If one fails, all leases end and `ShardingRefused` tells the node to serve the model as a pipeline split,
   with the reason in the log and `/api/status`;
6. watch: a shard node leaving the mesh or its lease breaking is left behind (its sessions move to the other shards)
   and its shard is offered to a spare node; the rest of the group keeps serving untouched.

Nothing crosses the network per token: each shard node runs its own complete llama-server.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import anyio

from inference.moe_plan import ShardPlan, expert_bytes, plan_shards, spare_for
from inference.placement import NodeCap
from mesh_mcp.errors import MeshLLMError, first_leaf
from mesh_mcp.mesh.runtime import llama_cpp_identity
from mesh_mcp.mesh.wire import encode_json
from mesh_mcp.serving.run import MeshRun, ShardingRefused
from mesh_mcp.serving.shard_node import ShardReport, lease_shard, serve_shard

log = logging.getLogger("mesh_llm.moe")

REPLAN_PAUSE_S = 2.0
WAIT_FOR_NODES_S = 5.0
WATCH_S = 0.5
SPARE_RETRY_S = 5.0  # a lost shard with no spare node: look again this often


@dataclass
class ShardedModel(MeshRun):
    force: int | None = None
    gate: Any = None  # moe_quality.Gate; None = DEFAULT_GATE
    _stats: Any = field(default=None, repr=False)
    _reference: Any = field(default=None, repr=False)
    _model_key: str | None = field(default=None, repr=False)
    _moe: str = field(default="", repr=False)  # what the GGUF header says about its experts and gating

    async def run(self) -> None:
        """Serve until cancelled; `ShardingRefused` when this model must be a pipeline split instead."""
        from inference.moe_layout import ShardError, moe_layout
        from inference.moe_quality import DEFAULT_GATE

        gate = self.gate or DEFAULT_GATE
        try:
            layout = moe_layout(self.facts)
        except ShardError as cannot:
            raise ShardingRefused(str(cannot)) from cannot
        log.info("%s: %s", self.alias, layout.describe())
        self._moe = layout.describe()
        sizes = expert_bytes(self.facts, self.settings.ctx_per_slot, self.settings.slots)
        if sizes.experts_that_fit(self.capacity_bytes) < sizes.n_expert_used:
            raise ShardingRefused(
                f"this node cannot hold the trunk of {self.alias} and {sizes.n_expert_used} experts per layer "
                f"({sizes.shard_need(sizes.n_expert_used) / 2**30:.2f} GiB > {self.capacity_bytes / 2**30:.2f} GiB)"
            )
        while True:
            current = self.plan(sizes)
            log.info("placement for %s: %s", self.alias, "; ".join(current.reasons))
            self.on_state(placement=_describe(current, gate, moe=self._moe))
            if current.kind == "none":
                self.on_state(state="loading", detail="waiting for nodes for expert shards: " + current.reasons[-1])
                await self.clock.sleep(WAIT_FOR_NODES_S)
                continue
            started = self.clock.monotonic()
            refused: BaseException | None = None
            try:
                await self._serve(current, gate)
            except* ShardingRefused as group:
                refused = first_leaf(group)
            except* (MeshLLMError, OSError, TimeoutError) as group:
                exc = first_leaf(group)
                log.warning("expert shards of %s failed: %s", self.alias, exc)
                self.on_state(state="loading", detail=f"re-planning: {exc}", upstream=None, pid=None)
            if refused is not None:
                raise refused
            took = self.clock.monotonic() - started
            log.info("expert shards of %s ended after %.0f s; planning again", self.alias, took)
            await self.clock.sleep(REPLAN_PAUSE_S)

    def plan(self, sizes: Any) -> ShardPlan:
        return plan_shards(
            self.alias, sizes, self.plan_nodes(), me=self.mesh.identity.node_id, force=self.force,
            build=llama_cpp_identity(),
        )  # fmt: skip

    def plan_nodes(self) -> list[NodeCap]:
        """This node and the live members, as placement sees them (gossiped capacity, files, build)."""
        me = self.mesh.identity.node_id
        stem = self.model_path.name.removesuffix(".gguf")
        nodes = [NodeCap(me, self.capacity_bytes, has_file=True, llama_cpp=llama_cpp_identity())]
        for r in self.mesh.members():
            if r.node_id == me or r.leaving:
                continue
            nodes.append(
                NodeCap(
                    r.node_id,
                    r.capacity_bytes,
                    has_file=stem in r.models_on_disk,
                    client=r.role == "client",
                    llama_cpp=r.llama_cpp,
                )
            )
        return nodes

    async def _prepare(self) -> tuple[str, Any, Any]:
        """(model key, routing statistics, reference), each computed once per model file and cached."""
        from inference.moe_quality import reference_for
        from inference.moe_shard import model_hash
        from inference.moe_stats import ensure_stats

        if self._model_key is None:
            self.on_state(state="loading", detail="hashing the model (the key of its statistics and shards)")
            self._model_key = await anyio.to_thread.run_sync(
                lambda: model_hash(self.facts, self.home / "moe-shards" / "hashes")
            )
        key = self._model_key
        if self._stats is None:
            self.on_state(state="loading", detail="measuring expert routing (llama-imatrix over calibration text)")
            t0 = self.clock.monotonic()
            self._stats = await ensure_stats(
                self.llama, self.model_path, cache_dir=self.home / "moe-stats", model_key=key, threads=self.threads
            )
            took = self.clock.monotonic() - t0
            log.info("%s: expert statistics (%s) in %.1f s", self.alias, self._stats.source, took)
        if self._reference is None:
            self.on_state(state="loading", detail="recording the full model's answers to held-out prompts")
            t0 = self.clock.monotonic()
            self._reference = await reference_for(
                self.llama, self.model_path, cache_dir=self.home / "moe-stats", model_key=key, threads=self.threads
            )
            log.info("%s: quality reference in %.1f s", self.alias, self.clock.monotonic() - t0)
        return key, self._stats, self._reference

    def _assign(self, current: ShardPlan, stats: Any) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """Per shard, per `blk.N` layer, the kept experts (() for layers without experts)."""
        from inference.moe_assign import AssignmentError, assign
        from inference.moe_layout import moe_layout

        layout = moe_layout(self.facts)
        mass = stats.mass()
        try:
            a = assign(
                layout.n_expert,
                max(self.facts.expert_used_count, 1),
                mass,
                current.n_shards,
                capacity=current.per_shard,
                n_group=layout.n_group,
            )
        except AssignmentError as exc:
            raise ShardingRefused(f"no expert assignment for {current.n_shards} shards: {exc}") from exc
        log.info("%s: expert assignment: %s", self.alias, a.summary())
        rows = list(layout.moe_layers)
        if len(rows) != a.n_layers:
            raise ShardingRefused(
                f"the routing statistics cover {a.n_layers} layers, the model has {len(rows)} MoE layers"
            )
        out = []
        for shard in a.shards:
            per_layer: list[tuple[int, ...]] = [()] * layout.n_layers
            for row, layer in enumerate(rows):
                per_layer[layer] = tuple(shard[row])
            out.append(tuple(per_layer))
        return tuple(out)

    async def _serve(self, current: ShardPlan, gate: Any) -> None:
        key, stats, reference = await self._prepare()
        experts = self._assign(current, stats)
        lease_id = f"{self.alias[:40]}-{uuid.uuid4().hex[:8]}"
        me = self.mesh.identity.node_id
        reports: dict[int, ShardReport] = {}
        base = {
            "id": lease_id,
            "model": self.alias,
            "file": self.model_path.name,
            "size": self.model_path.stat().st_size,
            "model_key": key,
            "reference": _json_obj(reference),
            "stats": _json_obj(stats),  # shared: a node that coordinates this model later need not measure again
            "gate": {"min_agreement": gate.min_agreement, "max_kl": gate.max_kl},
            "ctx": self.settings.ctx_per_slot,
            "slots": self.settings.slots,
            "of": current.n_shards,
        }
        async with contextlib.AsyncExitStack() as stack:
            self.on_state(state="loading", detail=f"starting {current.n_shards} expert shards")
            # This node's shard, and every worker's lease, load and score side by side.
            own = await stack.enter_async_context(
                serve_shard(
                    self.llama,
                    self.on_state,
                    self.home,
                    alias=self.alias,
                    source=self.model_path,
                    model_key=key,
                    experts=experts[0],
                    settings=self.settings,
                    threads=self.threads,
                    where=f"expert shard 1/{current.n_shards} of {self.alias}",
                    coordinator=me,
                )
            )
            streams: dict[int, tuple[str, Any, Any]] = {}  # shard → (node, lease writer, lease reader)

            async def take(i: int, node_id: str) -> None:
                report, writer, reader = await stack.enter_async_context(
                    lease_shard(self.mesh, node_id, {**base, "experts": [list(e) for e in experts[i]], "shard": i})
                )
                reports[i] = report
                streams[i] = (node_id, writer, reader)

            async with anyio.create_task_group() as leases:
                for i, node_id in enumerate(current.nodes[1:], start=1):
                    leases.start_soon(take, i, node_id)
                quality = await own.check(reference)
                reports[0] = ShardReport(me, 0, quality.passes(gate), asdict(quality), own.n_bytes)
            table = [reports[i] for i in sorted(reports)]
            self.on_state(placement=_describe(current, gate, table, moe=self._moe))
            for r in table:
                log.info(
                    "%s shard %d/%d on %s: %s — %s",
                    self.alias,
                    r.shard + 1,
                    current.n_shards,
                    r.node_id,
                    _quality_text(r.quality),
                    "passed" if r.passed else "below the gate",
                )
            failed = [r for r in table if not r.passed]
            if failed:
                r = failed[0]
                reason = (
                    f"expert shard {r.shard + 1}/{current.n_shards} on {r.node_id} fails the quality gate "
                    f"({_quality_text(r.quality)}; gate: agreement ≥ {gate.min_agreement}, KL ≤ {gate.max_kl})"
                )
                log.warning("%s: %s; serving it as a pipeline split instead", self.alias, reason)
                raise ShardingRefused(reason)
            for _, writer, _ in streams.values():
                writer.write(encode_json({"t": "serve"}))
            own.go()
            log.info(
                "%s: serving as %d expert shards on %s; sessions are hashed to one shard each",
                self.alias,
                current.n_shards,
                ", ".join(current.nodes),
            )
            group = _Group(current, gate, base, experts, reports, streams)
            await self._watch(stack, group)

    async def _watch(self, stack: contextlib.AsyncExitStack, group: _Group) -> None:
        """Keep the group serving. A shard node that leaves the mesh (or whose lease breaks) is left behind: its
        sessions move to the other shards — each a complete model that passed the gate — by the router's rendezvous
        hashing, and its shard (the same experts) is offered to a spare node, scored there before it serves."""
        lost: dict[int, float] = {}  # shard → when to look for a spare next
        while True:
            await self.clock.sleep(WATCH_S)
            alive = {r.node_id for r in self.mesh.members() if not r.leaving}
            for i, (node_id, _, reader) in list(group.streams.items()):
                if node_id in alive and not reader.at_eof():
                    continue
                del group.streams[i]
                lost[i] = 0.0
                log.warning(
                    "expert shards of %s: shard node %s (shard %d/%d) is gone; its sessions move to the other shards",
                    self.alias,
                    node_id,
                    i + 1,
                    group.plan.n_shards,
                )
            for i, when in list(lost.items()):
                if self.clock.monotonic() >= when and await self._replace(stack, group, i):
                    del lost[i]
                else:
                    lost[i] = max(when, self.clock.monotonic() + SPARE_RETRY_S)

    async def _replace(self, stack: contextlib.AsyncExitStack, group: _Group, i: int) -> bool:
        """Offer shard `i` to a spare node; True once one serves it."""
        taken = {node_id for node_id, _, _ in group.streams.values()} | {self.mesh.identity.node_id}
        sizes = expert_bytes(self.facts, self.settings.ctx_per_slot, self.settings.slots)
        nodes = self.plan_nodes()
        spare = spare_for(sizes, group.plan.per_shard, nodes, taken=taken, build=llama_cpp_identity())
        if spare is None:
            return False
        request = {**group.base, "experts": [list(e) for e in group.experts[i]], "shard": i}
        held = lease_shard(self.mesh, spare, request)
        try:
            report, writer, reader = await held.__aenter__()
        except (MeshLLMError, OSError, TimeoutError) as exc:
            log.warning("%s: spare %s cannot take shard %d: %s", self.alias, spare, i + 1, exc)
            return False
        if not report.passed:
            await held.__aexit__(None, None, None)
            log.warning("%s: spare %s scored below the gate on shard %d", self.alias, spare, i + 1)
            return False
        stack.push_async_exit(held)
        writer.write(encode_json({"t": "serve"}))
        group.streams[i] = (spare, writer, reader)
        group.reports[i] = report
        group.nodes[i] = spare
        log.info(
            "%s: shard %d/%d now on %s (%s)",
            self.alias,
            i + 1,
            group.plan.n_shards,
            spare,
            _quality_text(report.quality),
        )
        self.on_state(placement=_describe(group.current(), group.gate, group.table(), moe=self._moe))
        return True


@dataclass
class _Group:
    """A serving group of expert shards, as the coordinator keeps it while nodes come and go."""

    plan: ShardPlan
    gate: Any
    base: dict[str, Any]  # the lease request without a shard's experts
    experts: tuple[tuple[tuple[int, ...], ...], ...]  # [shard][layer] → kept experts
    reports: dict[int, ShardReport]
    streams: dict[int, tuple[str, Any, Any]]
    nodes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nodes = self.nodes or list(self.plan.nodes)

    def current(self) -> ShardPlan:
        return replace(self.plan, nodes=tuple(self.nodes))

    def table(self) -> list[ShardReport]:
        return [self.reports[i] for i in sorted(self.reports)]


def _json_obj(obj: Any) -> Any:
    import json

    return json.loads(obj.to_json())


def _quality_text(q: dict[str, Any]) -> str:
    if not q:
        return "no quality measured"
    return f"top-1 agreement {q.get('agreement', 0):.3f}, KL {q.get('kl', 0):.4f} over {q.get('positions', 0)} tokens"


def _describe(p: ShardPlan, gate: Any, reports: list[ShardReport] | None = None, *, moe: str = "") -> dict[str, Any]:
    by_shard = {r.shard: r for r in reports or []}
    return {
        "kind": "expert-shards" if p.kind == "shards" else "none",
        "moe": moe,
        "experts_per_shard": p.per_shard,
        "shard_bytes": p.shard_bytes,
        "gate": {"min_agreement": gate.min_agreement, "max_kl": gate.max_kl},
        "shards": [
            {
                "node_id": node_id,
                "shard": i,
                **(
                    {"quality": by_shard[i].quality, "passed": by_shard[i].passed, "bytes": by_shard[i].bytes}
                    if i in by_shard
                    else {}
                ),
            }
            for i, node_id in enumerate(p.nodes)
        ],
        "reasons": list(p.reasons),
    }

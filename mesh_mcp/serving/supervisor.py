"""The serving plane's supervisor: for each model this node was asked to serve, gather what the planner needs, let
it decide, and run the matching runner — decide, then do.

Per model: resolve and download the GGUF (progress in the bars and `/api/status`), read its facts, clamp the
context to the model's training context, wait for llama.cpp, `plan.decide()`, then `runners.runner_for()` serves
until cancelled (`drop`) — a `ShardingRefused` from the expert-shard runner makes it decide again with the reason,
which falls back to a pipeline split. A model's failure (its download, a corrupt file, a full disk) fails that model
visibly; the node and its other models go on. With no model, `standby()` holds the node's `Standby` decision (a
member lends capacity to splits through its rpc-server link) and runs the `StandbyRunner`: a model the mesh wants
is served unpinned beside its `ReplicaWatcher` (serving/replicas.py), which releases it once idle past the demand
TTL or moves the node to a hotter model; then the node is a standby again. It owns the node's demand map (`demand`,
serving/mesh_demand.py): each model the operator asked for (`--model`, `--auto`) is pinned from the start until
dropped; a promoted one is not (its demand is its requests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio

from inference import catalog, hardware, models, speculation
from inference.diskspace import is_disk_full
from inference.gguf_facts import GGUFFacts, read_facts
from inference.llama_server import ServerSettings
from inference.llamacpp import LlamaCpp
from inference.memory_model import estimate_need, memory_need
from inference.placement import NodeCap
from mesh_mcp.clock import SYSTEM_CLOCK, Clock
from mesh_mcp.errors import ConfigError, MeshLLMError
from mesh_mcp.mesh.runtime import Mesh
from mesh_mcp.serving.assign import Demand, Recent, Serve, View
from mesh_mcp.serving.auto import choose
from mesh_mcp.serving.demand import TTL_S
from mesh_mcp.serving.mesh_demand import MeshDemand
from mesh_mcp.serving.plan import ExpertShards, Flags, Standby, ThisNode, decide
from mesh_mcp.serving.replicas import ReplicaWatcher, Watch, demand_view
from mesh_mcp.serving.run import ModelRun, ShardingRefused
from mesh_mcp.serving.runners import runner_for
from mesh_mcp.serving.spec_control import off_status
from mesh_mcp.serving.standby import StandbyRunner, build_view
from mesh_mcp.serving.view import mesh_view
from mesh_mcp.state import NodeState

log = logging.getLogger("mesh_llm.node")

# Architectures that are embedding models: their llama-server runs with --embeddings.
EMBEDDING_ARCHS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert"})

Progress = Callable[[str, int, int | None], None]
DRAIN_S = 60.0  # a released model's requests in flight get this long to finish before its server stops
DRAIN_POLL_S = 0.2
AUTO_SETTLE_S = 2.0  # --auto in a mesh: how long after joining it listens to gossip before choosing


@dataclass
class ServingSetup:
    """What the node hands the serving plane at start-up."""

    state: NodeState
    hardware: hardware.Hardware
    home: Path
    models_dir: Path
    server: ServerSettings
    mesh: Mesh | None = None
    client: bool = False
    split: int | None = None  # --split N
    threads: int | None = None  # --threads (default: all cores)
    dataplane_port: int = 0  # this node's data plane (split workers without the file fetch tensors there)
    dataplane_targets: dict[str, int] | None = None  # its targets (a split host's own rpc-server for hand-offs)
    on_download: Progress = lambda label, done, total: None  # the terminal's progress bars
    clock: Clock = SYSTEM_CLOCK
    demand_ttl_s: float = TTL_S  # --demand-ttl: a model no request named this long is no longer wanted
    draft: speculation.DraftFlags = field(default_factory=speculation.DraftFlags)  # --draft, --no-draft, ...

    def this_node(self, backend: str = "cpu") -> ThisNode:
        hw = self.hardware
        return ThisNode(
            self.state.node_id,
            hw.capacity_bytes,
            gpus=len(hw.gpus),
            backend=backend,
            bandwidth_bytes_s=hw.bandwidth_bytes_s,
            client=self.client,
            in_mesh=self.mesh is not None,
        )

    def flags(self) -> Flags:
        return Flags(split=self.split, ctx_per_slot=self.server.ctx_per_slot, slots=self.server.slots)


class Serving:
    """Every model this node serves, each in its own cancel scope (`drop` ends one)."""

    def __init__(self, setup: ServingSetup) -> None:
        self.setup = setup
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._llama: LlamaCpp | None = None
        self._llama_ready = anyio.Event()
        self.standby_runner: StandbyRunner | None = None
        self.replica_watcher: ReplicaWatcher | None = None
        self.watch = Watch()  # shared by the standby runner and the replica watcher: one memory of the mesh
        self._facts_cache: dict[Path, GGUFFacts] = {}
        mesh = setup.mesh
        members = mesh.members if mesh is not None else list
        self.demand = MeshDemand(setup.state.node_id, members, ttl_s=setup.demand_ttl_s)

    def llama_ready(self, llama: LlamaCpp) -> None:
        """llama.cpp is built and passed its self-test: models waiting to load go on."""
        self._llama = llama
        self._llama_ready.set()

    async def _built_llama(self) -> LlamaCpp:
        await self._llama_ready.wait()
        assert self._llama is not None
        return self._llama

    async def standby(self) -> None:
        """No model to serve: the `Standby` decision (logged with why). A member that lends capacity watches the
        mesh's demand (`StandbyRunner`) and promotes itself to serve a model nobody serves; when that model is
        dropped it is a standby again. A client, or a node in no mesh, just holds."""
        plan = decide(None, None, self.setup.this_node(), self.setup.flags())
        assert isinstance(plan, Standby)
        mesh = self.setup.mesh
        if not plan.lends_capacity or mesh is None:
            if not self.setup.client:
                log.info(
                    "no model given: serving the console only. Next: `mesh-llm --model SmolLM2-135M-Instruct` "
                    "to serve the embedded default, or `mesh-llm download` to list the catalog."
                )
            await anyio.sleep_forever()
            return
        log.info("%s; watching the mesh's demand to promote itself", plan.reasons[0])
        while True:
            self.standby_runner = StandbyRunner(
                mesh,
                self.setup.state.node_id,
                demand=self._demand_now,
                sizes=self._need_here,
                catalog=self._catalog_here,
                promote=self._promote,
                clock=self.setup.clock,
                watch=self.watch,
            )
            await self.standby_runner.run()  # returns once a promoted model is no longer served here (dropped)

    async def auto(self) -> None:
        """`--auto`: choose a catalog model for this node — once joined, what the mesh wants first (`auto.choose`) —
        then serve it (downloading it with progress); with nothing that fits, be a standby."""
        setup, demand = self.setup, {}
        if setup.mesh is not None:
            await setup.mesh.joined.wait()
            await setup.clock.sleep(AUTO_SETTLE_S)  # a gossip round or two: the mesh's records and demand arrive
            now = setup.clock.time()
            demand = {w.name: w.rate for w in self.demand.mesh_map(now).wanted(now, setup.demand_ttl_s)}
        server = setup.server
        choice = choose(catalog.CATALOG, setup.hardware.capacity_bytes, demand, server.ctx_per_slot, server.slots)
        for reason in choice.reasons:
            log.info("%s", reason)
        if choice.model is None:
            await self.standby()
            return
        await self.serve(choice.model)

    def standby_status(self) -> dict[str, object] | None:
        """The standby's latest decision and reasons for `/api/status` (None: this node is watching nothing)."""
        if self.standby_runner is None:
            return None
        status = self.standby_runner.status()
        if (watcher := self.replica_watcher) is not None:
            status["replica"] = watcher.status()
        return status

    def _demand_now(self, now: float) -> Mapping[str, Demand]:
        wanted = self.demand.mesh_map(now).wanted(now, self.setup.demand_ttl_s)
        return demand_view(((w.name, w.rate, w.last_wanted) for w in wanted), now, self.setup.demand_ttl_s)

    def _need_here(self, name: str) -> int | None:
        """Bytes this node needs to serve `name` alone: from the GGUF header when the file is here, else estimated
        from the catalog's file size (`estimate_need`); None when neither knows it."""
        setup = self.setup
        path = setup.models_dir / f"{name}.gguf"
        if path.is_file():
            try:
                facts = self._facts_cache.get(path) or read_facts(path)
            except MeshLLMError:
                return None
            self._facts_cache[path] = facts
            return memory_need(facts, setup.server.ctx_per_slot, setup.server.slots).total
        entry = catalog.by_name(name)
        return None if entry is None else estimate_need(entry.size, setup.server.ctx_per_slot, setup.server.slots)

    def _catalog_here(self) -> dict[str, int]:
        """Catalog models this node could download and serve alone, name → bytes it would need."""
        capacity, server = self.setup.hardware.capacity_bytes, self.setup.server
        needs = {e.name: estimate_need(e.size, server.ctx_per_slot, server.slots) for e in catalog.CATALOG}
        return {name: need for name, need in needs.items() if need <= capacity}

    async def _promote(self, model: str, source: str) -> None:
        """Serve `model` (a standby's promotion, or a replica) unpinned until it is released, moved or dropped — a
        move serves its target next, the same way; `MeshLLMError` when a model failed here, so the standby hands the
        job on."""
        next_model: str | None = model
        while next_model is not None:
            model = next_model
            log.info("promoted: serving %s (from %s)", model, source)
            next_model = await self._serve_watched(model)
            source = "a move"
            status = self.setup.state.models.get(model)
            if status is not None and status.state == "failed":
                raise MeshLLMError(f"{model} failed here: {status.detail}")

    async def _serve_watched(self, model: str) -> str | None:
        """Serve `model` unpinned beside its `ReplicaWatcher`; the model the watcher moves this node to, or None."""
        moved: list[str] = []

        async def watch() -> None:
            watcher = self.replica_watcher = ReplicaWatcher(
                self.setup.state.node_id, model, self._replica_look, self.setup.clock
            )
            decision = await watcher.run()
            if isinstance(decision, Serve):
                moved.append(decision.model)
            await self._drain(model, "; ".join(decision.reasons))

        async with anyio.create_task_group() as tg:
            if self.setup.mesh is not None:
                tg.start_soon(watch)
            await self.serve(model, pin=False)
            tg.cancel_scope.cancel()
        self.replica_watcher = None
        return moved[0] if moved else None

    async def _drain(self, model: str, detail: str) -> None:
        """Give `model` up gracefully: announce it stopped (no request is routed here from now on), let the requests
        in flight here finish — at most `DRAIN_S` —, then drop it."""
        state, clock = self.setup.state, self.setup.clock
        status = state.models.get(model)
        if status is not None and status.state == "serving":
            state.update_model(model, state="stopped", detail=f"draining: {detail}")
            deadline = clock.monotonic() + DRAIN_S
            while (s := state.models.get(model)) is not None and s.in_flight > 0 and clock.monotonic() < deadline:
                await clock.sleep(DRAIN_POLL_S)
            if s is not None and s.in_flight:
                log.warning("%s: %d request(s) still in flight after %g s of draining; stopping it", model, s.in_flight,
                            DRAIN_S)  # fmt: skip
        self._stop(model, detail)

    def _replica_look(self) -> tuple[View, Recent]:
        """The view and the watch's memory now, for a `ReplicaWatcher`."""
        mesh = self.setup.mesh
        assert mesh is not None
        now = self.setup.clock.time()
        records = mesh.members()
        self.watch.see(records, now)
        overdue = self.watch.overdue(now, self._need_here)
        demand, catalog = self._demand_now(now), self._catalog_here()
        view = build_view(records, self.setup.state.node_id, demand, self._need_here, catalog, overdue=overdue)
        return view, self.watch.recent(now)

    def drop(self, requested: str) -> str:
        """Stop serving a model (its llama-server is terminated); returns its name."""
        state = self.setup.state
        status = state.find_model(requested)
        if status is None:
            raise ConfigError(f"this node does not serve {requested!r}; it serves {state.served_names()}")
        self._stop(status.name, "dropped")
        return status.name

    def _stop(self, name: str, detail: str) -> None:
        """End `name`'s serving here (its scope: the llama-server is terminated and reaped), with why."""
        if (scope := self._scopes.pop(name, None)) is not None:
            scope.cancel()
        self.demand.unpin(name)
        self.setup.state.update_model(name, state="stopped", detail=detail, upstream=None, pid=None)
        log.info("stopped serving %s: %s", name, detail)

    async def serve(self, spec: str, pin: bool = True) -> None:
        """Serve the model `spec` names until dropped or cancelled; a failure fails this model only. `pin`: the
        operator asked for it (`--model`, `--auto`): it stays demanded while served, and is never released."""
        with anyio.CancelScope() as scope:
            try:
                await self._serve(spec, scope, pin)
            except OSError as exc:
                # A full disk met by a writer that did not say so itself (an rpc cache, a shard): this model
                # fails, visibly; the node and its other models go on. Other OSErrors are bugs: they propagate.
                if not is_disk_full(exc):
                    raise
                name = next((n for n, s in self._scopes.items() if s is scope), spec)
                detail = f"the disk is full: {exc.strerror} ({exc.filename or 'a file'}); free some space and restart"
                log.error("model %s: %s", name, detail)
                self.setup.state.update_model(name, state="failed", detail=detail, progress=None, upstream=None)

    async def _serve(self, spec: str, scope: anyio.CancelScope, pin: bool) -> None:
        setup = self.setup
        fetched = await self._fetch(spec, scope, pin)
        if fetched is None:
            return
        name, path, facts = fetched
        embeddings = facts.architecture in EMBEDDING_ARCHS
        context = _context(name, facts, setup.server)
        setup.state.update_model(
            name,
            state="loading",
            progress=None,
            context=context,
            slots=setup.server.slots,
            path=str(path),
            size_bytes=facts.file_size,
            architecture=facts.architecture,
            layers=facts.block_count,
            embeddings=embeddings,
            tools=None if embeddings else facts.template_calls_tools,  # until llama-server's /props says
            thinking=None if embeddings else facts.template_thinks,  # until llama-server's rendering says
            detail="waiting for llama.cpp" if not self._llama_ready.is_set() else "starting llama-server",
        )
        plan = decide(name, facts, setup.this_node(), setup.flags(), self._view(path))
        log.info("placement for %s: %s", name, "; ".join(plan.reasons))
        candidates = () if embeddings else await self._speculation(name, path)
        llama = await self._built_llama()
        # The backend is known now: it decides whether a solo server offloads layers to the GPU(s).
        plan = decide(name, facts, setup.this_node(llama.backend), setup.flags(), self._view(path))
        run = ModelRun(
            llama=llama,
            home=setup.home,
            model_path=path,
            alias=name,
            facts=facts,
            settings=replace(setup.server, embeddings=embeddings),
            capacity_bytes=setup.hardware.capacity_bytes,
            threads=setup.threads or setup.hardware.cpu_cores,
            speculation=candidates,
            on_state=lambda **changes: setup.state.update_model(name, **changes),
            clock=setup.clock,
        )
        while True:
            if isinstance(plan, Standby):  # decide() gives a model's facts no Standby; guard the type
                raise AssertionError(f"{name}: standby for a model")
            if isinstance(plan, ExpertShards) and candidates:
                why = "off: expert shards serve without speculation"
                setup.state.update_model(name, speculation=off_status(why))
            try:
                await runner_for(plan, run, setup.mesh, setup.dataplane_port, setup.dataplane_targets).run()
                return
            except ShardingRefused as exc:
                log.warning("%s: not served as expert shards (%s); falling back to a pipeline split", name, exc)
                setup.state.update_model(
                    name, state="loading", detail=f"expert shards refused: {exc}; pipeline split", upstream=None
                )
                node, flags = setup.this_node(llama.backend), setup.flags()
                plan = decide(name, facts, node, flags, self._view(path), shards_refused=str(exc))

    async def _speculation(self, name: str, path: Path) -> tuple[speculation.Speculation, ...]:
        """The model's speculation candidates (`inference/speculation.choose`); a draft that cannot be had (not
        fetched, unreadable, another tokenizer) leaves none, and the model serves without, saying why."""
        setup = self.setup
        try:
            found, why = await speculation.choose(
                name, path, setup.draft, models_dir=setup.models_dir, on_progress=setup.on_download
            )
        except MeshLLMError as exc:  # DraftRefused (another tokenizer), a draft not found or not fetched
            found, why = (), f"off: {exc}"
            log.warning("speculation for %s: %s", name, why)
        except OSError as exc:
            found, why = (), f"off: cannot read the draft ({exc.strerror or exc})"
            log.warning("speculation for %s: %s", name, why)
        else:
            log.info("speculation for %s: %s", name, why)
        setup.state.update_model(name, speculation=off_status(why, tuple(c.kind for c in found)))
        return found

    def _view(self, path: Path) -> list[NodeCap]:
        """The mesh as placement sees it now (gossip only: the split runner pings members it lacks RTTs for)."""
        mesh = self.setup.mesh
        return (
            [] if mesh is None else mesh_view(mesh, path, self.setup.hardware.capacity_bytes, self.setup.clock.time())
        )

    async def _fetch(self, spec: str, scope: anyio.CancelScope, pin: bool) -> tuple[str, Path, GGUFFacts] | None:
        """Resolve, download and read the model; None (the model failed, with why) when that cannot be done."""
        setup, name = self.setup, spec
        try:
            name = models.request_name(models.parse_spec(spec))
            self._scopes[name] = scope
            if pin:
                self.demand.pin(name)  # demanded while this node serves it (or keeps trying to), until dropped
            setup.state.update_model(name, state="downloading", detail=f"resolving {spec}")

            def progress(label: str, done: int, total: int | None) -> None:
                setup.on_download(label, done, total)
                frac = done / total if total else None
                setup.state.update_model(name, state="downloading", progress=frac, detail=f"downloading {label}")

            local = await models.ensure_model(spec, models_dir=setup.models_dir, on_progress=progress)
            setup.state.models_on_disk = models.on_disk(setup.models_dir)
            facts = await anyio.to_thread.run_sync(read_facts, local.path)
        except MeshLLMError as exc:  # DiskFull included: "needs 98 MB in /models but only 38 MB is free: ..."
            log.error("model %s: %s", spec, exc)
            setup.state.update_model(name, state="failed", detail=str(exc), progress=None)
            return None
        except OSError as exc:  # the models directory itself (creating it, a lock file): fail this model only
            full = " (the disk is full: free some space or pass --models-dir on a larger disk)"
            full = full if is_disk_full(exc) else ""
            detail = f"cannot use the models directory {setup.models_dir}: {exc.strerror or exc}{full}"
            log.error("model %s: %s", spec, detail)
            setup.state.update_model(name, state="failed", detail=detail, progress=None)
            return None
        return name, local.path, facts


def _context(name: str, facts: GGUFFacts, server: ServerSettings) -> int:
    """Tokens one request may hold. The KV cache is unified: one request may fill all of it (--ctx-size ×
    --parallel), up to the model's training context, where llama-server caps a slot silently."""
    asked = server.ctx_per_slot
    context = asked * server.slots
    if facts.context_length and context > facts.context_length:
        if asked > facts.context_length:
            log.warning(
                "%s was trained with a %d-token context: llama-server caps each request at %d tokens, not the %d "
                "asked with --ctx-size",
                name,
                facts.context_length,
                facts.context_length,
                asked,
            )
        context = facts.context_length
    return context

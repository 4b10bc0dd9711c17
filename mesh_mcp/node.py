"""A running mesh-llm node: one task group that owns the API server (:9337, with MCP at /mcp), the
console (:3131), the mesh, the blackboard, the llama.cpp build, model downloads and one supervised
llama-server per model.

Start-up order is explicit (`tg.start`): the API and console listen first, so a person sees
downloads and loads as they happen; models become `serving` one by one. Cancelling the group
(Ctrl-C, SIGTERM) stops the HTTP servers gracefully and terminates and reaps every llama-server.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from blackboard.board import Board
from blackboard.scrub import default_scrubber
from blackboard.store import Store
from inference import hardware, models
from inference.cpu import read_cpu
from inference.diskspace import is_disk_full
from inference.gguf_facts import memory_need, read_facts
from inference.llama_server import LlamaServer, ServerSettings
from inference.llamacpp import LlamaCpp
from inference.provision import ensure_llama_cpp
from mesh_mcp.api.app import build_api
from mesh_mcp.api.console import build_console
from mesh_mcp.api.errors import error_response
from mesh_mcp.api.guard import API, CONSOLE, HttpGuard, Policy
from mesh_mcp.api.serve import serve_http
from mesh_mcp.errors import ConfigError, MeshLLMError
from mesh_mcp.mcp.local import MCP_PATHS, RuntimeInfo, remove_runtime, write_runtime
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.serving.rpc_worker import RpcLink
from mesh_mcp.serving.shard_node import ShardLink
from mesh_mcp.serving.split import ModelRun, SplitModel, safe_name

from . import __version__
from .mesh import meshfile
from .mesh.board_link import BoardLink
from .mesh.gossip import GossipConfig
from .mesh.meshfile import MeshConfig
from .mesh.runtime import Mesh, MeshSettings
from .mesh.tokens import InviteToken
from .mesh.tokens import decode as decode_token
from .state import NodeState
from .ui import Bars

if TYPE_CHECKING:
    from mesh_mcp.mcp.server import HttpTools

log = logging.getLogger("mesh_llm.node")

BLACKBOARD_DB = "blackboard.db"

# Architectures that are embedding models: their llama-server runs with --embeddings.
EMBEDDING_ARCHS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert"})


@dataclass(frozen=True)
class NodeConfig:
    models: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    api_port: int = 9337
    console_port: int = 3131
    home: Path = field(default_factory=Path.home)
    models_dir: Path = field(default_factory=Path.home)
    backend: str | None = None
    name: str | None = None
    max_vram_gb: float | None = None
    server: ServerSettings = field(default_factory=ServerSettings)
    joins: tuple[str, ...] = ()  # invite tokens
    client: bool = False  # API only: never serves, never asked to
    mesh_host: str = "0.0.0.0"
    mesh_port: int = 0
    advertise: tuple[str, ...] = ()
    gossip: GossipConfig = field(default_factory=GossipConfig)
    blackboard: bool = False  # --blackboard: members always carry it; clients only when asked
    author: str | None = None  # default author of posts written here (--name, else $USER)
    split: int | None = None  # --split N: serve every model split over N nodes even when it fits one
    threads: int | None = None  # --threads: CPU threads of llama-server and rpc-servers (default: all cores)
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # --api-key / MESH_LLM_API_KEYS: never logged
    no_auth: bool = False  # --no-auth: --listen-all without keys, chosen explicitly
    cors_origins: tuple[str, ...] = ()  # --cors-origin: browser apps allowed to call the API (normalized)

    @property
    def in_mesh(self) -> bool:
        return bool(self.models or self.joins or self.client or self.blackboard)

    @property
    def role(self) -> str:
        # A client with nobody to join starts the mesh, so it must be a member others can gossip with.
        return "client" if self.client and self.joins else "host"

    @property
    def carries_blackboard(self) -> bool:
        return self.in_mesh and (self.blackboard or self.role != "client")


class Node:
    def __init__(self, config: NodeConfig, bars: Bars) -> None:
        self.config = config
        self.bars = bars
        self.identity = load_or_create(config.home)
        self.hardware = hardware.detect(config.max_vram_gb)
        self.cpu = read_cpu()  # decides which llama.cpp build this node tries first
        host = config.host if config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        self.state = NodeState(
            node_id=self.identity.node_id,
            name=config.name or os.uname().nodename,
            version=__version__,
            api_url=f"http://{host}:{config.api_port}/v1",
            console_url=f"http://{host}:{config.console_port}",
            hardware=self.hardware.as_dict(),
            llama_cpp={"version": "", "backend": "", "state": "pending"},  # filled in by _build_llama
        )
        self._llama: LlamaCpp | None = None
        self._llama_ready = anyio.Event()
        self.servers: dict[str, LlamaServer] = {}
        self._model_scopes: dict[str, anyio.CancelScope] = {}
        self.state.models_on_disk = _models_on_disk(config.models_dir)
        self.mesh: Mesh | None = None
        if config.in_mesh:
            tokens = tuple(decode_token(t) for t in config.joins)  # a bad token fails here, clearly
            self.mesh = Mesh(
                self.identity,
                _mesh_config(config.home, tokens, self.identity.public_bytes),
                config.home,
                self.state,
                MeshSettings(
                    role=config.role,
                    host=config.mesh_host,
                    port=config.mesh_port,
                    advertise=config.advertise,
                    joins=tokens,
                    gossip=config.gossip,
                ),
            )
            self.state.peers = self._peers
            self.state.traffic = self._traffic
        self.board: Board | None = None
        self.board_link: BoardLink | None = None
        if self.mesh is not None and config.carries_blackboard:
            self.board = Board(
                Store(config.home / BLACKBOARD_DB),
                self.identity.key,
                self.identity.node_id,
                default_author=config.author or os.environ.get("USER") or self.state.name,
                scrubber=default_scrubber,
            )
            self.board_link = BoardLink(self.mesh, self.board)
        self.rpc_link: RpcLink | None = None
        self.shard_link: ShardLink | None = None
        if self.mesh is not None and not config.client:
            self.rpc_link = RpcLink(self.mesh, config.models_dir, config.home)
            self.rpc_link.threads = config.threads or self.hardware.cpu_cores
            self.rpc_link.on_fetch_progress = lambda done, total: self.bars.download("layers from a peer", done, total)
            self.shard_link = ShardLink(self.mesh, self.state, config.models_dir, config.home)
            self.shard_link.threads = self.rpc_link.threads

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            if self.board is not None:
                self.board.store.close()

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        cfg = self.config
        # MCP's session manager outlives the HTTP servers that route to it (they stop first); its
        # tools find this node's ports once they listen.
        async with anyio.create_task_group() as tg:
            if self.mesh is not None:
                await tg.start(self.mesh.run)
            if self.rpc_link is not None:
                await tg.start(self.rpc_link.run)
            if self.board is not None and self.board_link is not None:
                tg.start_soon(self._run_board, self.board)
                tg.start_soon(self.board_link.run)
            api = build_api(self.state, self.mesh)
            if self.mesh is not None:
                self.mesh.api_app = api  # requests tunnelled from peers: the OpenAI/Anthropic API only
            listen_all = cfg.host in ("0.0.0.0", "::")
            mount = _McpMount(api, self.state, allow_remote=listen_all)
            tg.start_soon(mount.run)
            # The guard is outside the MCP mount, so /mcp is checked like /v1 (Host, Origin, key, body size).
            policy = Policy(listen_all, cfg.api_keys, cfg.no_auth, frozenset(cfg.cors_origins))
            api_app = HttpGuard(mount, policy, API)
            console_app = HttpGuard(build_console(self.state, self, self.board), policy, CONSOLE)
            api_port = await tg.start(serve_http, api_app, cfg.host, cfg.api_port)
            console_port = await tg.start(serve_http, console_app, cfg.host, cfg.console_port)
            _log_exposure(policy, api_port, console_port)
            self.state.set_info(
                api_url=f"http://{_display_host(cfg.host)}:{api_port}/v1",
                console_url=f"http://{_display_host(cfg.host)}:{console_port}",
            )
            log.info(
                "node %s (%s): API %s, console %s; %s",
                self.state.name,
                self.state.node_id,
                self.state.api_url,
                self.state.console_url,
                _describe_hw(self.hardware),
            )
            write_runtime(
                cfg.home, RuntimeInfo(os.getpid(), self.identity.node_id, self.state.api_url, self.state.console_url)
            )
            tg.start_soon(_remove_runtime_on_exit, cfg.home)
            if self.mesh is not None:
                tg.start_soon(self._print_token, self.mesh)
            task_status.started()
            if cfg.client:
                await anyio.sleep_forever()
            if not cfg.models and self.rpc_link is not None:
                log.info("no model given: offering this node's capacity to the mesh (pipeline splits)")
                await self._build_llama()
                await anyio.sleep_forever()
            if not cfg.models:
                log.info(
                    "no model given: serving the console only. Next: `mesh-llm --model SmolLM2-135M-Instruct` "
                    "to serve the embedded default, or `mesh-llm download` to list the catalog."
                )
                await anyio.sleep_forever()
            for spec in cfg.models:
                tg.start_soon(self._model_task, spec)
            await self._build_llama()
            await anyio.sleep_forever()

    async def _build_llama(self) -> None:
        pending = {"version": "", "backend": "", "variant": "", "flags": [], "selftest": "", "fallback": ""}
        self.state.set_info(llama_cpp={**pending, "state": "building"})
        try:
            llama = await ensure_llama_cpp(self.config.backend, self.bars.build, cpu=self.cpu)
        except MeshLLMError as exc:
            log.error("%s", exc)
            self.state.set_info(llama_cpp={**pending, "state": "failed", "detail": str(exc)})
            for name in self.state.served_names():
                self.state.update_model(name, state="failed", detail=f"llama.cpp is unavailable: {exc}")
            raise
        self._llama = llama
        if self.rpc_link is not None:
            self.rpc_link.llama = llama  # this node can lend rpc-servers from now on
        if self.shard_link is not None:
            self.shard_link.llama = llama  # and serve expert shards
        # "fallback": serving on a more portable build because a better one failed its self-test here.
        state = "fallback" if llama.fallback else "ready"
        self.state.set_info(llama_cpp={**llama.public(), "cpu": self.cpu.public(), "state": state})
        what = f"{llama.version} ({llama.backend}, {llama.variant} build)" if llama.variant else "external binaries"
        log.info("llama.cpp: %s in %s; self-test: %s", what, llama.bin_dir, llama.selftest)
        self._llama_ready.set()

    async def _model_task(self, spec: str) -> None:
        with anyio.CancelScope() as scope:
            try:
                await self._serve_model(spec, scope)
            except OSError as exc:
                # A full disk met by a writer that did not say so itself (an rpc cache, a shard): this model
                # fails, visibly; the node and its other models go on. Other OSErrors are bugs: they propagate.
                if not is_disk_full(exc):
                    raise
                name = next((n for n, s in self._model_scopes.items() if s is scope), spec)
                detail = f"the disk is full: {exc.strerror} ({exc.filename or 'a file'}); free some space and restart"
                log.error("model %s: %s", name, detail)
                self.state.update_model(name, state="failed", detail=detail, progress=None, upstream=None)

    async def _run_board(self, board: Board) -> None:
        self.state.set_info(blackboard={"state": "loading"})
        async with anyio.create_task_group() as tg:
            await tg.start(board.run)  # started once the scrubber is loaded
            self.state.set_info(blackboard={"state": "ready"})
            log.info("blackboard ready (%s)", self.config.home / BLACKBOARD_DB)

    def drop(self, requested: str) -> str:
        """Stop serving a model (its llama-server is terminated); returns its name."""
        status = self.state.find_model(requested)
        if status is None:
            raise ConfigError(f"this node does not serve {requested!r}; it serves {self.state.served_names()}")
        if (scope := self._model_scopes.pop(status.name, None)) is not None:
            scope.cancel()
        self.state.update_model(status.name, state="stopped", detail="dropped", upstream=None, pid=None)
        log.info("dropped %s", status.name)
        return status.name

    async def _print_token(self, mesh: Mesh) -> None:
        """The invite token alone on its own line of stdout (easy to copy, easy to script), once this node is a
        member: at once in a mesh it created or restarted in, after the join succeeded otherwise (a refused
        join prints none)."""
        await mesh.joined.wait()
        token = mesh.invite_token()
        print(token, flush=True)
        self.state.set_info(invite_token=token)  # after the print: whoever sees it in the status finds it printed
        log.info("invite token printed above: `mesh-llm --join TOKEN` adds a machine")

    def rotate_key(self, evict: Sequence[str] = (), add_owners: Sequence[str] = ()) -> str:
        """As an owner of the mesh: a new secret (epoch + 1), without the `evict`ed nodes, with `add_owners`
        named owners; returns the new invite token."""
        if self.mesh is None:
            raise ConfigError("this node is in no mesh")
        return self.mesh.rotate(evict, add_owners)

    def _traffic(self) -> dict[str, int]:
        """Bytes between this node and its peers: QUIC datagrams (gossip, control, tunnelled API requests) and
        llama.cpp RPC carried by this node's data plane for pipeline splits it works in."""
        assert self.mesh is not None
        t = self.mesh.transport.traffic
        out = {"quic_bytes_in": t.bytes_in, "quic_bytes_out": t.bytes_out}
        if self.rpc_link is not None:
            counters = list(self.rpc_link.dataplane.counters.values())
            out["rpc_bytes_in"] = sum(c.to_rpc_server for c in counters)
            out["rpc_bytes_out"] = sum(c.from_rpc_server for c in counters)
        return out

    def _peers(self) -> list[dict[str, object]]:
        assert self.mesh is not None
        return [
            {
                "node_id": r.node_id,
                "name": r.name,
                "role": r.role,
                "addresses": list(r.addresses),
                "models": [m.name for m in r.models_served],
                "serving": [m.name for m in r.models_served if m.state == "serving"],
                "self": r.node_id == self.identity.node_id,
                "rtt_ms": None if (ms := self.mesh.rtt.get(r.node_id)) is None else round(ms, 1),
                "rtt_gossiped": {peer: tenths / 10 for peer, tenths in r.rtt},
                "llama_cpp": r.llama_cpp,
            }
            for r in self.mesh.members()
        ]

    async def _serve_model(self, spec: str, scope: anyio.CancelScope) -> None:
        name = spec
        try:
            name = models.request_name(models.parse_spec(spec))
            self._model_scopes[name] = scope
            self.state.update_model(name, state="downloading", detail=f"resolving {spec}")

            def progress(label: str, done: int, total: int | None) -> None:
                self.bars.download(label, done, total)
                frac = done / total if total else None
                self.state.update_model(name, state="downloading", progress=frac, detail=f"downloading {label}")

            local = await models.ensure_model(spec, models_dir=self.config.models_dir, on_progress=progress)
            self.state.models_on_disk = _models_on_disk(self.config.models_dir)
            facts = await anyio.to_thread.run_sync(read_facts, local.path)
        except MeshLLMError as exc:  # DiskFull included: "needs 98 MB in /models but only 38 MB is free: ..."
            log.error("model %s: %s", spec, exc)
            self.state.update_model(name, state="failed", detail=str(exc), progress=None)
            return
        except OSError as exc:  # the models directory itself (creating it, a lock file): fail this model only
            full = " (the disk is full: free some space or pass --models-dir on a larger disk)"
            full = full if is_disk_full(exc) else ""
            detail = f"cannot use the models directory {self.config.models_dir}: {exc.strerror or exc}{full}"
            log.error("model %s: %s", spec, detail)
            self.state.update_model(name, state="failed", detail=detail, progress=None)
            return
        embeddings = facts.architecture in EMBEDDING_ARCHS
        # The KV cache is unified: one request may fill all of it (--ctx-size × --parallel), up to the model's
        # training context, where llama-server caps a slot silently.
        asked = self.config.server.ctx_per_slot
        context = asked * self.config.server.slots
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
        self.state.update_model(
            name,
            state="loading",
            progress=None,
            context=context,
            path=str(local.path),
            size_bytes=facts.file_size,
            architecture=facts.architecture,
            layers=facts.block_count,
            embeddings=embeddings,
            tools=None if embeddings else facts.template_calls_tools,  # until llama-server's /props says
            detail="waiting for llama.cpp" if not self._llama_ready.is_set() else "starting llama-server",
        )
        need = memory_need(facts, self.config.server.ctx_per_slot, self.config.server.slots).total
        capacity = self.hardware.capacity_bytes
        split = self.mesh is not None and (self.config.split is not None or need > capacity)
        log.info(
            "placement for %s: %s", name, _placement(need, capacity, self.hardware, self.config.split, facts.is_moe)
        )
        await self._llama_ready.wait()
        assert self._llama is not None
        if split:
            assert self.mesh is not None
            run = ModelRun(
                mesh=self.mesh,
                llama=self._llama,
                home=self.config.home,
                model_path=local.path,
                alias=name,
                facts=facts,
                settings=replace(self.config.server, embeddings=embeddings),
                capacity_bytes=capacity,
                threads=self.config.threads or self.hardware.cpu_cores,
                on_state=lambda **changes: self.state.update_model(name, **changes),
            )
        if split and facts.is_moe:
            from mesh_mcp.serving.moe import ShardedModel, ShardingRefused

            try:
                await ShardedModel.of(run, force=self.config.split).run()
                return
            except ShardingRefused as exc:
                log.warning("%s: not served as expert shards (%s); falling back to a pipeline split", name, exc)
                self.state.update_model(
                    name, state="loading", detail=f"expert shards refused: {exc}; pipeline split", upstream=None
                )
        if split:
            dataplane = self.rpc_link.port if self.rpc_link is not None else 0
            await SplitModel.of(run, force_split=self.config.split, dataplane_port=dataplane).run()
            return
        gpu_layers = 999 if self.hardware.gpus and self._llama.backend != "cpu" else 0
        settings = replace(self.config.server, gpu_layers=gpu_layers, embeddings=embeddings)
        server = LlamaServer(
            llama=self._llama,
            model_path=local.path,
            alias=name,
            log_path=self.config.home / "logs" / f"llama-server-{safe_name(name)}.log",
            settings=settings,
        )

        def on_state(state: str, detail: str) -> None:
            tools = {} if server.tool_calls is None or embeddings else {"tools": server.tool_calls}
            self.state.update_model(
                name,
                state=state,
                detail=detail,
                upstream=server.base_url,
                pid=server.pid,
                restarts=server.restarts,
                **tools,
            )

        server.on_state = on_state
        self.servers[name] = server
        await server.run()


async def _remove_runtime_on_exit(home: Path) -> None:
    try:
        await anyio.sleep_forever()
    finally:
        remove_runtime(home)


class _OwnTools:
    """The tools of this node's own `/mcp`: the same calls an attached `blackboard --mcp` makes, to
    this node's ports (known once they listen), so both ways to reach MCP behave alike."""

    def __init__(self, state: NodeState) -> None:
        self._state = state

    def _http(self) -> HttpTools:
        from mesh_mcp.mcp.server import HttpTools

        return HttpTools(self._state.console_url, self._state.api_url)

    async def post(self, text: str, reply_to: str | None, author: str | None) -> dict[str, Any]:
        return await self._http().post(text, reply_to, author)

    async def search(
        self, query: str, author: str | None, kind: str | None, since_hours: float | None, limit: int
    ) -> list[dict[str, Any]]:
        return await self._http().search(query, author, kind, since_hours, limit)

    async def feed(
        self, author: str | None, kind: str | None, since_hours: float | None, limit: int
    ) -> list[dict[str, Any]]:
        return await self._http().feed(author, kind, since_hours, limit)

    async def models(self) -> list[dict[str, Any]]:
        return await self._http().models()

    async def status(self) -> dict[str, Any]:
        return await self._http().status()

    async def ask(self, question: str, model: str | None, max_tokens: int) -> dict[str, Any]:
        return await self._http().ask(question, model, max_tokens)


class _McpMount:
    """The API port's app: MCP (streamable HTTP) at /mcp, the OpenAI/Anthropic API elsewhere. It sits
    behind `httpguard.HttpGuard`, so the MCP app's own Host/Origin checks are off (`guarded=True`).

    The MCP SDK takes ~0.8 s of CPU to import, so it is loaded in a worker thread once the node runs
    (joining the mesh and serving models do not wait for it); an early /mcp request waits for it."""

    LOAD_WAIT_S = 30.0

    def __init__(self, api: ASGIApp, state: NodeState, *, allow_remote: bool) -> None:
        self.api, self.state, self.allow_remote = api, state, allow_remote
        self.mcp: ASGIApp | None = None
        self._loaded = anyio.Event()

    async def run(self) -> None:
        module = await anyio.to_thread.run_sync(importlib.import_module, "mesh_mcp.mcp.server")
        async with module.McpHttp(_OwnTools(self.state), allow_remote=self.allow_remote, guarded=True) as mcp:
            self.mcp = mcp
            self._loaded.set()
            try:
                await anyio.sleep_forever()
            finally:
                self.mcp = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in MCP_PATHS:
            await self.api(scope, receive, send)
            return
        with anyio.move_on_after(self.LOAD_WAIT_S):
            await self._loaded.wait()
        if self.mcp is not None:
            await self.mcp(scope, receive, send)
        else:
            starting = error_response("plain", 503, "MCP is starting; retry", headers={"Retry-After": "1"})
            await starting(scope, receive, send)


def _log_exposure(policy: Policy, api_port: int, console_port: int) -> None:
    """Say what other machines and browser apps can reach (never the keys themselves)."""
    if policy.cors_origins:
        log.info("browser apps allowed to call this node (--cors-origin): %s", ", ".join(sorted(policy.cors_origins)))
    if not policy.listen_all:
        return
    ports = f"ports {api_port} (API, /mcp) and {console_port} (console)"
    if policy.no_auth:
        log.warning(
            "--listen-all --no-auth: anyone who can reach this machine on %s can use its models and the mesh's, "
            "call its MCP tools and read and post to the blackboard, with no key; the invite token and node "
            "controls stay on this machine",
            ports,
        )
    else:
        log.info(
            "--listen-all: other machines reach %s with one of the %d API key(s) (Authorization: Bearer KEY or "
            "x-api-key: KEY); the invite token and node controls stay on this machine",
            ports,
            len(policy.api_keys),
        )


def _placement(need: int, cap: int, hw: hardware.Hardware, split: int | None, moe: bool = False) -> str:
    where = f"{len(hw.gpus)} GPU(s)" if hw.gpus else "CPU"
    sizes = f"needs {need / 2**30:.2f} GiB (weights + KV + compute), this node offers {cap / 2**30:.1f} GiB ({where})"
    how = "expert shards (a mixture-of-experts model; a pipeline split if they fail the quality gate)"
    if split is not None:
        return f"split over {split} nodes (--split) as {how if moe else 'a pipeline'}; it {sizes}"
    if need <= cap:
        return f"solo on this node: it {sizes}"
    return f"too big for this node: it {sizes}; planning {how if moe else 'a pipeline split'} over the mesh"


def _describe_hw(hw: hardware.Hardware) -> str:
    gpus = ", ".join(f"{g.name} {g.memory_bytes / 2**30:.0f} GiB" for g in hw.gpus) or "no GPU"
    return f"{hw.cpu_cores} cores, {hw.ram_bytes / 2**30:.0f} GiB RAM, {gpus}"


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _mesh_config(home: Path, tokens: tuple[InviteToken, ...], owner: bytes) -> MeshConfig:
    """The mesh this node belongs to: the one a token names, else the one it created before, else a new one
    owned by `owner` (this node's public key). A token's mesh is not saved here: the mesh saves it once the
    join succeeded, so a refused join leaves mesh.toml as it was."""
    existing = meshfile.load(home)
    if tokens:
        joined = meshfile.from_token(tokens[0])
        if existing is not None and existing.mesh_id == joined.mesh_id and existing.epoch >= joined.epoch:
            return existing
        return joined
    if existing is None:
        existing = meshfile.create(owner=owner)
        meshfile.save(home, existing)
        log.info("created mesh %s", existing.mesh_id_hex[:8])
    return existing


def _models_on_disk(models_dir: Path) -> tuple[str, ...]:
    """Complete GGUF files in the models directory (gossiped, so placement can prefer nodes that have them)."""
    try:
        names = (p.name.removesuffix(".gguf") for p in models_dir.glob("*.gguf") if p.is_file())
        return tuple(sorted(n for n in names if len(n) <= 128))[:256]  # the record's limits
    except OSError:
        return ()

"""A running mesh-llm node: its start-up order. One task group owns the mesh, the workers' links (rpc-servers
and expert shards lent to other nodes), the blackboard, the API server (:9337, with MCP at /mcp), the console
(:3131), the llama.cpp build and the serving plane (`serving/supervisor.py`: one model each, decide then do).

Start-up order is explicit (`tg.start`): the mesh and links first, then the API and console listen, so a person
sees downloads and loads as they happen; models become `serving` one by one. Cancelling the group (Ctrl-C,
SIGTERM) stops the HTTP servers gracefully and terminates and reaps every llama-server and rpc-server.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio

from blackboard.board import Board
from blackboard.scrub import default_scrubber
from blackboard.store import Store
from inference import hardware, models
from inference.cpu import read_cpu
from inference.llama_server import ServerSettings
from inference.provision import ensure_llama_cpp
from inference.speculation import DraftFlags
from mesh_mcp.api import console_view
from mesh_mcp.api.app import build_api
from mesh_mcp.api.console import build_console
from mesh_mcp.api.guard import API, CONSOLE, Policy
from mesh_mcp.api.mesh_directory import MeshDirectory
from mesh_mcp.api.middleware import HttpGuard, log_exposure
from mesh_mcp.api.searching import Searching
from mesh_mcp.api.searching import api_app as searching_api
from mesh_mcp.api.searching import console_app as searching_console
from mesh_mcp.api.serve import serve_http
from mesh_mcp.clock import SYSTEM_CLOCK
from mesh_mcp.errors import ConfigError, MeshLLMError
from mesh_mcp.mcp.local import RuntimeInfo, withdraw_on_exit, write_runtime
from mesh_mcp.mcp.mount import McpMount
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.public import Public
from mesh_mcp.public import actors as public_actors
from mesh_mcp.serving import throughput
from mesh_mcp.serving.demand import TTL_S as DEMAND_TTL_S
from mesh_mcp.serving.mesh_demand import connect as connect_demand
from mesh_mcp.serving.rpc_worker import RpcLink
from mesh_mcp.serving.shard_node import ShardLink
from mesh_mcp.serving.supervisor import Serving, ServingSetup

from . import __version__
from .mesh import meshfile
from .mesh.board_link import BoardLink
from .mesh.demand_link import DemandLink
from .mesh.gossip import GossipConfig
from .mesh.runtime import Mesh, MeshSettings
from .mesh.tokens import decode as decode_token
from .state import NodeState
from .ui import Bars

log = logging.getLogger("mesh_llm.node")
T = TypeVar("T")
CLIENT_TOKEN_REFRESH_S = 10.0  # how often a client's status token is brought up to date with the members

BLACKBOARD_DB = "blackboard.db"


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
    draft: DraftFlags = field(default_factory=DraftFlags)  # --draft, --no-draft, --draft-max, --draft-min
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # --api-key / MESH_LLM_API_KEYS: never logged
    no_auth: bool = False  # --no-auth: --listen-all without keys, chosen explicitly
    cors_origins: tuple[str, ...] = ()  # --cors-origin: browser apps allowed to call the API (normalized)
    auto: bool = False  # --auto: choose a catalog model for this node's hardware (what the mesh wants first)
    demand_ttl_s: float = DEMAND_TTL_S  # --demand-ttl: a model no request named this long is no longer wanted
    public: Public = field(default_factory=Public)  # --publish, --mesh-name, --region, --max-clients, --nostr-relay

    @property
    def in_mesh(self) -> bool:
        return bool(self.models or self.auto or self.joins or self.client or self.blackboard or self.public.publish)

    @property
    def role(self) -> str:
        # A client with nobody to join starts the mesh, so it must be a member others can gossip with. A member
        # with no model is a standby: it lends capacity and promotes itself to serve what the mesh wants.
        if self.client:
            return "client" if self.joins else "host"
        return "host" if self.models or self.auto else "standby"

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
        self.state.models_on_disk = models.on_disk(config.models_dir)
        self.mesh: Mesh | None = None
        if config.in_mesh:
            tokens = tuple(decode_token(t) for t in config.joins)  # a bad token fails here, clearly
            self.mesh = Mesh(
                self.identity,
                meshfile.for_node(config.home, tokens, self.identity.public_bytes),
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
            self.state.peers = self.mesh.peer_table
            self.state.traffic = self._traffic
            self.state.mesh = console_view.provider(self.mesh, self.state)
        else:
            self.state.mesh = console_view.standalone(self.state, config.role)
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
        self.serving = Serving(
            ServingSetup(
                state=self.state,
                hardware=self.hardware,
                home=config.home,
                models_dir=config.models_dir,
                server=config.server,
                mesh=self.mesh,
                client=config.client,
                split=config.split,
                threads=config.threads,
                draft=config.draft,
                on_download=self.bars.download,
                demand_ttl_s=config.demand_ttl_s,
            )
        )
        self.state.standby = self.serving.standby_status
        # Clients' demand: a client pushes its view to members, a member absorbs what clients push (its handler is
        # registered here, before the mesh listens).
        self.demand_link: DemandLink | None = None
        if self.mesh is not None:
            self.demand_link = DemandLink(self.mesh, self.serving.demand.publish, self.serving.demand.absorb_client)

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
                self.serving.setup.dataplane_port = self.rpc_link.port  # split workers fetch tensors there
                self.serving.setup.dataplane_targets = self.rpc_link.dataplane.targets  # and hand off to us
            if self.board is not None and self.board_link is not None:
                tg.start_soon(self._run_board, self.board)
                tg.start_soon(self.board_link.run)
            on_demand = None if self.mesh is None else connect_demand(self.serving.demand, self.mesh, self.state)
            if self.demand_link is not None and cfg.role == "client":
                tg.start_soon(self.demand_link.run)  # a client's requests become the mesh's demand
            if self.mesh is not None:
                for actor in public_actors(self.mesh, cfg.public, self._wanted, self._in_flight, SYSTEM_CLOCK):
                    tg.start_soon(self._once_joined, self.mesh, actor)
            api = build_api(self.state, None if self.mesh is None else MeshDirectory(self.mesh), on_demand=on_demand)
            if self.mesh is not None:
                self.mesh.api_app = api  # requests tunnelled from peers: the OpenAI/Anthropic API only
            listen_all = cfg.host in ("0.0.0.0", "::")
            mount = McpMount(api, self.state, allow_remote=listen_all)
            tg.start_soon(mount.run)
            # The guard is outside the MCP mount, so /mcp is checked like /v1 (Host, Origin, key, body size).
            policy = Policy(listen_all, cfg.api_keys, cfg.no_auth, frozenset(cfg.cors_origins))
            api_app = HttpGuard(mount, policy, API)
            # The console's chat goes to the API app inside the guard: the console's guard already checked the request.
            console_app = HttpGuard(build_console(self.state, self, self.board, api=api), policy, CONSOLE)
            api_port = await tg.start(serve_http, api_app, cfg.host, cfg.api_port)
            console_port = await tg.start(serve_http, console_app, cfg.host, cfg.console_port)
            log_exposure(policy, api_port, console_port)
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
                self.hardware.describe(),
            )
            write_runtime(
                cfg.home, RuntimeInfo(os.getpid(), self.identity.node_id, self.state.api_url, self.state.console_url)
            )
            tg.start_soon(withdraw_on_exit, cfg.home)
            if self.mesh is not None:
                tg.start_soon(self._print_token, self.mesh)
            task_status.started()
            if cfg.client:
                await anyio.sleep_forever()  # a client serves nothing and builds no llama.cpp
            tg.start_soon(throughput.measure, self.state)  # each served model's decode tokens/s, for the console
            for spec in cfg.models:
                tg.start_soon(self.serving.serve, spec)
            if cfg.auto and not cfg.models:
                tg.start_soon(self.serving.auto)
            elif not cfg.models:
                tg.start_soon(self.serving.standby)
            if cfg.models or cfg.auto or self.rpc_link is not None:
                await self._build_llama()

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
        if self.rpc_link is not None:
            self.rpc_link.llama = llama  # this node can lend rpc-servers from now on
        if self.shard_link is not None:
            self.shard_link.llama = llama  # and serve expert shards
        # "fallback": serving on a more portable build because a better one failed its self-test here.
        state = "fallback" if llama.fallback else "ready"
        self.state.set_info(llama_cpp={**llama.public(), "cpu": self.cpu.public(), "state": state})
        what = f"{llama.version} ({llama.backend}, {llama.variant} build)" if llama.variant else "external binaries"
        log.info("llama.cpp: %s in %s; self-test: %s", what, llama.bin_dir, llama.selftest)
        self.serving.llama_ready(llama)

    async def _run_board(self, board: Board) -> None:
        self.state.set_info(blackboard={"state": "loading"})
        async with anyio.create_task_group() as tg:
            await tg.start(board.run)  # started once the scrubber is loaded (or could not be)
            if board.unavailable is not None:
                self.state.set_info(blackboard={"state": "unavailable", "detail": board.unavailable})
                return
            self.state.set_info(blackboard={"state": "ready"})
            log.info("blackboard ready (%s)", self.config.home / BLACKBOARD_DB)

    def drop(self, requested: str) -> str:
        """Stop serving a model (its llama-server is terminated); returns its name."""
        return self.serving.drop(requested)

    def _wanted(self, now: float) -> list[str]:
        """The models the mesh wants now, hottest first (a listing's `wanted`)."""
        return [w.name for w in self.serving.demand.mesh_map(now).wanted(now, self.config.demand_ttl_s)]

    def _in_flight(self) -> int:
        return sum(m.in_flight for m in self.state.models.values())

    @staticmethod
    async def _once_joined(mesh: Mesh, actor: Callable[[], Awaitable[None]]) -> None:
        await mesh.joined.wait()
        await actor()

    async def _print_token(self, mesh: Mesh) -> None:
        """The invite token alone on its own line of stdout (easy to copy, easy to script), once this node is a
        member: at once in a mesh it created or restarted in, after the join succeeded otherwise (a refused
        join prints none)."""
        await mesh.joined.wait()
        token = mesh.invite_token()
        print(token, flush=True)
        self.state.set_info(invite_token=token)  # after the print: whoever sees it in the status finds it printed
        log.info("invite token printed above: `mesh-llm --join TOKEN` adds a machine")
        while self.config.client:  # a client's token names members: the console shows one naming the live ones
            await anyio.sleep(CLIENT_TOKEN_REFRESH_S)
            if (fresh := mesh.invite_token()) != self.state.invite_token:
                self.state.set_info(invite_token=fresh)

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


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


async def while_searching(
    choose: Callable[[], Awaitable[T]], home: Path, name: str | None, host: str, ports: tuple[int, int], policy: Policy
) -> T:
    """`choose()` (`--auto` looking for a mesh) while this node's API and console answer that it is searching
    (`api/searching.py`, behind the node's own guard), so nobody meets a refused connection; the ports are free
    again when it returns, for the node's real apps."""
    identity = load_or_create(home)
    searching = Searching(identity.node_id, name or os.uname().nodename, __version__)
    api = HttpGuard(searching_api(searching), policy, API)
    console = HttpGuard(searching_console(searching), policy, CONSOLE)
    async with anyio.create_task_group() as tg:
        api_port = await tg.start(serve_http, api, host, ports[0])
        console_port = await tg.start(serve_http, console, host, ports[1])
        log.info(
            "--auto: looking for a mesh; console http://%s:%d (API :%d) says so meanwhile",
            _display_host(host),
            console_port,
            api_port,
        )
        failed: Exception | None = None
        try:
            chosen = await choose()
        except Exception as exc:  # raised as itself below, not inside the task group's ExceptionGroup
            failed = exc
        finally:
            tg.cancel_scope.cancel()
    if failed is not None:
        raise failed
    return chosen

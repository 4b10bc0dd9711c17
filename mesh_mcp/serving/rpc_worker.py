"""Pipeline splits over the mesh: a worker lends an rpc-server to a host for as long as the host
holds a lease on it.

Streams (QUIC control plane):
- `rpc-lease`: the host asks `{"t": "rpc-lease", "split": ID, "file": NAME, "size": BYTES,
  "layers": [FIRST, LAST] | null, "source_port": PORT?}`. The worker finds the GGUF in its models
  directory (same name and size) and pre-seeds its rpc cache with the tensors of those layers (so no
  weight crosses the network at load). Without the file it fetches just those tensors into the cache
  (`tensor_fetch.py`) from a peer that has it: the host first, at `source_port` (its data plane;
  absent: the host's mesh port number), then members whose records list the file. Then it starts a
  ggml-rpc-server on 127.0.0.1, registers it with its data plane under `ID`, and answers
  `{"ok": true, "port": DATA_PLANE_PORT, "target": ID, "seeded": N}` (or `{"ok": false, "error": ...}`).
  With `"next": {"node": ID, "target": NAME, "port": PORT}` (the stage after this one: another worker's
  rpc-server or the host's own, registered with that node's data plane as NAME, PORT its data plane) the
  rpc-server hands its stage's output straight to that stage (llama.cpp/pin.toml, the hand-off edits): the
  worker opens a *peer link* for it (`Relay` with `peer_name`: 127.0.0.1 → TLS → NAME on that node, at an
  address the node gossips) and gives it to the rpc-server as MESH_LLM_RPC_PEER_LINK; the answer then says
  `"peer_link": true`. The stream stays open: it *is* the lease (both halves: `lease.py`). When the host ends it, its
  connection dies, or membership declares the host dead (`Mesh.cancel_when_gone`: seconds, not QUIC's
  idle timeout) the worker stops that rpc-server.

Every node's data plane also serves its models' tensors to peers that lack them
(`tensor_fetch.TensorService`, the data-plane service `tensors`). The bytes of llama.cpp RPC and of
tensors never travel on QUIC: they go over the data plane (`mesh_mcp/dataplane/`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from inference.llamacpp import LlamaCpp
from inference.rpc_server import RpcServer, RpcSettings
from mesh_mcp.dataplane import native
from mesh_mcp.dataplane.listener import DataPlaneServer
from mesh_mcp.dataplane.relay import PEER_NAME_MAX, Relay
from mesh_mcp.dataplane.tensor_fetch import REQUEST as TENSORS
from mesh_mcp.dataplane.tensor_fetch import FetchResult, TensorFetch, TensorService, fetch
from mesh_mcp.errors import BackendError, ConfigError, MeshLLMError, ProtocolError
from mesh_mcp.mesh import wire
from mesh_mcp.mesh.runtime import Mesh
from mesh_mcp.mesh.tokens import split_address
from mesh_mcp.mesh.transport import PeerConnection
from mesh_mcp.serving.lease import Grant, hold, lease_id, local_copy, requested_file

log = logging.getLogger("mesh_llm.split")

LEASE_START_TIMEOUT_S = 600.0  # seeding a large model's cache and starting rpc-server
MAX_RESTART_MODELS = 64  # models whose rpc-server restarts are counted apart (as metrics' model labels); then "other"


@dataclass(frozen=True)
class Lease:
    node_id: str
    target: str
    address: str  # host:port of the worker's data plane
    seeded: int  # tensors the worker had (or wrote) in its cache
    peer_link: bool = False  # its rpc-server hands its output to the `next` stage the lease named


@dataclass(frozen=True)
class NextStage:
    """The stage after a worker's: the rpc-server registered as `target` with the data plane of `node_id`,
    which listens on `port` (at the addresses the node gossips)."""

    node_id: str
    target: str
    port: int

    def wire(self) -> dict[str, Any]:
        return {"node": self.node_id, "target": self.target, "port": self.port}


class RpcLink:
    """The worker's half. Needs llama.cpp built before it can lend."""

    def __init__(self, mesh: Mesh, models_dir: Path, home: Path) -> None:
        self.mesh, self.models_dir, self.home = mesh, models_dir, home
        self.llama: LlamaCpp | None = None
        self.threads: int | None = None
        self.on_fetch_progress: Callable[[int, int], None] | None = None  # (bytes done, total) of a fetch
        self.dataplane = DataPlaneServer(
            mesh.identity,
            lambda: mesh.transport.creds,
            host=mesh.settings.host,
            known_sources=mesh.transport.known_sources,  # members' addresses: reserved pre-auth slots
        )
        self.tensors = TensorService(models_dir, home / "rpc-cache")  # peers without a file fetch from us
        self.dataplane.services[TENSORS] = self.tensors
        self.port = 0
        self._tg: anyio.abc.TaskGroup | None = None
        # rpc-server restarts by model (the GGUF's stem): of leases that ended, and the servers of those running
        self._restarted: dict[str, int] = {}
        self._running: dict[int, tuple[str, RpcServer]] = {}  # id(server) -> (model, server): leases now
        mesh.transport.handlers.update({"rpc-lease": self._on_lease})
        # For the node's metrics (read through `Mesh.peer_table`): data-plane bytes by host, restarts by model.
        mesh.peer_stats["dataplane_bytes"] = lambda: {
            n: {"in": i, "out": o} for n, (i, o) in self.dataplane.peer_bytes().items()
        }
        mesh.own_stats["rpc_server_restarts"] = self.restarts

    def restarts(self) -> dict[str, int]:
        """rpc-server restarts by model since this node started, lent servers that ended included; at most
        `MAX_RESTART_MODELS` models, any further counted as `other`."""
        out = dict(self._restarted)
        for model, server in list(self._running.values()):
            out[model] = out.get(model, 0) + server.restarts
        return out

    def _count_restarts(self, model: str, n: int) -> None:
        if model not in self._restarted and len(self._restarted) >= MAX_RESTART_MODELS:
            model = "other"
        self._restarted[model] = self._restarted.get(model, 0) + n

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.port = await self._listen()
        log.info("RPC data plane listening on TCP %d", self.port)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._native_splice)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self.dataplane.close()

    async def _native_splice(self) -> None:
        """Build (first start on this machine) or load the data plane's C splice before a split needs it."""
        if await anyio.to_thread.run_sync(native.available):
            log.info("data plane: tunnels splice in C (AES-256-GCM records) with peers that can too")

    async def _listen(self) -> int:
        """The data plane takes the mesh's UDP port number on TCP when it is free — one number to open
        in a firewall (UDP for the mesh, TCP for splits), pinned by `--bind-port` — else any port
        (the lease reply carries it)."""
        mesh_port = self.mesh.transport.port
        if mesh_port:
            self.dataplane.requested_port = mesh_port
            try:
                return await self.dataplane.start()
            except ConfigError as exc:
                log.info("%s; the data plane takes another port", exc)
        self.dataplane.requested_port = 0
        return await self.dataplane.start()

    async def _on_lease(
        self, conn: PeerConnection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        grant = Grant(self.mesh, conn, reader, writer)
        host = grant.holder
        split = lease_id(header, "split", "split")
        name, size = requested_file(header)
        layers = header.get("layers")
        if layers is not None and not (
            isinstance(layers, list) and len(layers) == 2 and all(isinstance(x, int) and x >= 0 for x in layers)
        ):
            raise ProtocolError("layers is [first, last] or null")
        next_stage = parse_next_stage(header.get("next"))
        with grant.refusals():
            if self.llama is None:
                raise BackendError("llama.cpp is not built on this node yet")
            link_remote = None
            if next_stage is not None:
                try:
                    link_remote = self._stage_address(next_stage)
                except (ProtocolError, MeshLLMError) as exc:  # the host then relays this stage's output itself
                    log.warning("split %s: no hand-off to the next stage: %s", split, exc)
            path = local_copy(self.models_dir, name, size)
            if path is not None:
                n_cached = await self._seed(split, host, path, layers)
            else:
                source_port = header.get("source_port")
                port = source_port if isinstance(source_port, int) and 0 < source_port < 65536 else 0
                n_cached = await self._fetch(split, host, name, size, layers, port)
            link: Relay | None = None
            env: tuple[tuple[str, str], ...] = ()
            if next_stage is not None and link_remote is not None:
                link = Relay(
                    self.mesh.identity,
                    lambda: self.mesh.transport.creds,
                    link_remote,
                    next_stage.target,
                    expect_node_id=next_stage.node_id,
                    bind_host=None if self.mesh.settings.host in ("0.0.0.0", "::") else self.mesh.settings.host,
                    peer_name=next_stage.target,
                )
                env = (("MESH_LLM_RPC_PEER_LINK", f"127.0.0.1:{await link.start()}"),)
                log.info("split %s: this stage hands its output to %s on %s", split, next_stage.target, link_remote)
            settings = RpcSettings(threads=self.threads, env=env)
            server = RpcServer(self.llama, self.home, settings, name=f"rpc-server-{split}")
            model = name.removesuffix(".gguf")
            self._running[id(server)] = (model, server)
            # The lease is held while the host keeps this stream open and membership holds it alive: a host
            # declared dead ends it at once, whatever its connection still looks like.
            lent = False
            try:
                with grant.held() as gone:
                    async with anyio.create_task_group() as tg:
                        await tg.start(server.run)
                        if server.endpoint is not None and server.port is not None:
                            lent = True
                            self.dataplane.targets[split] = server.port
                            grant.ready(port=self.port, target=split, seeded=n_cached, peer_link=link is not None)
                            log.info("lent rpc-server %s (127.0.0.1:%d) to %s", split, server.port, host)
                            try:
                                await grant.until_closed()
                            finally:
                                self.dataplane.targets.pop(split, None)
                        tg.cancel_scope.cancel()
            finally:
                del self._running[id(server)]
                self._count_restarts(model, server.restarts)
                if link is not None:
                    with anyio.CancelScope(shield=True):
                        await link.close()
            if not lent and not gone.cancel_called:  # raised here, not inside the task group (an ExceptionGroup)
                raise BackendError(f"rpc-server did not start; see {server.log_path}")
            why = "its host was declared dead" if gone.cancel_called else f"lease ended by {host}"
            log.info("split %s: %s; rpc-server stopped", split, why)

    async def _seed(self, split: str, host: str, path: Path, layers: list[int] | None) -> int:
        from inference.rpc_cache import seed  # numpy: loaded when a host first asks, not at start-up

        span = range(layers[0], layers[1] + 1) if layers else None
        t0 = time.monotonic()
        seeded = await anyio.to_thread.run_sync(lambda: seed(path, self.home / "rpc-cache", span))
        log.info(
            "split %s for %s: cache has %d tensor(s) of layers %s (%d written, %.1f s)",
            split,
            host,
            len(seeded.files),
            layers,
            len(seeded.written),
            time.monotonic() - t0,
        )
        return len(seeded.files)

    async def _fetch(
        self, split: str, host: str, name: str, size: int, layers: list[int] | None, host_port: int
    ) -> int:
        """Without the file: the tensors of `layers` from a peer that has it (`tensor_fetch.py`) into our
        rpc cache — the host first (its data plane at `host_port`), then members that gossip the file."""
        span = (layers[0], layers[1]) if layers else None
        what = f"layers {span[0]}-{span[1]}" if span else "all layers"
        bind_host = None if self.mesh.settings.host in ("0.0.0.0", "::") else self.mesh.settings.host
        errors = []
        for node_id, remote in self._sources(host, host_port, name):
            log.info("split %s: %s is not on this node; fetching the tensors of %s from %s", split, name, what, node_id)
            job = TensorFetch(
                self.mesh.identity,
                lambda: self.mesh.transport.creds,
                remote,
                file=name,
                size=size,
                layers=span,
                cache_dir=self.home / "rpc-cache",
                expect_node_id=node_id,
                bind_host=bind_host,
                on_progress=self.on_fetch_progress,
            )
            try:
                got: FetchResult = await fetch(job)
            except MeshLLMError as exc:
                log.warning("split %s: no tensors from %s at %s: %s", split, node_id, remote, exc)
                errors.append(f"{node_id} at {remote}: {exc}")
                continue
            log.info(
                "split %s: fetched %d tensor(s) of %s (%.1f MB) from %s in %.1f s (%.0f MB/s); %d (%.1f MB) were "
                "already in the cache",
                split,
                got.fetched,
                what,
                got.fetched_bytes / 1e6,
                node_id,
                got.seconds,
                got.mb_s,
                got.present,
                got.present_bytes / 1e6,
            )
            return len(got.files)
        raise BackendError(
            f"this node does not have {name} ({size} bytes) in {self.models_dir}, and no peer sent the tensors of "
            f"{what}: " + ("; ".join(errors) or "no member of the mesh gossips that it has the file")
        )

    def _stage_address(self, stage: NextStage) -> str:
        """Where the next stage's data plane is: its first gossiped address, at its data-plane port. A node
        that is not a live member is refused (a host cannot point a worker anywhere else)."""
        record = self.mesh.gossip.record(stage.node_id) if self.mesh.gossip is not None else None
        if record is None or record.leaving or not record.addresses:
            raise ProtocolError(f"the next stage's node {stage.node_id} is not a live member of this mesh")
        ip, _ = split_address(record.addresses[0])
        return f"[{ip}]:{stage.port}" if ":" in ip else f"{ip}:{stage.port}"

    def _sources(self, host: str, host_port: int, name: str) -> list[tuple[str, str]]:
        """(node id, data-plane address) to fetch `name` from, best first: the host that asked (at the
        port its lease gave), then live members whose records list the file (at their mesh port number:
        a data plane takes it on TCP when it is free), each at every address it gossips."""
        gossip = self.mesh.gossip
        stem = name.removesuffix(".gguf")
        nodes = [(host, host_port)] + [
            (r.node_id, 0)
            for r in self.mesh.members()
            if r.node_id not in (host, self.mesh.identity.node_id)
            and stem in r.models_on_disk
            and not r.leaving
            and r.role != "client"
        ]
        out: list[tuple[str, str]] = []
        for node_id, port in nodes:
            record = gossip.record(node_id) if gossip is not None else None
            for address in record.addresses if record is not None else ():
                try:
                    ip, mesh_port = split_address(address)
                except MeshLLMError:
                    continue
                remote = f"[{ip}]:{port or mesh_port}" if ":" in ip else f"{ip}:{port or mesh_port}"
                if (node_id, remote) not in out:
                    out.append((node_id, remote))
        return out


def parse_next_stage(value: object) -> NextStage | None:
    """The lease's `next` (absent: the stock relay through the host), checked."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("next is {node, target, port} or absent")
    node = wire.field(value, "node", str, 128)
    target = wire.field(value, "target", str, PEER_NAME_MAX)
    port = wire.field(value, "port", int)
    if not node or not target or len(target.encode()) > PEER_NAME_MAX or not 0 < port < 65536:
        raise ProtocolError("next names a node, a target and a port in 1-65535")
    return NextStage(node, target, port)


@asynccontextmanager
async def lease(
    mesh: Mesh,
    node_id: str,
    split: str,
    model: Path,
    layers: tuple[int, int] | None,
    *,
    source_port: int = 0,
    next_stage: NextStage | None = None,
) -> AsyncIterator[Lease]:
    """Hold an rpc-server on `node_id` for the duration of the context. `source_port`: this node's
    data plane, where a worker without the file fetches its layers' tensors. `next_stage`: where its
    rpc-server hands its output (None: back through the host, as stock llama.cpp RPC does)."""
    request = {
        "split": split,
        "file": model.name,
        "size": model.stat().st_size,
        "layers": list(layers) if layers else None,
        **({"source_port": source_port} if source_port else {}),
        **({"next": next_stage.wire()} if next_stage is not None else {}),
    }
    async with hold(
        mesh, node_id, "rpc-lease", request, reply_within_s=LEASE_START_TIMEOUT_S, refused="cannot take part"
    ) as held:
        reply = held.reply
        port = wire.field(reply, "port", int)
        host = held.addresses[0].rsplit(":", 1)[0]  # the data plane listens on the mesh interface
        yield Lease(
            node_id,
            wire.field(reply, "target", str, 64),
            f"{host}:{port}",
            wire.field(reply, "seeded", int),
            reply.get("peer_link") is True,
        )

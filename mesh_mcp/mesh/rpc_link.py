"""Pipeline splits over the mesh: a worker lends an rpc-server to a host for as long as the host
holds a lease on it, and either side measures its RTT to a peer.

Streams (QUIC control plane):
- `ping`: answered at once with `{"t": "pong"}`; RTT samples for placement.
- `rpc-lease`: the host asks `{"t": "rpc-lease", "split": ID, "file": NAME, "size": BYTES,
  "layers": [FIRST, LAST] | null}`. The worker finds the GGUF in its models directory (same name and
  size), pre-seeds its rpc cache with the tensors of those layers (so no weight crosses the network
  at load), starts a ggml-rpc-server on 127.0.0.1, registers it with its data plane under `ID`, and
  answers `{"ok": true, "port": DATA_PLANE_PORT, "target": ID, "seeded": N}` (or `{"ok": false,
  "error": ...}`). The stream stays open: it *is* the lease. When the host ends it (or its
  connection dies) the worker stops that rpc-server.

The bytes of llama.cpp RPC never travel here: they go over the data plane (`dataplane.py`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from inference.errors import BackendError, ConfigError, MeshLLMError, ProtocolError
from inference.llamacpp import LlamaCpp
from inference.rpc_server import RpcServer, RpcSettings

from . import wire
from .dataplane import DataPlaneServer
from .quic import Connection, close_quietly
from .runtime import Mesh
from .wire import encode_json, read_json

log = logging.getLogger("mesh_llm.split")

LEASE_START_TIMEOUT_S = 600.0  # seeding a large model's cache and starting rpc-server
_SPLIT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Lease:
    node_id: str
    target: str
    address: str  # host:port of the worker's data plane
    seeded: int  # tensors the worker had (or wrote) in its cache


class RpcLink:
    """The worker's half (and the ping answer). Needs llama.cpp built before it can lend."""

    def __init__(self, mesh: Mesh, models_dir: Path, home: Path) -> None:
        self.mesh, self.models_dir, self.home = mesh, models_dir, home
        self.llama: LlamaCpp | None = None
        self.threads: int | None = None
        self.dataplane = DataPlaneServer(mesh.identity, lambda: mesh.transport.creds, host=mesh.settings.host)
        self.port = 0
        self._tg: anyio.abc.TaskGroup | None = None
        mesh.transport.handlers.update({"ping": self._on_ping, "rpc-lease": self._on_lease})

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.port = await self._listen()
        log.info("RPC data plane listening on TCP %d", self.port)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self.dataplane.close()

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

    async def _on_ping(
        self, conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(encode_json({"t": "pong"}))
        writer.write_eof()

    async def _on_lease(
        self, conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert conn.peer is not None
        split = wire.field(header, "split", str, 64)
        if not _SPLIT_ID.fullmatch(split):
            raise ProtocolError("a split id is 1-64 letters, digits, dots, dashes or underscores")
        name = Path(wire.field(header, "file", str, 255)).name
        size = wire.field(header, "size", int)
        layers = header.get("layers")
        if layers is not None and not (
            isinstance(layers, list) and len(layers) == 2 and all(isinstance(x, int) and x >= 0 for x in layers)
        ):
            raise ProtocolError("layers is [first, last] or null")
        try:
            if self.llama is None:
                raise BackendError("llama.cpp is not built on this node yet")
            path = self.models_dir / name
            if not path.is_file() or path.stat().st_size != size:
                raise BackendError(f"this node does not have {name} ({size} bytes) in {self.models_dir}")
            from inference.rpc_cache import seed  # numpy: loaded when a host first asks, not at start-up

            span = range(layers[0], layers[1] + 1) if layers else None
            t0 = time.monotonic()
            seeded = await anyio.to_thread.run_sync(lambda: seed(path, self.home / "rpc-cache", span))
            log.info(
                "split %s for %s: cache has %d tensor(s) of layers %s (%d written, %.1f s)",
                split,
                conn.peer.node_id,
                len(seeded.files),
                layers,
                len(seeded.written),
                time.monotonic() - t0,
            )
            server = RpcServer(self.llama, self.home, RpcSettings(threads=self.threads), name=f"rpc-server-{split}")
            async with anyio.create_task_group() as tg:
                await tg.start(server.run)
                if server.endpoint is None or server.port is None:
                    raise BackendError(f"rpc-server did not start; see {server.log_path}")
                self.dataplane.targets[split] = server.port
                writer.write(encode_json({"ok": True, "port": self.port, "target": split, "seeded": len(seeded.files)}))
                log.info("lent rpc-server %s (127.0.0.1:%d) to %s", split, server.port, conn.peer.node_id)
                try:
                    await _until_closed(reader)  # the lease: held while the host keeps this stream open
                finally:
                    self.dataplane.targets.pop(split, None)
                    log.info("split %s: lease ended by %s; rpc-server stopped", split, conn.peer.node_id)
                    tg.cancel_scope.cancel()
        except MeshLLMError as exc:
            writer.write(encode_json({"ok": False, "error": str(exc)}))
            writer.write_eof()


async def _until_closed(reader: asyncio.StreamReader) -> None:
    while await reader.read(4096):
        pass


async def ping(mesh: Mesh, node_id: str, samples: int = 3) -> float:
    """Median round trip to `node_id` over the mesh, in ms (a fresh connection is dialled first)."""
    record = mesh.gossip.record(node_id) if mesh.gossip is not None else None
    conn = await mesh.transport.connect_any(node_id, record.addresses if record else ())
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        reader, writer = await conn.open_stream({"t": "ping"})
        writer.write_eof()
        reply = await read_json(reader)
        times.append((time.perf_counter() - t0) * 1000)
        close_quietly(writer)
        if reply.get("t") != "pong":
            raise ProtocolError("a ping was not answered with a pong")
    return sorted(times)[len(times) // 2]


@asynccontextmanager
async def lease(
    mesh: Mesh, node_id: str, split: str, model: Path, layers: tuple[int, int] | None
) -> AsyncIterator[Lease]:
    """Hold an rpc-server on `node_id` for the duration of the context."""
    record = mesh.gossip.record(node_id) if mesh.gossip is not None else None
    if record is None:
        raise BackendError(f"node {node_id} is not in the mesh")
    conn = await mesh.transport.connect_any(node_id, record.addresses)
    reader, writer = await conn.open_stream(
        {
            "t": "rpc-lease",
            "split": split,
            "file": model.name,
            "size": model.stat().st_size,
            "layers": list(layers) if layers else None,
        }
    )
    try:
        with anyio.fail_after(LEASE_START_TIMEOUT_S):
            reply = await read_json(reader)
        if reply.get("ok") is not True:
            raise BackendError(f"node {node_id} cannot take part: {reply.get('error', 'no reason given')}")
        port = wire.field(reply, "port", int)
        host = record.addresses[0].rsplit(":", 1)[0]  # the data plane listens on the mesh interface
        yield Lease(node_id, wire.field(reply, "target", str, 64), f"{host}:{port}", wire.field(reply, "seeded", int))
    finally:
        close_quietly(writer)

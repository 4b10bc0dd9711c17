"""Leases over the mesh, both halves: a peer lends this node something (an rpc-server, an expert shard) for as long
as this node keeps one QUIC stream open to it.

The requesting side, `hold`: dial the peer (`Mesh.dial`; `PeerUnreachable` when it cannot be reached) with the
lease request as the stream header, wait — bounded — for the first reply, `{"ok": true, ...}` or
`{"ok": false, "error": ...}` (a `BackendError` naming the peer), and keep the stream open for the body of the
context: leaving it closes the stream, which ends the lease.

The granting side, `Grant`: read the parts every lease request shares (`lease_id`, `requested_file`), answer
`ready(...)` once what is lent is up, hold it until the stream closes (`until_closed`) or membership declares the
holder dead (`held`: `Mesh.cancel_when_gone`), and turn a refusal (`MeshLLMError`, inside `refusals()`) into
`{"ok": false, "error": ...}` and the end of the stream.

What is leased, the rest of its request and of its reply, and its caches are the callers': `rpc_worker.py` (an
rpc-server for a pipeline split), `shard_node.py` (an expert shard).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from mesh_mcp.errors import BackendError, MeshLLMError, ProtocolError
from mesh_mcp.mesh import wire
from mesh_mcp.mesh.runtime import Mesh
from mesh_mcp.mesh.transport import PeerConnection
from mesh_mcp.mesh.wire import close_quietly, encode_json, read_json

DIAL_S = 30.0  # reaching the peer: a dial of every address it gossips, with the handshake
_LEASE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Held:
    """A lease this node holds: the peer's first reply and the open stream (closing it ends the lease)."""

    node_id: str
    reply: dict[str, Any]
    addresses: tuple[str, ...]  # the peer's gossiped mesh addresses ("host:port") when the lease was asked
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@asynccontextmanager
async def hold(
    mesh: Mesh, node_id: str, stream_type: str, request: dict[str, Any], *, reply_within_s: float, refused: str
) -> AsyncIterator[Held]:
    """Ask `node_id` for a lease (`request`: the stream header without `t`) and hold it for the context.
    `reply_within_s`: how long the peer may take to get what it lends ready; `refused`: what a refusal means,
    as in "node N {refused}: {its reason}"."""
    record = mesh.gossip.record(node_id) if mesh.gossip is not None else None
    if record is None:
        raise BackendError(f"node {node_id} is not in the mesh")
    reader, writer = await mesh.dial(node_id, stream_type, within_s=DIAL_S, **request)
    try:
        with anyio.fail_after(reply_within_s):
            reply = await read_json(reader)
        if reply.get("ok") is not True:
            raise BackendError(f"node {node_id} {refused}: {reply.get('error', 'no reason given')}")
        yield Held(node_id, reply, record.addresses, reader, writer)
    finally:
        close_quietly(writer)


def lease_id(header: dict[str, Any], key: str, what: str) -> str:
    """The lease's id from the request (`key`): also a file and data-plane target name, so 1-64 safe characters."""
    value: str = wire.field(header, key, str, 64)
    if not _LEASE_ID.fullmatch(value):
        raise ProtocolError(f"a {what} id is 1-64 letters, digits, dots, dashes or underscores")
    return value


def requested_file(header: dict[str, Any]) -> tuple[str, int]:
    """The model file a lease request names: its bare name (never a path) and its size in bytes."""
    return Path(wire.field(header, "file", str, 255)).name, wire.field(header, "size", int)


def local_copy(models_dir: Path, name: str, size: int) -> Path | None:
    """This node's copy of the file a lease names, when it has one of that size."""
    path = models_dir / name
    return path if path.is_file() and path.stat().st_size == size else None


class Grant:
    """The granting side of one lease stream, from its holder (the peer that opened it)."""

    def __init__(
        self, mesh: Mesh, conn: PeerConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert conn.peer is not None
        self.mesh, self.reader, self.writer = mesh, reader, writer
        self.holder: str = conn.peer.node_id

    @contextlib.contextmanager
    def refusals(self, on_refused: Callable[[MeshLLMError], object] | None = None) -> Iterator[None]:
        """A `MeshLLMError` raised inside is the lease's refusal: sent as `{"ok": false, "error": ...}`, then the
        stream ends (after `on_refused`, e.g. a log line)."""
        try:
            yield
        except MeshLLMError as exc:
            if on_refused is not None:
                on_refused(exc)
            self.writer.write(encode_json({"ok": False, "error": str(exc)}))
            self.writer.write_eof()

    def held(self) -> contextlib.AbstractContextManager[anyio.CancelScope]:
        """Around what is lent: cancelled when membership declares the holder dead (seconds, not QUIC's idle
        timeout), whatever its connection still looks like; `.cancel_called` says afterwards whether it was."""
        return self.mesh.cancel_when_gone(self.holder)

    def ready(self, **reply: Any) -> None:
        """What is lent is up: `{"ok": true, **reply}`."""
        self.writer.write(encode_json({"ok": True, **reply}))

    async def next_message(self) -> dict[str, Any] | None:
        """The holder's next message; None when the stream ended (or carried something that is not one)."""
        with contextlib.suppress(ConnectionError, ProtocolError, asyncio.IncompleteReadError, EOFError):
            return await read_json(self.reader)
        return None

    async def until_closed(self) -> None:
        """Hold until the holder ends the stream; a reset (the holder shutting down) ends it too."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(4096):
                pass

"""The seam between membership and the wire, as typing Protocols: what `Mesh` and the planes above it need of a
transport (`Transport`) and of one authenticated connection to a peer (`PeerConnection`), and the one way a
served stream is dispatched to its handler (`serve_stream`).

Two implementations satisfy it: `quic.MeshTransport` (QUIC over UDP, the node's) and the in-memory transport
`mesh_mcp.testing.MemoryNetwork` hands out (many nodes in one process, with latency, loss and partitions).
Code above the transport types its connections as `PeerConnection`, so either runs under it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mesh_mcp.errors import ProtocolError

from .credentials import Credentials
from .handshake import Peer
from .wire import close_quietly, read_json

log = logging.getLogger("mesh_llm.quic")


@dataclass
class Traffic:
    """Bytes of UDP datagrams (QUIC: control plane, gossip, tunnelled API requests) a transport sent and received."""

    bytes_in: int = 0
    bytes_out: int = 0
    datagrams_in: int = 0
    datagrams_out: int = 0

    def add_in(self, n: int) -> None:
        self.bytes_in += n
        self.datagrams_in += 1

    def add_out(self, n: int) -> None:
        self.bytes_out += n
        self.datagrams_out += 1


class PeerConnection(Protocol):
    """One authenticated connection to a peer. Each stream starts with a JSON header whose `t` picks the handler
    on the other side."""

    @property
    def peer(self) -> Peer | None:
        """Who is at the other end (set once the handshake proved it)."""
        ...

    @property
    def remote(self) -> str:
        """The address dialled, or the one the peer came from (for logs)."""
        ...

    @property
    def closed_event(self) -> asyncio.Event:
        """Set once the connection ended, whoever ended it."""
        ...

    async def open_stream(self, header: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new stream whose header frame is already written. `PeerUnreachable` when the connection has closed."""
        ...

    def stream_closed(self, stream_id: int) -> asyncio.Event:
        """Set when the peer resets the stream or the connection dies (not on a clean EOF)."""
        ...

    def reset(self, writer: asyncio.StreamWriter) -> None:
        """Abandon a stream both ways: the peer's reader fails and its `stream_closed` is set."""
        ...

    def transmit(self) -> None:
        """Send what is queued now."""
        ...

    def abort(self, reason: str) -> None:
        """Close now and fail every stream at once (a peer declared dead answers nothing)."""
        ...

    def close(self, error_code: int = ..., reason_phrase: str = ...) -> None:
        """Close with a reason the peer is told."""
        ...


StreamHandler = Callable[[PeerConnection, dict[str, Any], asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Transport(Protocol):
    """Authenticated connections to other nodes of one mesh: listens, dials, keeps one connection per peer pair in
    use, and serves the streams peers open with `handlers` (by the header's `t`)."""

    creds: Credentials  # what this node proves and accepts; a key rotation swaps it

    @property
    def handlers(self) -> dict[str, Any]:
        """Stream type → handler (`StreamHandler`); planes above add theirs."""
        ...

    @property
    def port(self) -> int:
        """The port this transport listens on (after `start`)."""
        ...

    @property
    def connections(self) -> Mapping[str, Sequence[PeerConnection]]:
        """Authenticated connections by the peer's node id (the last one is in use)."""
        ...

    @property
    def traffic(self) -> Traffic:
        """Bytes this transport sent and received."""
        ...

    async def start(self) -> int:
        """Listen; returns the port. Pair with `close()`."""
        ...

    async def close(self) -> None:
        """Close every connection (peers are told) and stop listening."""
        ...

    def connection(self, node_id: str) -> PeerConnection | None:
        """The connection in use to `node_id`, if any."""
        ...

    async def connect(self, address: str) -> PeerConnection:
        """Dial `host:port` and authenticate both ways. OSError when nobody answers, `AuthError` (a
        `HandshakeRefused` with its code) when the handshake fails."""
        ...

    async def connect_any(self, node_id: str | None, addresses: tuple[str, ...]) -> PeerConnection:
        """A connection to `node_id`: the one open, or the first of `addresses` that is that node (OSError if
        none)."""
        ...

    def known_sources(self) -> frozenset[str]:
        """Hosts of known members and connected peers (the data plane reserves slots for them)."""
        ...


# What builds a Mesh's transport: called with (creds, handlers, host=, port=, member_addresses=).
TransportFactory = Callable[..., Transport]


async def serve_stream(
    conn: PeerConnection,
    handlers: Mapping[str, StreamHandler],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Serve one stream a peer opened on an authenticated connection: read its header, run the handler its `t`
    names. A malformed header or a handler's failure resets that stream (logged), never the connection."""
    try:
        header = await read_json(reader)
        handler = handlers.get(str(header.get("t")))
        if handler is None:
            raise ProtocolError(f"unknown stream type {header.get('t')!r}")
        await handler(conn, header, reader, writer)
    except (ProtocolError, ConnectionError, asyncio.IncompleteReadError) as exc:
        log.warning("dropped a stream from %s: %s", conn.peer.node_id if conn.peer else conn.remote, exc)
        conn.reset(writer)
    except Exception:
        log.exception("stream handler failed")
        conn.reset(writer)
    finally:
        close_quietly(writer)


async def dial_any(transport: Transport, node_id: str | None, addresses: tuple[str, ...]) -> PeerConnection:
    """`Transport.connect_any` on top of `connection` and `connect`: reuse the connection open to `node_id`, else
    dial `addresses` in order until one answers as that node. OSError naming every failure otherwise."""
    if node_id is not None and (conn := transport.connection(node_id)) is not None:
        return conn
    errors = []
    for address in addresses:
        try:
            conn = await transport.connect(address)
        except OSError as exc:
            errors.append(str(exc))
            continue
        if node_id is not None and conn.peer is not None and conn.peer.node_id != node_id:
            conn.close(reason_phrase="unexpected node")
            errors.append(f"{address} is node {conn.peer.node_id}, not {node_id}")
            continue
        return conn
    raise OSError("; ".join(errors) or "no address to dial")

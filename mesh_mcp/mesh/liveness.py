"""Whether and how fast members answer: RTT sampling on `ping` streams, and acting on a member declared gone.

Every non-client node pings a few live members each second (`RttTable.due` says which: bounded, connected peers
first) and publishes the nearest in its record (`rtt`); a split keeps its workers measured (`keep_measuring`).
A member gossip declares dead or gone has its connections closed and whatever waits on it cancelled
(`cancel_when_gone`) at once, instead of after QUIC's idle timeout — unless it still answers a ping on its open
connection (`CONFIRM_S`): a slow heartbeat on a loaded machine must not turn into failed requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import anyio

from mesh_mcp.errors import PeerUnreachable, ProtocolError

from .rtt import TICK_S
from .transport import PeerConnection
from .wire import close_quietly, encode_json, read_json

if TYPE_CHECKING:
    from .runtime import Mesh

log = logging.getLogger("mesh_llm.mesh")

SEND_TIMEOUT_S = 3.0  # one dial and message to a peer (a gossip message, a ping, a blackboard push)
CONFIRM_S = 1.0  # a member declared dead has this long to answer a ping on its open connection before we act


class Liveness:
    """The mesh's view of which peers answer and how fast; `Mesh` delegates to it."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self._rtt_keep: Counter[str] = Counter()  # peers a split watches: measured every few seconds
        self._watching: dict[str, set[anyio.CancelScope]] = {}  # node id → scopes to cancel when it is gone

    # --- RTT ----------------------------------------------------------------------------------------

    async def pinger(self) -> None:
        """Measure RTT to a few live members each tick; publish the nearest when they changed enough."""
        mesh = self.mesh
        assert mesh.gossip is not None
        while True:
            await mesh.clock.sleep(TICK_S)
            now = mesh.clock.time()
            alive = [r.node_id for r in mesh.gossip.alive(now) if r.node_id != mesh.identity.node_id]
            mesh.rtt.prune(alive)
            batch = mesh.rtt.due(alive, mesh.transport.connections, now, keep=self._rtt_keep)
            async with anyio.create_task_group() as tg:
                for node_id in batch:
                    tg.start_soon(self._sample_rtt, node_id)
            if (rtt := mesh.rtt.report(mesh.clock.time(), len(alive) + 1)) is not None:
                mesh.gossip.update_self(mesh.clock.time(), rtt=rtt)

    @contextlib.contextmanager
    def keep_measuring(self, peers: Iterable[str]) -> Iterator[None]:
        """Measure `peers` every few seconds for as long as this is held (a split's workers)."""
        peers = list(peers)
        self._rtt_keep.update(peers)
        try:
            yield
        finally:
            self._rtt_keep.subtract(peers)
            self._rtt_keep = +self._rtt_keep

    async def _sample_rtt(self, node_id: str) -> None:
        try:
            with anyio.fail_after(SEND_TIMEOUT_S):
                self.mesh.rtt.observe(node_id, await self.ping(node_id), self.mesh.clock.time())
        except (PeerUnreachable, TimeoutError, ProtocolError) as exc:  # not reached; no pong in time; not a pong
            log.debug("ping %s failed: %s", node_id, exc)

    async def ping(self, node_id: str, samples: int = 3) -> float:
        """Median round trip to `node_id` over the mesh (application level: a stream each), in ms."""
        conn = await self.mesh.reach(node_id)
        times = sorted([await ping_once(conn) for _ in range(samples)])
        return times[len(times) // 2]

    async def on_ping(
        self, conn: PeerConnection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(encode_json({"t": "pong"}))
        writer.write_eof()

    # --- members declared gone ----------------------------------------------------------------------

    def gone(self, node_id: str, how: str) -> None:
        """Act on a member declared dead (or gone) at once, instead of waiting out QUIC's idle timeout: close its
        connections, so every stream on them fails now (in-flight requests end with an error, leases it held
        end), and cancel whatever waits on it (`cancel_when_gone`: dials, leases). A member that left said so; one
        declared dead while we hold a connection to it must first fail to answer a ping on it within
        `CONFIRM_S` (`_confirm_gone`): on a loaded machine gossip can be late while the node and its streams are
        fine, and cutting them would turn a slow heartbeat into failed requests."""
        connected = self.mesh.transport.connection(node_id) is not None
        if not (how == "died" and connected and self.mesh.spawn(self._confirm_gone, node_id)):
            self._act_gone(node_id, how)

    async def _confirm_gone(self, node_id: str) -> None:
        """While membership holds `node_id` dead: act once it stops answering pings on its connection (checked
        every `CONFIRM_S`); stop watching if it revives."""
        told = False
        while self.mesh.is_gone(node_id):  # asked of the facade: what the mesh holds
            conn = self.mesh.transport.connection(node_id)
            if conn is None or not await self._answers(conn):
                self._act_gone(node_id, "died")
                return
            if not told:
                told = True
                log.warning(
                    "member %s was declared dead but answers on its connection (a busy machine?): its streams go on",
                    node_id,
                )
            await self.mesh.clock.sleep(CONFIRM_S)

    async def _answers(self, conn: PeerConnection) -> bool:
        """Whether the peer answers a ping on this connection within `CONFIRM_S`."""
        try:
            with anyio.fail_after(CONFIRM_S):
                await ping_once(conn)
            return True
        except (PeerUnreachable, TimeoutError, ProtocolError):
            return False

    def _act_gone(self, node_id: str, how: str) -> None:
        conns = list(self.mesh.transport.connections.get(node_id, ()))
        for conn in conns:
            conn.abort(f"member {how}")
        scopes = self._watching.get(node_id, set())
        for scope in scopes:
            scope.cancel()
        if conns or scopes:
            log.info(
                "member %s %s: closed %d connection(s), ended %d wait(s) on it", node_id, how, len(conns), len(scopes)
            )

    def is_gone(self, node_id: str) -> bool:
        """Whether gossip has declared `node_id` dead or left (a node it never knew is not gone)."""
        gossip = self.mesh.gossip
        return (
            gossip is not None
            and gossip.record(node_id) is not None
            and not gossip.is_alive(node_id, self.mesh.clock.time())
        )

    @contextlib.contextmanager
    def cancel_when_gone(self, node_id: str) -> Iterator[anyio.CancelScope]:
        """A cancel scope that is cancelled when membership declares `node_id` dead or gone (at once if it is
        already): what waits on a peer — a dial, a lease it holds — ends within the detection time.
        `scope.cancel_called` tells the caller why it ended."""
        with anyio.CancelScope() as scope:
            self._watching.setdefault(node_id, set()).add(scope)
            try:
                if self.mesh.is_gone(node_id):
                    scope.cancel()
                yield scope
            finally:
                scopes = self._watching.get(node_id)
                if scopes is not None:
                    scopes.discard(scope)
                    if not scopes:
                        del self._watching[node_id]


async def ping_once(conn: PeerConnection) -> float:
    """One `ping` stream on `conn`: the round trip in ms. `PeerUnreachable` when the connection fails,
    `ProtocolError` unless a pong comes back. (A round trip of real I/O: timed on the CPU's counter.)"""
    t0 = time.perf_counter()
    reader, writer = await conn.open_stream({"t": "ping"})
    writer.write_eof()
    try:
        reply = await read_json(reader)
    except ConnectionError as exc:  # reset, or the connection aborted, while we waited
        raise PeerUnreachable(f"node {conn.peer.node_id if conn.peer else '?'}: {exc}") from exc
    finally:
        close_quietly(writer)
    if reply.get("t") != "pong":
        raise ProtocolError("a ping was not answered with a pong")
    return (time.perf_counter() - t0) * 1000

"""The blackboard over the mesh: pushes new posts to peers and runs the anti-entropy sync, on
authenticated QUIC streams of the node's mesh (what to send to whom: blackboard/sync.py).

Streams:
- `bb`: `{"t": "bb", "posts": [...]}`, one batch of posts pushed to us; no answer.
- `bb-sync`: the opener sends its digest (`{"t": "bb-sync", "digest": {hour: hash}, "carry": bool}`);
  the other side answers `{"ids": {hour: [id, ...]}}` for the hours that differ; the opener sends
  `{"posts": [...]}` frames the other lacks, then `{"want": [id, ...]}`, then ends its side; the
  other side answers with `{"posts": [...]}` frames of what was wanted and ends. A client that opens
  with `carry: true` is subscribed: the member pushes it every post it accepts from then on. Only a client sends
  `carry: true`: a member that does not list a just-joined member yet would otherwise take it for a client and push
  it every post for 30 s (bench/blackboard_prop.py measured 1,400-1,800 such pairs after 100 nodes start together).

A member syncs with each member it has not synced with yet (a node that joined, or came back) and
with one random member every SYNC_S seconds; a client syncs with the members it is connected to.

For the node's metrics it keeps, per member, when the last exchange with it completed (either side opened it), and
gives the time since as `blackboard_sync_age_s` in that member's row of `Mesh.peer_table`; and the newest post this
node holds (read from the store at start and every `NEWEST_REFRESH_S`, so expiry shows; raised by each post accepted
in between), whose age `blackboard_newest_post_age_s` in this node's own row gives: how far behind the mesh's
newest writes this node's copy may be.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import anyio

from blackboard.board import Board
from blackboard.post import TTL_S, Post
from blackboard.sync import (
    MAX_BUCKETS,
    SYNC_S,
    batches,
    bounded_ids,
    differing,
    parse_digest,
    parse_id_list,
    parse_ids,
    plan_exchange,
    push_targets,
)
from mesh_mcp.errors import MeshLLMError, PeerUnreachable, ProtocolError

from .runtime import Mesh
from .transport import PeerConnection
from .wire import CONTROL_LIMIT, close_quietly, decode_json, encode_json, read_frame, read_json

log = logging.getLogger("mesh_llm.blackboard")

WATCH_S = 0.5  # how often membership is checked for nodes to sync with
SUBSCRIPTION_S = 30.0  # a client stays subscribed this long after its last sync
PUSH_RETRY_S = (0.1, 0.4, 0.0)  # a failed push is tried three times
SYNC_TIMEOUT_S = 30.0  # one anti-entropy exchange, dial included
NEWEST_REFRESH_S = 60.0  # the newest post held is re-read from the store this often (one indexed row: cheap)


class BoardLink:
    def __init__(self, mesh: Mesh, board: Board) -> None:
        self.mesh, self.board = mesh, board
        self._rng = random.Random()
        self._subscribers: dict[str, float] = {}  # client node id -> last sync
        self._synced: set[str] = set()
        self._last_sync: dict[str, float] = {}  # member -> when an exchange with it last completed (monotonic)
        self._newest: float | None = None  # `created` of the newest post held (unix s, its origin's clock)
        self._tg: anyio.abc.TaskGroup | None = None
        mesh.transport.handlers.update({"bb": self._on_push, "bb-sync": self._on_sync})
        mesh.peer_stats["blackboard_sync_age_s"] = self.sync_ages
        mesh.own_stats["blackboard_newest_post_age_s"] = self.newest_post_age
        board.on_accept = self._accepted

    def sync_ages(self) -> dict[str, float]:
        """Seconds since the last completed sync exchange with each member synced with (members only: bounded)."""
        now = self.mesh.clock.monotonic()
        return {node_id: max(0.0, now - at) for node_id, at in list(self._last_sync.items())}

    def newest_post_age(self) -> float | None:
        """Seconds since the newest post this node holds was written (0 for one dated ahead, within the skew posts
        may have); None while it holds none."""
        if self._newest is None:
            return None
        return min(max(0.0, self.mesh.clock.time() - self._newest), TTL_S)

    async def _read_newest(self) -> None:
        try:
            newest = await self.board.feed(limit=1)
        except MeshLLMError as exc:  # the store failed (a full disk): the age stays as it was, the link goes on
            log.debug("blackboard: reading the newest post failed: %s", exc)
            return
        self._newest = newest[0].created if newest else None

    @property
    def _client(self) -> bool:
        return self.mesh.settings.role == "client"

    async def run(self) -> None:
        clock = self.mesh.clock
        async with anyio.create_task_group() as tg:
            self._tg = tg
            next_random = clock.monotonic() + SYNC_S
            await self._read_newest()
            next_newest = clock.monotonic() + NEWEST_REFRESH_S
            while True:
                await clock.sleep(WATCH_S)
                peers = self._sync_peers()
                for node_id in [p for p in peers if p not in self._synced]:
                    self._synced.add(node_id)
                    tg.start_soon(self._sync_with, node_id)
                alive = set(peers)
                self._synced &= alive  # a node that went away is synced with again when it returns
                self._last_sync = {n: t for n, t in self._last_sync.items() if n in alive}
                if peers and clock.monotonic() >= next_random:
                    next_random = clock.monotonic() + SYNC_S
                    tg.start_soon(self._sync_with, self._rng.choice(peers))
                if clock.monotonic() >= next_newest:
                    next_newest = clock.monotonic() + NEWEST_REFRESH_S
                    await self._read_newest()

    def _members(self) -> list[str]:
        me = self.mesh.identity.node_id
        return [r.node_id for r in self.mesh.members() if r.node_id != me and r.role != "client"]

    def _sync_peers(self) -> list[str]:
        members = self._members()
        if self._client:  # a client talks only to the members it is connected to
            return [m for m in members if m in self.mesh.transport.connections]
        return members

    # --- push ---------------------------------------------------------------------------------------

    def _accepted(self, post: Post, sender: str | None) -> None:
        if self._newest is None or post.created > self._newest:
            self._newest = post.created
        if self._tg is None:
            return
        now = self.mesh.clock.monotonic()
        subscribers = [c for c, t in self._subscribers.items() if now - t < SUBSCRIPTION_S]
        if self._client:
            targets = [m for m in self._sync_peers() if m != sender] if sender is None else []
        else:
            members = self._members()
            targets = push_targets(post, self.mesh.identity.node_id, sender, members, subscribers, self._rng)
        for node_id in targets:
            self._tg.start_soon(self._push, node_id, post)

    async def _push(self, node_id: str, post: Post) -> None:
        for attempt, pause in enumerate(PUSH_RETRY_S):
            try:
                for batch in batches([post]):
                    _, writer = await self.mesh.dial(node_id, "bb", posts=batch)
                    close_quietly(writer)
                return
            except PeerUnreachable as exc:
                log.debug("blackboard push %d of %s to %s failed: %s", attempt + 1, post.id, node_id, exc)
            await self.mesh.clock.sleep(pause)  # then the anti-entropy sync is the safety net

    async def _on_push(
        self, conn: PeerConnection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert conn.peer is not None
        posts = header.get("posts")
        if not isinstance(posts, list):
            raise ProtocolError("a blackboard push carries a list of posts")
        await self.board.receive(posts, conn.peer.node_id)

    # --- anti-entropy -------------------------------------------------------------------------------

    async def _sync_with(self, node_id: str) -> None:
        try:
            with anyio.fail_after(SYNC_TIMEOUT_S):
                got, gave = await self.sync(node_id)
            self._last_sync[node_id] = self.mesh.clock.monotonic()
            if got or gave:
                log.info("blackboard: synced with %s: received %d post(s), sent %d", node_id, got, gave)
        except PeerUnreachable as exc:
            log.debug("blackboard sync with %s: not reachable: %s", node_id, exc)
            self._synced.discard(node_id)
        except (TimeoutError, ConnectionError, MeshLLMError) as exc:  # reached, but the exchange failed
            log.debug("blackboard sync with %s failed: %s", node_id, exc)
            self._synced.discard(node_id)

    async def sync(self, sender: str) -> tuple[int, int]:
        """One digest exchange with member `sender`; returns (posts received, posts sent)."""
        digest = await self.board.digest()
        reader, writer = await self.mesh.dial(
            sender, "bb-sync", within_s=SYNC_TIMEOUT_S, digest=digest, carry=self._client
        )
        try:
            theirs = parse_ids((await read_json(reader)).get("ids"))
            exchange = plan_exchange(await self.board.ids_in(theirs), theirs)
            gave = 0
            for batch in batches(await self.board.get(exchange.give)):
                writer.write(encode_json({"posts": batch}))
                gave += len(batch)
                await writer.drain()
            writer.write(encode_json({"want": exchange.want}))
            writer.write_eof()
            got = 0
            while (frame := await read_frame(reader, CONTROL_LIMIT)) is not None:
                got += len(await self.board.receive(_posts(decode_json(frame)), sender))
            return got, gave
        finally:
            close_quietly(writer)

    async def _on_sync(
        self, conn: PeerConnection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert conn.peer is not None
        sender = conn.peer.node_id
        member = sender in self._members()
        if header.get("carry") is True and not member:
            self._subscribers[sender] = self.mesh.clock.monotonic()  # a client carrying the blackboard
        diff = differing(await self.board.digest(), parse_digest(header.get("digest")))[:MAX_BUCKETS]
        ids = bounded_ids(await self.board.ids_in(diff))
        for bucket in diff:
            ids.setdefault(bucket, [])  # hours only they have: we list none, so they send theirs
        writer.write(encode_json({"ids": {str(b): v for b, v in ids.items()}}))
        while (frame := await read_frame(reader, CONTROL_LIMIT)) is not None:
            msg = decode_json(frame)
            if "want" in msg:
                for batch in batches(await self.board.get(parse_id_list(msg["want"]))):
                    writer.write(encode_json({"posts": batch}))
                    await writer.drain()
                break
            await self.board.receive(_posts(msg), sender)
        writer.write_eof()
        if member:
            self._last_sync[sender] = self.mesh.clock.monotonic()


def _posts(msg: dict[str, Any]) -> list[Any]:
    posts = msg.get("posts")
    if not isinstance(posts, list):
        raise ProtocolError("a blackboard sync frame carries a list of posts")
    return posts

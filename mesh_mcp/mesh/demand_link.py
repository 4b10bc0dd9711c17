"""Clients' demand reaches the mesh (issue 14, item 1): a client is no gossip member and publishes no record, so the
requests its API counts would be seen by nobody. This link pushes a client's demand view to the members it is
connected to; a member absorbs what it is pushed into its own demand map, which it publishes in its signed record as
usual, so the standbys see it. The serving plane owns the map: `view` and `on_view` are the seams (mesh/ imports
nothing of serving/).

Stream `demand`: `{"t": "demand", "items": [[name, milli-req/min, as_of, last_wanted, pinned], ...]}`, the records'
form (mesh/demand_wire.py, parsed with its one strict parser: at most 24 entries of 128-character names); no answer.

Client (`run`): every `DEMAND_PUSH_S` it reads its view (`view(now)`: the same items a member's record carries) and
pushes it to at most `PUSH_FANOUT` connected members (those pushed to before first, so the same ones keep it fresh),
each when the view differs from the last one it was sent, or `REFRESH_S` after that while the view is non-empty (a
member that restarted learns it again). An empty view is never pushed: absorbed entries expire by their TTL anyway.
Which members are due is the pure `due` over the last pushes.

Member (`_on_push`): the sender must be an authenticated peer that is not a live member (a member's demand travels in
its signed record); pushes from one sender closer than `MIN_GAP_S` apart are dropped (`PushGate`: bounded table of
senders); the items are parsed strictly and pins are stripped (`admit`: a client serves nothing, so it pins nothing;
a pinned entry's rate and times are still requests it counted, so they are kept and only the flag goes: refusing the
whole push would lose real demand over a flag that means nothing from a client). A refused push is logged at debug
and its stream reset; the node goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from mesh_mcp.errors import PeerUnreachable, ProtocolError

from .demand_wire import Item, parse, to_json
from .runtime import Mesh
from .transport import PeerConnection
from .wire import close_quietly

log = logging.getLogger("mesh_llm.demand")

STREAM = "demand"
DEMAND_PUSH_S = 2.0  # a client pushes a changed view at most this often (a member re-signs demand once a second)
REFRESH_S = 30.0  # an unchanged non-empty view is pushed again this often (a member that restarted relearns it)
PUSH_FANOUT = 3  # members one client pushes to: members gossip what they absorb, so a few suffice
PUSH_TIMEOUT_S = 5.0  # one push, dial included
MIN_GAP_S = 1.0  # a member drops a sender's pushes closer than this apart (a client pushes every 2 s at most)
MAX_SENDERS = 1024  # senders a member remembers for the gap; past it, new senders wait for old entries to age out

View = Callable[[float], tuple[Item, ...]]  # now -> this node's demand view (the serving plane's MeshDemand.publish)
OnView = Callable[[str, tuple[Item, ...], float], object]  # (client node id, its items, now): absorb them


# --- pure parts --------------------------------------------------------------------------------------------


def admit(obj: object) -> tuple[Item, ...]:
    """A client's pushed view: parsed strictly (ProtocolError on any malformed or oversized part), pins stripped, and
    a pin with no rate and no times (which then says nothing) left out."""
    return tuple((n, m, a, w, False) for n, m, a, w, _ in parse(obj) if m or a or w)


@dataclass(frozen=True, slots=True)
class Sent:
    view: tuple[Item, ...]
    at: float  # monotonic seconds


def due(view: tuple[Item, ...], members: Iterable[str], sent: Mapping[str, Sent], now: float) -> list[str]:
    """The members to push `view` to at `now` (monotonic): of the connected `members`, the `PUSH_FANOUT` first,
    those pushed to before ahead of the rest (then by node id), each whose last push differs or is `REFRESH_S` old."""
    if not view:
        return []
    chosen = sorted(members, key=lambda m: (m not in sent, m))[:PUSH_FANOUT]
    return [m for m in chosen if (s := sent.get(m)) is None or s.view != view or now - s.at >= REFRESH_S]


class PushGate:
    """Per-sender rate limit, bounded: `allow(sender, now)` is '' when a push may pass, else why not."""

    def __init__(self, min_gap_s: float = MIN_GAP_S, max_senders: int = MAX_SENDERS) -> None:
        self.min_gap_s, self.max_senders = min_gap_s, max_senders
        self._last: dict[str, float] = {}  # sender -> monotonic time of its last accepted push

    def allow(self, sender: str, now: float) -> str:
        last = self._last.get(sender)
        if last is not None and now - last < self.min_gap_s:
            return f"{now - last:.2f} s after its last push (at most one a {self.min_gap_s:g} s)"
        if last is None and len(self._last) >= self.max_senders:
            self._last = {s: t for s, t in self._last.items() if now - t < self.min_gap_s}  # aged out: forgotten
            if len(self._last) >= self.max_senders:
                busy = len(self._last)
                return f"{busy} other senders pushed within {self.min_gap_s:g} s (at most {self.max_senders} at once)"
        self._last[sender] = now
        return ""

    def __len__(self) -> int:
        return len(self._last)


# --- the actor -----------------------------------------------------------------------------------------------


class DemandLink:
    """A client's pushes of its demand view, or a member's handler of clients' pushes (by the mesh's role)."""

    def __init__(self, mesh: Mesh, view: View, on_view: OnView) -> None:
        self.mesh, self.view, self.on_view = mesh, view, on_view
        self.gate = PushGate()
        self.refused = 0  # pushes refused or dropped (malformed, from a member, too soon)
        self._sent: dict[str, Sent] = {}
        if not self._client:
            mesh.transport.handlers.update({STREAM: self._on_push})

    @property
    def _client(self) -> bool:
        return self.mesh.settings.role == "client"

    # --- client ------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """A client's loop: push the view to the members due, every `DEMAND_PUSH_S` (returns at once on a member)."""
        if not self._client:
            return
        clock = self.mesh.clock
        while True:
            await clock.sleep(DEMAND_PUSH_S)
            await self.push_once()

    async def push_once(self) -> None:
        """One round: push this node's view to the connected members `due` says, concurrently."""
        try:
            view = self.view(self.mesh.clock.time())
        except ValueError as exc:  # a view over the wire's limits (a bug upstream): nothing is pushed
            log.warning("not pushing this client's demand view to the mesh: %s", exc)
            return
        members = self._members()
        self._sent = {m: s for m, s in self._sent.items() if m in members}  # bounded by the connections
        targets = due(view, members, self._sent, self.mesh.clock.monotonic())
        async with anyio.create_task_group() as tg:
            for node_id in targets:
                tg.start_soon(self._push, node_id, view)

    def _members(self) -> list[str]:
        me, connected = self.mesh.identity.node_id, self.mesh.transport.connections
        members = self.mesh.members()
        return [r.node_id for r in members if r.role != "client" and r.node_id != me and r.node_id in connected]

    async def _push(self, node_id: str, view: tuple[Item, ...]) -> None:
        try:
            _, writer = await self.mesh.dial(node_id, STREAM, within_s=PUSH_TIMEOUT_S, items=to_json(view))
            close_quietly(writer)
        except PeerUnreachable as exc:  # tried again next round: nothing recorded as sent
            log.debug("demand push to %s failed: %s", node_id, exc)
            return
        self._sent[node_id] = Sent(view, self.mesh.clock.monotonic())

    # --- member --------------------------------------------------------------------------------------------------

    async def _on_push(
        self, conn: PeerConnection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sender = conn.peer.node_id if conn.peer is not None else None
        try:
            items = self._receive(sender, header)
        except ProtocolError as exc:
            self.refused += 1
            log.debug("refused a demand push from %s: %s", sender or conn.remote, exc)
            conn.reset(writer)
            return
        if items:
            assert sender is not None
            self.on_view(sender, items, self.mesh.clock.time())

    def _receive(self, sender: str | None, header: dict[str, Any]) -> tuple[Item, ...]:
        """The items of one push, admitted: ProtocolError saying why not."""
        if sender is None or sender not in self.mesh.transport.connections:
            raise ProtocolError("a demand push must come from an authenticated, connected peer")
        if any(r.node_id == sender for r in self.mesh.members()):
            raise ProtocolError(f"member {sender} pushed a demand view: members publish theirs in their signed record")
        if why := self.gate.allow(sender, self.mesh.clock.monotonic()):
            raise ProtocolError(f"client {sender} pushed its demand view {why}")
        return admit(header.get("items"))

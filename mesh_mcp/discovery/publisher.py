"""Keeping a mesh listed (issue 15, items 1 and 3): the actor that publishes this node's mesh on the Nostr relays and
the LAN, delists it while it is full, withdraws it on a clean stop, takes over when the publisher is gone, and moves
a node that raced into a second mesh of the same name.

`Publisher.run`, when publishing (`--publish`, `--mesh-name`, or after a takeover): every `CHECK_S` it builds the
listing (`make_listing(now)`, the node's view of its mesh, already trimmed to size) and publishes it when it is not
listed yet, when what it says changed (models, nodes, full or not), or `REPUBLISH_S` after the last time — each
event expiring `TTL_S` after it was signed, so a mesh whose publisher died drops off the relays within two minutes.
While the mesh is full (`--max-clients` reached) it is withdrawn, and listed again when a client leaves. On
cancellation (Ctrl-C, node stop) the listing is withdrawn — shielded, at most `WITHDRAW_S` — and the LAN
announcement says goodbye. A relay or the LAN failing is logged and retried on the next round; the node goes on.

When not publishing but started with `--auto` (`takeover`): it watches for a listing of its mesh by a live member
(see `_watch`: at once when the publisher leaves the membership, else every `WATCH_S`); when none remains, the live
members take over in turns (by node-id hash, so usually exactly one publishes), each logging why.

`NameWatch` (`--auto --mesh-name NAME` on a node that created its mesh): N nodes started at once each find no mesh
called NAME and create one. Each then looks every `NAME_CHECK_S`; every node computes the same winner
(`score.pick_named`: the smallest mesh id among the live listings called NAME), and a node in another mesh raises
`MoveTo(token)` once no request is in flight here (at most `MOVE_DRAIN_S`), so the node restarts into the winner's
mesh — the CLI catches it and runs the node again with `--join` that token.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Sequence

import anyio

from mesh_mcp.clock import Clock
from mesh_mcp.discovery.finder import Finder
from mesh_mcp.discovery.listing import Listing
from mesh_mcp.discovery.mdns import LanAnnouncer
from mesh_mcp.discovery.move import MoveTo
from mesh_mcp.discovery.nostr import NostrDirectory
from mesh_mcp.discovery.score import pick_named
from mesh_mcp.errors import MeshLLMError
from mesh_mcp.mesh.records import NodeRecord

log = logging.getLogger("mesh_llm.discovery")

CHECK_S = 5.0
REPUBLISH_S = 60.0
TTL_S = 120
MIN_GAP_S = 10.0  # a changed listing is republished at most this often (relays rate-limit authors)
WITHDRAW_S = 5.0
WATCH_S = 60.0
WATCH_JITTER_S = 30.0
TAKEOVER_STEP_S = 10.0  # between the takeover turns of the live members
MAX_TURNS = 30
NAME_CHECK_S = 10.0
MOVE_DRAIN_S = 60.0


def _gist(listing: Listing) -> tuple[object, ...]:
    """What makes a republish worth it before `REPUBLISH_S`: what the mesh serves and wants, its size, full or not."""
    return (listing.served, listing.wanted, listing.nodes, listing.full, listing.name, listing.token)


class Publisher:
    """Publishes the mesh `make_listing` describes on `nostr` (None: no relays) and the LAN (`lan`: a factory of
    announcers, None: no LAN), on the injected clock."""

    def __init__(
        self,
        make_listing: Callable[[float], Listing],
        clock: Clock,
        *,
        node_id: str,
        port: int,
        nostr: NostrDirectory | None,
        lan: Callable[[], LanAnnouncer] | None,
        publishing: bool,
        finder: Finder | None = None,
        members: Callable[[], Sequence[NodeRecord]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.make_listing, self.clock = make_listing, clock
        self.node_id, self.port = node_id, port
        self.nostr, self.lan_factory = nostr, lan
        self.publishing = publishing
        self.finder, self.members = finder, members
        self.rng = rng or random.Random()
        self.listed: Listing | None = None  # what is out there now (for /api/status)
        self._lan: LanAnnouncer | None = None
        self._last_at = float("-inf")

    async def run(self) -> None:
        if not self.publishing:
            await self._watch()
            self.publishing = True
        try:
            while True:
                await self._round()
                await self.clock.sleep(CHECK_S)
        finally:
            with anyio.move_on_after(WITHDRAW_S, shield=True):
                await self._withdraw("this node is stopping")

    async def _round(self) -> None:
        now = self.clock.time()
        listing = self.make_listing(now)
        if listing.full:
            if self.listed is not None:
                await self._withdraw(f"{listing.clients} clients connected, the --max-clients of {listing.max_clients}")
            return
        old = self.listed
        due = old is None or now - self._last_at >= REPUBLISH_S
        changed = old is not None and _gist(old) != _gist(listing) and now - self._last_at >= MIN_GAP_S
        if due or changed:
            await self._publish(listing, now)

    async def _publish(self, listing: Listing, now: float) -> None:
        first = self.listed is None
        self._last_at = now
        self.listed = listing
        where = []
        if self.nostr is not None:
            try:
                if await self.nostr.publish(listing, ttl_s=TTL_S):
                    where.append(f"{len(self.nostr.relays)} Nostr relay(s)")
            except MeshLLMError as exc:
                log.warning("listing mesh %s on Nostr failed: %s", listing.mesh_id[:8], exc)
        if self.lan_factory is not None:
            try:
                data = listing.to_bytes()
                if self._lan is None:
                    lan = self.lan_factory()
                    await lan.start(data, self.port, listing.addresses, mesh_id=listing.mesh_id, node_id=self.node_id)
                    self._lan = lan
                else:
                    await self._lan.update(data)
                where.append("the LAN (mDNS)")
            except MeshLLMError as exc:
                log.warning("announcing mesh %s on the LAN failed: %s", listing.mesh_id[:8], exc)
        if first:
            name = f" as {listing.name!r}" if listing.name else ""
            log.info(
                "listed mesh %s%s on %s: anyone who finds it can join (a public listing carries its invite token)",
                listing.mesh_id[:8],
                name,
                " and ".join(where) or "nothing reachable yet (retrying)",
            )

    async def _withdraw(self, why: str) -> None:
        listing, self.listed = self.listed, None
        if listing is None:
            return
        if self.nostr is not None:
            try:
                await self.nostr.withdraw(listing.mesh_id)
            except MeshLLMError as exc:
                log.warning("withdrawing mesh %s from Nostr failed: %s", listing.mesh_id[:8], exc)
        if self._lan is not None:
            lan, self._lan = self._lan, None
            await lan.stop()
        log.info("delisted mesh %s: %s", listing.mesh_id[:8], why)

    async def _watch(self) -> None:
        """Return once no listing of this node's mesh by a live member remains: its publisher died or left (seen at
        once in membership: its listed addresses are no member's any more) or its listing expired. Relays are asked
        every `WATCH_S` (plus jitter), and at once when the publisher last seen is gone; the live members take over
        in turn, `TAKEOVER_STEP_S` apart by the hash of their node id, so the first one's listing stops the rest."""
        assert self.finder is not None and self.members is not None
        seen: Listing | None = None
        next_fetch = self.clock.monotonic() + self.rng.uniform(0, WATCH_JITTER_S)
        while True:
            await self.clock.sleep(CHECK_S)
            addresses = {a for r in self.members() for a in r.addresses}
            gone = seen is not None and not set(seen.addresses) & addresses
            if not gone and self.clock.monotonic() < next_fetch:
                continue
            if gone:
                await self.clock.sleep(self._turn())
            next_fetch = self.clock.monotonic() + WATCH_S + self.rng.uniform(0, WATCH_JITTER_S)
            mine = self.make_listing(self.clock.time()).mesh_id
            try:
                found = await self.finder.find()
            except MeshLLMError as exc:
                log.debug("looking for this mesh's listing failed: %s", exc)
                continue
            addresses = {a for r in self.members() for a in r.addresses}
            ours = [f.listing for f in found if f.listing.mesh_id == mine]
            live = [x for x in ours if set(x.addresses) & addresses]
            if live:
                seen = live[0]
                continue
            why = "its publisher left the mesh" if ours or seen is not None else "no listing of it remains"
            log.info("mesh %s is not listed by a live member (%s): this node publishes it now", mine[:8], why)
            return

    def _turn(self) -> float:
        """How long this node waits before taking over: its place among the live members by hash, in steps."""
        assert self.members is not None
        ranked = sorted(r.node_id for r in self.members() if r.role != "client")
        key = sorted(ranked, key=lambda n: hashlib.sha256(n.encode()).digest())
        place = key.index(self.node_id) if self.node_id in key else len(key)
        return min(place, MAX_TURNS) * TAKEOVER_STEP_S


class NameWatch:
    """Moves this node into the mesh called `name` with the smallest id, when it is in another one."""

    def __init__(
        self,
        name: str,
        mesh_id: str,
        finder: Finder,
        clock: Clock,
        in_flight: Callable[[], int],
    ) -> None:
        self.name, self.mesh_id, self.finder, self.clock, self.in_flight = name, mesh_id, finder, clock, in_flight

    async def run(self) -> None:
        while True:
            await self.clock.sleep(NAME_CHECK_S)
            try:
                found = await self.finder.find()
            except MeshLLMError as exc:
                log.debug("looking for meshes called %r failed: %s", self.name, exc)
                continue
            now = self.clock.time()
            winner = pick_named([f.listing for f in found], self.name, now=now)
            if winner is None or winner.mesh_id >= self.mesh_id:
                continue
            others = sorted(f.listing.mesh_id[:8] for f in found if f.listing.name == self.name)
            why = (
                f"{len(others)} meshes are called {self.name!r} ({', '.join(others)}); every node picks the smallest "
                f"id, {winner.mesh_id[:8]}: moving this node there from {self.mesh_id[:8]}"
            )
            log.warning("%s", why)
            deadline = self.clock.monotonic() + MOVE_DRAIN_S
            while self.in_flight() and self.clock.monotonic() < deadline:
                await self.clock.sleep(0.5)
            raise MoveTo(winner.token, why)

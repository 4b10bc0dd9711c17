"""Finding public meshes: the listings on the Nostr relays and on the LAN, together, and how far each mesh is.

`Finder.find` asks both transports at once for `within_s` — the relays (`nostr.NostrDirectory.fetch`) and mDNS on
the local network (`mdns.browse`) — and returns one `Found` per mesh: its newest valid listing and where it was seen
("nostr", "lan"). Either transport may be missing (no relay reachable, `--nostr-relay` given none, mDNS sockets
refused): the other still answers; LAN bytes are validated here by `Listing.from_bytes` (a malformed one is logged
at debug and dropped). `Finder.latencies` probes each mesh's listed addresses (`probe.best_rtt_ms`, at once,
bounded) and gives seconds, as `score.rank` takes them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import anyio

from mesh_mcp.discovery import mdns
from mesh_mcp.discovery.listing import Listing
from mesh_mcp.discovery.nostr import NostrDirectory
from mesh_mcp.discovery.probe import best_rtt_ms
from mesh_mcp.errors import ProtocolError

log = logging.getLogger("mesh_llm.discovery")

FIND_S = 4.0  # how long one search listens: a relay answers in about a second; mDNS answers within ~1 s of a query
PROBE_S = 1.0  # one latency probe's bound
MAX_PROBED = 64  # meshes probed per search (each probe is 3 datagrams to at most 4 addresses)

Browse = Callable[[float], Awaitable[list[bytes]]]


@dataclass(frozen=True)
class Found:
    listing: Listing
    via: tuple[str, ...]  # "nostr", "lan"


class Finder:
    """Listings from the relays (`nostr`, None: none asked) and the LAN (`lan`: True to browse mDNS)."""

    def __init__(self, nostr: NostrDirectory | None, lan: bool = True, browse: Browse | None = None) -> None:
        self.nostr, self.lan = nostr, lan
        self._browse = browse or (lambda within: mdns.browse(within))

    async def find(self, within_s: float = FIND_S) -> list[Found]:
        """Every mesh listed on the relays or the LAN now, the newest listing of each."""
        from_nostr: list[Listing] = []
        from_lan: list[Listing] = []

        async def relays() -> None:
            if self.nostr is not None:
                from_nostr.extend(await self.nostr.fetch(within_s))

        async def lan() -> None:
            if self.lan:
                from_lan.extend(_parse(await self._browse(within_s)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(relays)
            tg.start_soon(lan)
        return merge(from_nostr, from_lan)

    async def latencies(self, found: Iterable[Found], within_s: float = PROBE_S) -> dict[str, float | None]:
        """Mesh id → seconds of the best round trip to its listed addresses (None: none answered)."""
        out: dict[str, float | None] = {}

        async def one(listing: Listing) -> None:
            ms = await best_rtt_ms(listing.addresses, within_s)
            out[listing.mesh_id] = None if ms is None else ms / 1000

        async with anyio.create_task_group() as tg:
            for f in list(found)[:MAX_PROBED]:
                tg.start_soon(one, f.listing)
        return out


def _parse(payloads: Iterable[bytes]) -> list[Listing]:
    out = []
    for data in payloads:
        try:
            out.append(Listing.from_bytes(data))
        except ProtocolError as exc:
            log.debug("ignoring a LAN listing: %s", exc)
    return out


def merge(from_nostr: Iterable[Listing], from_lan: Iterable[Listing]) -> list[Found]:
    """One `Found` per mesh id: the newest listing (then the one with more nodes), and every transport that had it;
    sorted by mesh id."""
    best: dict[str, Listing] = {}
    via: dict[str, set[str]] = {}
    for source, listings in (("nostr", from_nostr), ("lan", from_lan)):
        for listing in listings:
            via.setdefault(listing.mesh_id, set()).add(source)
            old = best.get(listing.mesh_id)
            if old is None or (listing.published_at, listing.nodes) > (old.published_at, old.nodes):
                best[listing.mesh_id] = listing
    return [Found(best[m], tuple(sorted(via[m]))) for m in sorted(best)]

"""Which mesh `--auto` joins at start (issue 15, item 3): search, rank, decide — join a listed mesh or create one.

`choose` searches (`Finder.find`: Nostr relays and the LAN), probes the meshes found (`Finder.latencies`) and
applies the documented rule (`score.rank`; with `--mesh-name`, `score.pick_named`): the best listing whose token
really names its mesh (`Listing.invite`) and that answered the latency probe (else the best of the rest) is joined,
never one the user left with `--avoid-mesh`; with none, a serving node creates a mesh (and, named, publishes
it), while a client — which cannot make a mesh useful alone — looks again every `RETRY_S` for `CLIENT_WAIT_S`, saying
what it waits for, then gives up with a `ConfigError`. Every decision comes with its reasons (each candidate's
score line), which the CLI logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mesh_mcp.clock import Clock
from mesh_mcp.discovery.finder import Finder, Found
from mesh_mcp.discovery.listing import Listing
from mesh_mcp.discovery.score import Wants, pick_named, score_all
from mesh_mcp.errors import ConfigError, ProtocolError

log = logging.getLogger("mesh_llm.discovery")

RETRY_S = 5.0
CLIENT_WAIT_S = 300.0  # five minutes, as the reference; its console says it is searching meanwhile
SHOWN = 5  # candidates whose score lines are logged


@dataclass(frozen=True)
class Choice:
    listing: Listing | None  # the mesh to join; None: create one
    reasons: tuple[str, ...]

    @property
    def token(self) -> str | None:
        return None if self.listing is None else self.listing.token


def _joinable(listing: Listing) -> bool:
    try:
        listing.invite()
    except ProtocolError as exc:
        log.debug("not joining mesh %s: %s", listing.mesh_id[:8], exc)
        return False
    return True


async def decide_once(
    finder: Finder,
    me: Wants,
    last_mesh_id: str | None,
    name: str | None,
    now: float,
    avoid: frozenset[str] = frozenset(),
) -> tuple[Listing | None, list[str], list[Found]]:
    """One search: the listing to join (None: none fits) and the reasons. `avoid`: mesh ids (or their first 8+
    characters) this node left on purpose (`--avoid-mesh`), never joined."""
    found = await finder.find()
    avoided = [f.listing.mesh_id[:8] for f in found if any(f.listing.mesh_id.startswith(a) for a in avoid)]
    if avoided:
        log.info("--auto: not joining mesh(es) %s (--avoid-mesh)", ", ".join(avoided))
    found = [f for f in found if not any(f.listing.mesh_id.startswith(a) for a in avoid)]
    listings = [f.listing for f in found if _joinable(f.listing)]
    if name is not None:
        pick = pick_named(listings, name, now=now)
        if pick is None:
            return None, [f"no mesh called {name!r} is listed on the relays or the LAN"], found
        named = sorted(x.mesh_id[:8] for x in listings if x.name == name)
        return pick, [f"joining mesh {name!r} ({pick.mesh_id[:8]}; the smallest id of {', '.join(named)})"], found
    latencies = await finder.latencies(found)
    scored = score_all(listings, me, last_mesh_id, latencies, now=now)
    lines = [s.explain() for s in scored[:SHOWN]]
    # The best that answered the probe; one that did not is unreachable from here (another LAN, a NAT): last resort.
    eligible = [s for s in scored if s.eligible]
    best = next((s for s in eligible if s.latency_s is not None), eligible[0] if eligible else None)
    if best is None:
        why = f"{len(found)} mesh(es) listed, none suitable" if found else "no public mesh is listed"
        return None, [why, *lines], found
    return best.listing, [f"joining the best of {len(found)} mesh(es) listed", *lines], found


async def choose(
    finder: Finder,
    me: Wants,
    last_mesh_id: str | None,
    clock: Clock,
    *,
    name: str | None = None,
    avoid: frozenset[str] = frozenset(),
) -> Choice:
    """The mesh to join, or None to create one (a client never creates: it waits, then `ConfigError`)."""
    deadline = clock.monotonic() + CLIENT_WAIT_S
    while True:
        listing, reasons, _ = await decide_once(finder, me, last_mesh_id, name, clock.time(), avoid)
        if listing is not None:
            return Choice(listing, tuple(reasons))
        if not me.client:
            what = f"creating mesh {name!r}" if name else "creating a mesh"
            return Choice(None, (f"{reasons[0]}: {what}", *reasons[1:]))
        if clock.monotonic() >= deadline:
            raise ConfigError(
                f"--client --auto found no mesh to join in {CLIENT_WAIT_S:.0f} s ({reasons[0]}): check the relays "
                "(--nostr-relay) and the network, or join one with --join TOKEN"
            )
        log.info("%s; a client needs a mesh to join: looking again in %g s", reasons[0], RETRY_S)
        await clock.sleep(RETRY_S)

"""Which public mesh `--auto` joins: the scoring rule over the listings found (pure, no I/O).

`score_all` judges every listing; `rank` keeps the eligible ones, best first; `pick_named` resolves
`--mesh-name`. Each `Scored` carries `reasons`, sentences with numbers that `--auto` and `discover` log.

The rule. One listing per mesh is kept (the newest; ties → more nodes). A listing is **excluded** when
  1. it is expired: published more than `MAX_AGE_S` ago (its publisher stopped refreshing it), or more than
     `MAX_AGE_S` in the future (a wrong clock);
  2. it speaks another gossip protocol than this node;
  3. its llama.cpp build differs and the node needs the same build (`Wants.needs_same_build`: it would join a
     split, where every shard must run one build) — otherwise a different build is only a penalty (step 2 below);
  4. the node joins as a client and the mesh is full (`max_clients` reached).
The others are **ordered** by, in turn (each step decides only between listings equal on all earlier steps):
  1. sticky: the last mesh this home joined comes first (a restart goes back where it was);
  2. same llama.cpp build, when the node would serve (a different build cannot share a split with it);
  3. region: same region as the node's `--region` first (no region asked: no preference);
  4. latency band, measured by a probe to the listed addresses: ≤25 ms, ≤75 ms, ≤150 ms, ≤300 ms, slower, then
     not measured. Bands, not raw numbers: a 3 ms difference must not outweigh everything below;
  5. what the node brings or gets: a serving node, how many of the mesh's wanted and served models fit it
     (`Wants.fits`; wanted ones count twice: unmet demand); a client, how many of its `Wants.models` are served
     (any model served, when it asked for none);
  6. unnamed (community) meshes before named ones (a named mesh is someone's group: join it with --mesh-name);
  7. more nodes, then more models served (a bigger mesh has more room);
  8. the smaller mesh id (deterministic: every node ranks identical listings identically).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from mesh_mcp.discovery.listing import Listing

__all__ = ["LATENCY_BANDS_S", "MAX_AGE_S", "Scored", "Wants", "pick_named", "rank", "score_all"]

MAX_AGE_S = 120.0  # the publisher refreshes every 60 s with a 120 s TTL: older means it is gone
LATENCY_BANDS_S = (0.025, 0.075, 0.150, 0.300)


def _fits_nothing(_model: str) -> bool:
    return False


@dataclass(frozen=True)
class Wants:
    """What this node is and wants, as far as choosing a mesh goes."""

    protocol: int  # this node's gossip protocol (mesh.gossip_wire.PROTOCOL)
    llama_cpp: str  # this node's llama.cpp build identity
    client: bool = False  # joins as a client (--client): counts against max_clients, serves nothing
    needs_same_build: bool = False  # would join a split: a different build is an exclusion, not a penalty
    region: str | None = None
    models: frozenset[str] = frozenset()  # models asked for (--model): a client wants them served
    fits: Callable[[str], bool] = field(default=_fits_nothing, compare=False)  # can this node serve model X?


@dataclass(frozen=True)
class Scored:
    listing: Listing
    key: tuple[object, ...]  # the sort key (smaller is better); meaningful only among eligible listings
    reasons: tuple[str, ...]  # sentences with numbers, for logs
    excluded: str | None = None  # why the listing cannot be joined, or None when eligible
    latency_s: float | None = None

    @property
    def eligible(self) -> bool:
        return self.excluded is None

    def explain(self) -> str:
        """One line for logs: the mesh, then why it is excluded or how it ranks."""
        head = _label(self.listing)
        return f"{head}: {self.excluded}" if self.excluded else f"{head}: " + "; ".join(self.reasons)


def _label(listing: Listing) -> str:
    named = f" {listing.name!r}" if listing.name else ""
    return f"mesh {listing.mesh_id[:8]}{named}"


def _newest_per_mesh(listings: Iterable[Listing]) -> list[Listing]:
    best: dict[str, Listing] = {}
    for listing in listings:
        old = best.get(listing.mesh_id)
        if old is None or (listing.published_at, listing.nodes, listing.token) > (
            old.published_at,
            old.nodes,
            old.token,
        ):
            best[listing.mesh_id] = listing
    return [best[k] for k in sorted(best)]


def _exclusion(listing: Listing, me: Wants, now: float) -> str | None:
    age = now - listing.published_at
    if age > MAX_AGE_S:
        return f"excluded: the listing is {age:.0f} s old (over {MAX_AGE_S:.0f} s: its publisher is gone)"
    if age < -MAX_AGE_S:
        return f"excluded: the listing is dated {-age:.0f} s in the future (its publisher's clock is wrong)"
    if listing.protocol != me.protocol:
        return f"excluded: it speaks gossip protocol {listing.protocol}, this node speaks {me.protocol}"
    if me.needs_same_build and listing.llama_cpp != me.llama_cpp:
        return (
            f"excluded: it runs llama.cpp build {listing.llama_cpp!r:.40}, this node {me.llama_cpp!r:.40}, "
            "and a split needs one build"
        )
    if me.client and listing.full:
        return f"excluded: it is full ({listing.clients} of {listing.max_clients} clients)"
    return None


def _band(latency: float | None) -> int:
    if latency is None:
        return len(LATENCY_BANDS_S) + 1
    return next((i for i, limit in enumerate(LATENCY_BANDS_S) if latency <= limit), len(LATENCY_BANDS_S))


def _score(listing: Listing, me: Wants, last_mesh_id: str | None, latency: float | None) -> Scored:
    reasons: list[str] = []
    sticky = listing.mesh_id == last_mesh_id
    if sticky:
        reasons.append("the last mesh this node joined (sticky)")
    other_build = not me.client and listing.llama_cpp != me.llama_cpp
    if not me.client:
        reasons.append(
            f"another llama.cpp build ({listing.llama_cpp!r:.40}; this node {me.llama_cpp!r:.40}): cannot share a split"
            if other_build
            else "the same llama.cpp build"
        )
    other_region = me.region is not None and listing.region != me.region
    if me.region is not None:
        reasons.append(
            f"region {listing.region!r} is not {me.region!r}" if other_region else f"same region {me.region!r}"
        )
    band = _band(latency)
    if latency is None:
        reasons.append("latency not measured")
    else:
        limit = f"≤{LATENCY_BANDS_S[band] * 1000:.0f} ms band" if band < len(LATENCY_BANDS_S) else "slow band"
        reasons.append(f"latency {latency * 1000:.0f} ms ({limit})")
    if me.client:
        asked = me.models & set(listing.served) if me.models else set(listing.served)
        value = len(asked)
        reasons.append(
            f"serves {value} of the {len(me.models)} models asked for" if me.models else f"serves {value} models"
        )
    else:
        wanted = sorted(m for m in set(listing.wanted) if me.fits(m))
        served = sorted(m for m in set(listing.served) - set(listing.wanted) if me.fits(m))
        value = 2 * len(wanted) + len(served)
        reasons.append(
            f"this node can serve {len(wanted)} wanted and {len(served)} served models of it"
            + (f" ({', '.join([*wanted, *served][:4])})" if wanted or served else "")
        )
    named = listing.name is not None
    reasons.append("a named mesh" if named else "an unnamed (community) mesh")
    reasons.append(f"{listing.nodes} nodes, {len(listing.served)} models served, {listing.clients} clients")
    key = (
        not sticky,
        other_build,
        other_region,
        band,
        -value,
        named,
        -listing.nodes,
        -len(listing.served),
        listing.mesh_id,
    )
    return Scored(listing=listing, key=key, reasons=tuple(reasons), latency_s=latency)


def score_all(
    listings: Iterable[Listing],
    me: Wants,
    last_mesh_id: str | None,
    latencies: Mapping[str, float | None],
    *,
    now: float,
) -> list[Scored]:
    """Every mesh found (newest listing each), eligible ones first in rank order, then the excluded by mesh id."""
    eligible: list[Scored] = []
    excluded: list[Scored] = []
    for listing in _newest_per_mesh(listings):
        why = _exclusion(listing, me, now)
        if why is None:
            eligible.append(_score(listing, me, last_mesh_id, latencies.get(listing.mesh_id)))
        else:
            excluded.append(Scored(listing=listing, key=(), reasons=(why,), excluded=why))
    eligible.sort(key=lambda s: s.key)
    return eligible + excluded


def rank(
    listings: Iterable[Listing],
    me: Wants,
    last_mesh_id: str | None,
    latencies: Mapping[str, float | None],
    *,
    now: float,
) -> list[Scored]:
    """The meshes this node may join, best first (see the module docstring for the rule)."""
    return [s for s in score_all(listings, me, last_mesh_id, latencies, now=now) if s.eligible]


def pick_named(listings: Iterable[Listing], name: str, *, now: float) -> Listing | None:
    """The mesh called `name` (exact match) among live listings: the lexicographically smallest mesh id.

    This is the race rule: N nodes started at once with `--auto --mesh-name X` each create and publish a mesh X;
    every node that then sees more than one converges on the same one (the smallest id), and the others move."""
    live = [
        listing
        for listing in listings
        if listing.name == name and abs(now - listing.published_at) <= MAX_AGE_S  # expired: its publisher is gone
    ]
    return min(live, key=lambda listing: listing.mesh_id, default=None)

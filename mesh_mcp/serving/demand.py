"""The demand map, pure: which models the mesh wants, how hot each is, and its gossip form (issue 14, item 1).

No I/O and no clock: every function that needs the time takes `now` (wall-clock seconds, `Clock.time()`).

Shapes. Per model name an `Entry`: `last_wanted` (when a request last named it) and a decaying request rate stored
as `(rate, as_of)` — requests/minute as it stood at `as_of` — decayed on read with half-life `HALF_LIFE_S`:
`rate_at(now) = rate * 2 ** (-(now - as_of) / HALF_LIFE_S)`. Each request adds `PER_REQUEST` (= 60 ln 2 / half-life)
to the rate, so a steady stream of r requests/minute converges to `rate == r`. A `DemandMap` is entries plus `pins`:
names some node serves or was started with `--model` for — demanded while that node says so. Pins are never
accumulated: they come only from the views of members that are live now.

The merge (a CRDT: commutative, associative, idempotent). Per name: `last_wanted` is the max; the rate pair kept is
the one that is larger at any common `now`. That choice does not depend on `now` — `r1 * 2**(-(t-a1)/H) >
r2 * 2**(-(t-a2)/H)` iff `log2 r1 + a1/H > log2 r2 + a2/H` — so the merge is a max over a total order (`_rank`), needs
no clock and never re-decays (no float drift). Max, not sum: views are re-published, and the same requests seen by
two nodes, or echoed back by gossip, must not count twice (the price: requests spread over several entry nodes count
as the busiest one's share, a lower bound). Pins merge by union over the views given.
Expiry (`TTL_S` without a request) is applied at each node's own time, so a stale rate pair — already decayed by
2**(TTL/half-life) = 64x — may survive on one node and not on another; gossip then carries it (`join`) and the nodes
still converge. An entry's rate is as of a request, so `as_of <= last_wanted` (checked).

One node's state, `NodeDemand`: its own observations (`observe`, per API request naming a model, served or not),
what it absorbed from peers' views (`absorb`: kept after the peer dies, until the TTL, so a model whose only server
and only entry point died is still wanted), and its own pins (`pin`/`unpin`). It publishes the top `PUBLISH_K` by
current rate plus its pins (`publish`, `to_wire`); the mesh's map is `mesh_map(live members' views, now)`.
Only names within the records' model-name limits and accepted by the caller's predicate (the node passes "resolves
to a catalog entry or a file some member holds") count, so junk names cannot flood the map.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from mesh_mcp.mesh.demand_wire import (
    MAX_PINS,
    MAX_RATE,
    MAX_RATE_MILLI,
    MAX_TIME_S,
    MAX_WIRE,
    PUBLISH_K,
    Item,
    name_problem,
    parse,
)

HALF_LIFE_S = 300.0  # a burst halves in 5 min: steady enough for "3x hotter" comparisons, quick to follow a shift
PER_REQUEST = 60.0 * math.log(2) / HALF_LIFE_S  # req/min one request adds (0.139): the estimator's unit step
TTL_S = 1800.0  # unpinned and not wanted for 30 min: gone (covers a lull in interactive use; frees standbys soon)
MAX_ENTRIES = 256  # names one node keeps: records carry at most 256 models on disk; the catalog holds < 100
MAX_SKEW_S = 300.0  # absorbed timestamps further ahead of our clock than this are refused, not trusted
# The wire's limits (PUBLISH_K, MAX_PINS, MAX_WIRE, MAX_RATE, MAX_TIME_S) live with its parser: mesh/demand_wire.py.

Accepts = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class Entry:
    """What is known of one model's demand: rate (req/min) as of `as_of`, and when it was last wanted."""

    rate: float
    as_of: float
    last_wanted: float

    def __post_init__(self) -> None:
        for value in (self.rate, self.as_of, self.last_wanted):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"demand entry {self!r}: rate and times must be finite and >= 0")
        if self.as_of > self.last_wanted:
            raise ValueError(f"demand entry {self!r}: a rate is as of a request, so as_of <= last_wanted")

    def rate_at(self, now: float) -> float:
        """Requests/minute at `now` (never grows when `now` is before `as_of`: a clock that went back)."""
        return self.rate * 2.0 ** (-max(0.0, now - self.as_of) / HALF_LIFE_S)

    def expired(self, now: float, ttl_s: float = TTL_S) -> bool:
        return now - self.last_wanted > ttl_s


def _rank(e: Entry) -> tuple[float, float, float]:
    """The total order of rate pairs: larger at every common time first, then the later `as_of`, then the rate."""
    return (math.log2(e.rate) + e.as_of / HALF_LIFE_S if e.rate > 0 else -math.inf, e.as_of, e.rate)


def join(a: Entry, b: Entry) -> Entry:
    """One name's merge: the dominant rate pair, the latest `last_wanted`."""
    top = a if _rank(a) >= _rank(b) else b
    last = max(a.last_wanted, b.last_wanted)
    return top if top.last_wanted == last else Entry(top.rate, top.as_of, last)


@dataclass(frozen=True, slots=True)
class Wanted:
    """One demanded model, for the planners and /api/status."""

    name: str
    rate: float  # req/min at the `now` it was asked at
    last_wanted: float  # wall-clock seconds; 0: never requested (pinned only)
    pinned: bool

    def describe(self, now: float) -> str:
        ago = f"last wanted {now - self.last_wanted:.0f} s ago" if self.last_wanted else "not requested yet"
        return f"{self.name}: {self.rate:.1f} req/min, {ago}{', pinned by a node' if self.pinned else ''}"


@dataclass(frozen=True, slots=True)
class DemandMap:
    """Entries by name, and pinned names: a published view, or the mesh's map. Immutable; `merge` is the join."""

    entries: Mapping[str, Entry] = field(default_factory=dict)
    pins: frozenset[str] = frozenset()

    def merge(self, *others: DemandMap) -> DemandMap:
        entries = dict(self.entries)
        pins = set(self.pins)
        for other in others:
            pins |= other.pins
            for name, e in other.entries.items():
                mine = entries.get(name)
                entries[name] = e if mine is None else join(mine, e)
        return DemandMap(entries, frozenset(pins))

    def expire(self, now: float, ttl_s: float = TTL_S) -> DemandMap:
        """Without the entries not wanted for `ttl_s` (pins stay: a pin is demand while its node says so)."""
        return DemandMap({n: e for n, e in self.entries.items() if not e.expired(now, ttl_s)}, self.pins)

    def rate(self, name: str, now: float) -> float:
        e = self.entries.get(name)
        return e.rate_at(now) if e is not None else 0.0

    def is_active(self, name: str, now: float, ttl_s: float = TTL_S) -> bool:
        """Pinned by a live member, or wanted within the TTL."""
        e = self.entries.get(name)
        return name in self.pins or (e is not None and not e.expired(now, ttl_s))

    def wanted(self, now: float, ttl_s: float = TTL_S) -> tuple[Wanted, ...]:
        """Every name with active demand, hottest first (then pinned, most recently wanted, by name)."""
        names = {n for n, e in self.entries.items() if not e.expired(now, ttl_s)} | self.pins
        out = []
        for name in names:
            e = self.entries.get(name)
            out.append(Wanted(name, e.rate_at(now) if e else 0.0, e.last_wanted if e else 0.0, name in self.pins))
        return tuple(sorted(out, key=lambda w: (-w.rate, not w.pinned, -w.last_wanted, w.name)))

    def hottest(self, k: int, now: float, ttl_s: float = TTL_S) -> DemandMap:
        """The `k` entries hottest by rate (a `now`-free order, `_rank`) among the live ones; the same pins."""
        live = [(n, e) for n, e in self.entries.items() if not e.expired(now, ttl_s)]
        live.sort(key=lambda item: (_rank(item[1]), item[0]), reverse=True)
        return DemandMap(dict(live[:k]), self.pins)


def merge(*maps: DemandMap) -> DemandMap:
    """The join of any number of maps (order and repetition do not matter)."""
    return DemandMap().merge(*maps)


class NodeDemand:
    """One node's demand state: its observations, what it absorbed from peers, its pins. Pure: mutated only by its
    methods, which take `now`; `accepts(name)` says which names count (the node's "a model that exists")."""

    def __init__(self, accepts: Accepts, *, max_entries: int = MAX_ENTRIES, ttl_s: float = TTL_S) -> None:
        self._accepts = accepts
        self._max = max_entries
        self._ttl = ttl_s
        self._seen: dict[str, Entry] = {}
        self._pins: set[str] = set()

    @property
    def pins(self) -> frozenset[str]:
        return frozenset(self._pins)

    def observe(self, name: str, now: float) -> str:
        """Count one API request naming `name` at `now`. '' when it counted, else the sentence saying why not."""
        if problem := self._problem(name):
            return f"not counted as demand: {problem}"
        e = self._seen.get(name)
        if e is None:
            e = Entry(PER_REQUEST, now, now)
        elif now >= e.as_of:
            e = Entry(min(MAX_RATE, e.rate_at(now) + PER_REQUEST), now, max(e.last_wanted, now))
        else:  # the clock went back: add the request at the entry's own time
            e = Entry(min(MAX_RATE, e.rate + PER_REQUEST), e.as_of, max(e.last_wanted, now))
        self._seen[name] = e
        self._bound(now)
        return ""

    def pin(self, name: str) -> None:
        """This node serves `name` or was started with `--model` for it. ValueError past the limits (a local bug)."""
        if problem := name_problem(name):
            raise ValueError(f"cannot pin {name!r}: {problem}")
        if name not in self._pins and len(self._pins) >= MAX_PINS:
            raise ValueError(f"cannot pin {name!r}: a node pins at most {MAX_PINS} models ({sorted(self._pins)})")
        self._pins.add(name)

    def unpin(self, name: str) -> None:
        self._pins.discard(name)

    def absorb(self, view: DemandMap, now: float) -> list[str]:
        """Merge a peer's published entries (its pins are not kept: pass live views to `mesh_map`). Returns a
        sentence per name refused: one the predicate rejects, or timestamps ahead of our clock."""
        admitted, refused = self._admit(view, now)
        for name, e in admitted.entries.items():
            mine = self._seen.get(name)
            self._seen[name] = e if mine is None else join(mine, e)
        self._bound(now)
        return refused

    def _admit(self, view: DemandMap, now: float) -> tuple[DemandMap, list[str]]:
        """The part of a peer's view that counts: names the predicate accepts, times at most MAX_SKEW_S ahead."""
        refused: list[str] = []
        entries: dict[str, Entry] = {}
        for name, e in view.entries.items():
            ahead = e.last_wanted - now  # >= as_of
            if problem := self._problem(name):
                refused.append(f"ignored demand for {name[:40]!r}: {problem}")
            elif ahead > MAX_SKEW_S:
                refused.append(
                    f"ignored demand for {name}: its time is {ahead:.0f} s ahead of ours (> {MAX_SKEW_S:.0f})"
                )
            else:
                entries[name] = e
        pins = set()
        for name in view.pins:
            if problem := self._problem(name):
                refused.append(f"ignored a pin of {name[:40]!r}: {problem}")
            else:
                pins.add(name)
        return DemandMap(entries, frozenset(pins)), refused

    def _problem(self, name: str) -> str:
        return name_problem(name) or ("" if self._accepts(name) else f"{name!r} is not a model the mesh knows")

    def _bound(self, now: float) -> None:
        """Drop expired entries, then the coldest past `max_entries` (pins are kept apart and never dropped)."""
        kept = DemandMap(self._seen).hottest(self._max, now, self._ttl)
        if len(kept.entries) != len(self._seen):
            self._seen = dict(kept.entries)

    def known(self) -> DemandMap:
        """Everything this node holds: its observations and absorbed entries, with its own pins."""
        return DemandMap(dict(self._seen), frozenset(self._pins))

    def publish(self, now: float) -> DemandMap:
        """The view for this node's record: the `PUBLISH_K` hottest live entries, its pins and their entries."""
        top = DemandMap(self._seen).hottest(PUBLISH_K, now, self._ttl)
        entries = dict(top.entries)
        entries.update({n: self._seen[n] for n in self._pins if n in self._seen})
        return DemandMap(entries, frozenset(self._pins))

    def mesh_map(self, views: Iterable[DemandMap], now: float) -> DemandMap:
        """The mesh's map at `now`: what this node holds merged with the live members' views (their pins count
        while they are live and say so), expired entries and names the predicate refuses left out."""
        return self.known().merge(*(self._admit(v, now)[0] for v in views)).expire(now, self._ttl)


# ---------------------------------------------------------------------------------------------------- wire
# The form and its one strict parser are the mesh plane's (mesh/demand_wire.py: records carry it); here a view
# becomes its items (`to_items`, the record's `demand` field) and back (`from_items`).


def to_items(view: DemandMap) -> tuple[Item, ...]:
    """The canonical wire items, sorted by name. ValueError when the view is over the wire's limits."""
    if len(view.pins) > MAX_PINS or len(view.entries.keys() | view.pins) > MAX_WIRE:
        raise ValueError(f"a demand view holds at most {MAX_WIRE} names and {MAX_PINS} pins: publish() bounds it")
    out: list[Item] = []
    for name in sorted(view.entries.keys() | view.pins):
        if problem := name_problem(name):
            raise ValueError(f"demand for {name!r}: {problem}")
        e = view.entries.get(name)
        if e is None:
            out.append((name, 0, 0, 0, True))
            continue
        as_of = math.floor(e.as_of)  # whole seconds, the rate as it was at that second (< 1 s earlier)
        milli = min(round(e.rate * 2.0 ** ((e.as_of - as_of) / HALF_LIFE_S) * 1000), MAX_RATE_MILLI)
        out.append((name, milli, min(as_of, MAX_TIME_S), min(math.floor(e.last_wanted), MAX_TIME_S), name in view.pins))
    return tuple(out)


def from_items(items: tuple[Item, ...]) -> DemandMap:
    """A view from parsed items (`demand_wire.parse`, or a verified record's `demand`)."""
    entries = {n: Entry(milli / 1000, float(as_of), float(last)) for n, milli, as_of, last, _ in items if milli or last}
    return DemandMap(entries, frozenset(n for n, *_, pinned in items if pinned))


def to_wire(view: DemandMap) -> list[list[object]]:
    """The compact JSON-able form, sorted by name. ValueError when the view is over the wire's limits."""
    return [list(i) for i in to_items(view)]


def from_wire(obj: object) -> DemandMap:
    """A peer's published view, parsed strictly (`demand_wire.parse`): ProtocolError on any malformed part."""
    return from_items(parse(obj))

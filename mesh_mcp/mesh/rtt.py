"""Round-trip times to peers: which peers to measure, smoothing, when a change is worth
re-publishing, and when a split partner has been too far for too long (no I/O).

The mesh runtime asks `due()` every `TICK_S` which peers to ping, feeds `observe()` with the samples
(median of 3 `ping` stream round trips) and asks `report()` whether its signed record should carry a
new RTT map. QUIC's own smoothed RTT (aioquic 1.7: `QuicConnection._loss._rtt_smoothed`) was tried
first and not used: on loopback it read 80–145 ms, because the handshake's first sample includes
Python crypto work and aioquic's delayed ACKs inflate samples on sparse traffic — over the 80 ms
placement cap.

What is measured, bounded so a 1000-node mesh does not dial everyone every few seconds: the peers in
our published map (the nearest `MAX_PEERS`) and the ones a split asked to keep (`keep`) every
`KEEP_EVERY_S`; any other live member every `REVISIT_S` (longer than QUIC's idle timeout, so our
pings do not keep its connection open); at most `PER_TICK` pings a tick, of which at most
`NEW_PER_TICK` to peers we hold no connection to (an outgoing handshake each). A new member is
measured at the next tick; the map converges to the nearest peers as the others are visited.

The map holds the nearest `MAX_PEERS` peers in tenths of a ms, and is re-published only when it
changed meaningfully (a peer added or dropped, or an RTT moved by more than `RELATIVE` and
`ABSOLUTE_MS`) and at most every `publish_period(members)` — a record update is gossiped to the
whole mesh, so RTT updates must not become its traffic: each node receives every member's updates,
so the period grows with the mesh to keep them under `BUDGET_BYTES_S` per node (10 s in small
meshes, 410 s at 1000 nodes; bench/GOSSIP.md). Placement reads these maps from every record
(`placement.rtt_between` takes the worse direction), so every node plans from the same numbers; a
split's host watches the same worse-direction value for its workers, with its own live
measurement on its side (`OverCap`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Container, Iterable, Mapping
from dataclasses import dataclass, field

from .records import MAX_RTT as MAX_PEERS

ALPHA = 0.5  # weight of a new sample (each already a median of 3)
RELATIVE = 0.2
ABSOLUTE_MS = 1.0
MIN_PUBLISH_S = 10.0
RECORD_BYTES = 2048  # a record with a full RTT map, as gossiped
BUDGET_BYTES_S = 5_000  # RTT updates received per node per second, at most (about as many are sent)
TICK_S = 1.0
KEEP_EVERY_S = 5.0
REVISIT_S = 60.0  # > quic.IDLE_TIMEOUT_S: a connection only our pings use closes in between
FORGET_S = 150.0  # a peer not measured this long leaves the map
PER_TICK = 8
NEW_PER_TICK = 1


@dataclass
class _Peer:
    ms: float
    seen: float


@dataclass
class RttTable:
    peers: dict[str, _Peer] = field(default_factory=dict)
    tried: dict[str, float] = field(default_factory=dict)  # last ping attempt, failed ones too
    published: dict[str, float] = field(default_factory=dict)
    published_at: float = -math.inf

    def due(self, alive: Iterable[str], connected: Container[str], now: float, keep: Collection[str] = ()) -> list[str]:
        """The peers to ping now, and notes them as tried: `keep` first, then the published nearest,
        then connected peers, then others; least recently tried first (never tried before all)."""
        near = self.nearest(now)
        ranked = []
        for peer in alive:
            close = peer in keep or peer in near
            last = self.tried.get(peer, -math.inf)
            if now - last < (KEEP_EVERY_S if close else REVISIT_S):
                continue
            ranked.append(((peer not in keep, peer not in near, peer not in connected, last, peer), close))
        chosen: list[str] = []
        dials = 0
        for (*_, peer), close in sorted(ranked):
            if len(chosen) == PER_TICK:
                break
            if not close and peer not in connected:
                if dials == NEW_PER_TICK:
                    continue
                dials += 1
            chosen.append(peer)
            self.tried[peer] = now
        return chosen

    def observe(self, peer: str, ms: float, now: float) -> None:
        """A sample (ms) for `peer`; non-finite or negative samples are ignored."""
        if not math.isfinite(ms) or ms < 0:
            return
        held = self.peers.get(peer)
        smoothed = ms if held is None else (1 - ALPHA) * held.ms + ALPHA * ms
        self.peers[peer] = _Peer(smoothed, now)

    def prune(self, alive: Collection[str]) -> None:
        """Forget peers that are no longer live members."""
        for peer in [p for p in (*self.peers, *self.tried) if p not in alive]:
            self.peers.pop(peer, None)
            self.tried.pop(peer, None)

    def get(self, peer: str) -> float | None:
        held = self.peers.get(peer)
        return None if held is None else held.ms

    def measured(self, now: float) -> dict[str, float]:
        """Every peer measured within `FORGET_S`, in ms."""
        return {peer: p.ms for peer, p in self.peers.items() if now - p.seen <= FORGET_S}

    def nearest(self, now: float) -> dict[str, float]:
        """The nearest `MAX_PEERS` peers measured within `FORGET_S` (ties by node id)."""
        fresh = [(p.ms, peer) for peer, p in self.peers.items() if now - p.seen <= FORGET_S]
        return {peer: ms for ms, peer in sorted(fresh)[:MAX_PEERS]}

    def report(self, now: float, members: int = 1) -> tuple[tuple[str, int], ...] | None:
        """The record's new RTT map (sorted (peer, tenths of a ms)), or None when the published one
        is still good enough or was published less than `publish_period(members)` ago."""
        if now - self.published_at < publish_period(members):
            return None
        current = self.nearest(now)
        if not _differs(self.published, current):
            return None
        self.published, self.published_at = current, now
        return tuple(sorted((peer, round(ms * 10)) for peer, ms in current.items()))


def publish_period(members: int) -> float:
    """Seconds between two RTT updates of one node in a mesh of `members`."""
    return max(MIN_PUBLISH_S, members * RECORD_BYTES / BUDGET_BYTES_S)


def _differs(old: dict[str, float], new: dict[str, float]) -> bool:
    if old.keys() != new.keys():
        return True
    return any(abs(new[p] - old[p]) > max(ABSOLUTE_MS, RELATIVE * old[p]) for p in new)


def as_ms(rtt: tuple[tuple[str, int], ...]) -> dict[str, float]:
    """A record's RTT map in ms."""
    return {peer: tenths / 10 for peer, tenths in rtt}


def worse(*values: float | None) -> float | None:
    """The larger of the measured values (either direction of a link), None if none is."""
    seen = [v for v in values if v is not None and math.isfinite(v) and v >= 0]
    return max(seen) if seen else None


@dataclass
class OverCap:
    """Which peers' RTT has been above `cap_ms` on `checks` consecutive checks (a split's host
    re-plans without them). A check without a value for a peer breaks its streak."""

    cap_ms: float
    checks: int = 2
    streak: dict[str, int] = field(default_factory=dict)

    def check(self, rtts: Mapping[str, float | None]) -> list[str]:
        for peer in list(self.streak):
            if peer not in rtts:
                del self.streak[peer]
        for peer, ms in rtts.items():
            if ms is not None and ms > self.cap_ms:
                self.streak[peer] = self.streak.get(peer, 0) + 1
            else:
                self.streak.pop(peer, None)
        return sorted(p for p, n in self.streak.items() if n >= self.checks)

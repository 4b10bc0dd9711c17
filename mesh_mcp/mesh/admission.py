"""Admission of unauthenticated connections, per source (pure: no I/O, the time is an argument).

A stranger on the wire can open connections without any credential: a TCP connection to the data plane, a
QUIC connection that completes TLS (anyone may: the certificate proves who *we* are, not who they are). Until
such a connection has authenticated with the mesh handshake it is *pending*, and pending connections are
bounded three ways (`Limits`):

- per source address: a stranger's address holds at most `per_source` pending connections, so one flooding
  host cannot take the slots of another;
- in all: at most `shared` pending connections from strangers together (and from members once their
  reserve is full), so many hosts cannot exhaust threads, sockets or memory either;
- a reserve: `reserved` further slots only addresses of known members take (those in gossiped member
  records, or of peers connected now), so strangers, however many, never starve the mesh's own nodes.

Every pending connection has `deadline_s` from its admission to authenticate; `overdue` hands back those
that did not, to be closed. Authenticated connections are released and never counted again.

`RefusalLog` words what was refused without letting an attacker fill the log: the first refusal after a
quiet interval is one line at once (a misconfigured member is seen immediately); the rest of the interval
is one summary line.

Both planes use these: `quic.py` (keyed by connection id) and `dataplane/listener.py` (keyed by tunnel).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from inference.controls import printable

K = TypeVar("K", bound=Hashable)

PER_SOURCE = "over the limit of pending connections per address"
FULL = "every slot for unauthenticated connections is taken"


@dataclass(frozen=True)
class Limits:
    per_source: int  # pending connections from one stranger's address
    shared: int  # pending connections from strangers together (and members beyond their reserve)
    reserved: int  # further slots that only known members' addresses take
    deadline_s: float  # from admission to authenticated; then the connection is closed


@dataclass(frozen=True)
class _Slot:
    source: str
    reserved: bool
    since: float


class Admission(Generic[K]):
    """Counts pending connections by source and pool; decides whether one more may wait to authenticate."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._slots: dict[K, _Slot] = {}
        self._by_source: Counter[str] = Counter()
        self._shared = 0
        self._reserved = 0

    @property
    def pending(self) -> int:
        """Connections admitted and not yet authenticated, released or overdue."""
        return len(self._slots)

    @property
    def pending_reserved(self) -> int:
        return self._reserved

    def pending_from(self, source: str) -> int:
        return self._by_source.get(source, 0)

    def admit(self, key: K, source: str, *, known: bool, now: float) -> str | None:
        """Count `key` (a new connection from `source`) as pending; None when admitted, else why not
        (`PER_SOURCE` or `FULL`). `known`: `source` is an address of a known member. Admitting a key
        twice is a no-op."""
        if key in self._slots:
            return None
        limits = self.limits
        if known and self._reserved < limits.reserved:
            reserved = True
        elif not known and self._by_source[source] >= limits.per_source:
            return PER_SOURCE
        elif self._shared >= limits.shared:
            return FULL
        else:
            reserved = False
        self._slots[key] = _Slot(source, reserved, now)
        self._by_source[source] += 1
        if reserved:
            self._reserved += 1
        else:
            self._shared += 1
        return None

    def release(self, key: K) -> bool:
        """`key` authenticated or went away: its slot is free. False when it held none (idempotent)."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return False
        self._by_source[slot.source] -= 1
        if not self._by_source[slot.source]:
            del self._by_source[slot.source]
        if slot.reserved:
            self._reserved -= 1
        else:
            self._shared -= 1
        return True

    def overdue(self, now: float) -> list[tuple[K, str]]:
        """(key, source) of the connections past their deadline, released: the caller closes them."""
        late = [(k, s.source) for k, s in self._slots.items() if now - s.since >= self.limits.deadline_s]
        for key, _ in late:
            self.release(key)
        return late


class RefusalLog:
    """Refused connections in words, bounded: the first after a quiet interval at once, then at most one
    summary line per `interval_s` (counts by reason and the busiest sources)."""

    MAX_KEYS = 32  # distinct reasons and sources remembered per interval (more are counted as "other")
    MAX_REASON = 160  # characters of a reason kept (reasons may quote what a peer sent)

    def __init__(self, prefix: str, interval_s: float = 10.0) -> None:
        self.prefix, self.interval_s = prefix, interval_s
        self._window_end = float("-inf")
        self._reasons: Counter[str] = Counter()
        self._sources: Counter[str] = Counter()
        self.total = 0  # refusals ever

    def refused(self, source: str, reason: str, now: float, who: str | None = None) -> str | None:
        """Note one refusal of a connection from `source` (an address; `who` words it, e.g. with the
        port); returns a line to log, or None when it is counted for the next summary."""
        self.total += 1
        reason = printable(reason[: self.MAX_REASON])
        if now >= self._window_end and not self._reasons:
            self._window_end = now + self.interval_s
            return f"{self.prefix}refused {printable(who or source)}: {reason}"
        _count(self._reasons, reason, self.MAX_KEYS)
        _count(self._sources, source, self.MAX_KEYS)
        return self.due(now)

    def due(self, now: float) -> str | None:
        """The summary of the interval that ended, if any refusal was counted in it (then a new one starts)."""
        if not self._reasons or now < self._window_end:
            return None
        n = sum(self._reasons.values())
        reasons = "; ".join(f"{k} ({v})" for k, v in self._reasons.most_common(4))
        sources = ", ".join(f"{k} ({v})" for k, v in self._sources.most_common(3))
        self._reasons.clear()
        self._sources.clear()
        self._window_end = now + self.interval_s
        return (
            f"{self.prefix}refused {n} more unauthenticated connection(s) in the last {self.interval_s:.0f} s: "
            f"{reasons}; most from {sources}"
        )


def _count(counter: Counter[str], key: str, limit: int) -> None:
    counter["other" if key not in counter and len(counter) >= limit else key] += 1


def source_ip(host: str) -> str:
    """The address a connection comes from, as member records and limits compare it: no brackets, no
    zone, an IPv4-mapped IPv6 address as IPv4."""
    host = host.strip("[]").split("%", 1)[0].lower()
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host

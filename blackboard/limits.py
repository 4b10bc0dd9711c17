"""Rate limits for the blackboard: a token bucket per key (an author on this node, or an origin node
for posts arriving from peers), pure and clocked by the caller.

A bucket holds `burst` posts and refills at `per_hour`; a post takes one. Keys are forgotten once
their bucket is full again, so a mesh of many authors costs memory only for the busy ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    burst: int  # posts allowed at once
    per_hour: float  # sustained rate

    @property
    def refill_s(self) -> float:
        return 3600.0 / self.per_hour


# An agent posting status, findings and questions needs a few posts a minute at most.
AUTHOR_LIMIT = Limit(burst=20, per_hour=240)
# Everything one node relays to us: its authors together, generously; stops a node that floods.
ORIGIN_LIMIT = Limit(burst=500, per_hour=6000)


class RateLimiter:
    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.limit.burst), now))
        return min(float(self.limit.burst), tokens + max(0.0, now - at) / self.limit.refill_s)

    def check(self, key: str, now: float) -> float:
        """0 if `key` may post now, else the seconds until it may."""
        tokens = self._tokens(key, now)
        return 0.0 if tokens >= 1 else (1 - tokens) * self.limit.refill_s

    def take(self, key: str, now: float) -> float:
        """Spend one post for `key`: 0 on success, else the seconds to wait (nothing is spent)."""
        wait = self.check(key, now)
        if wait == 0:
            self._buckets[key] = (self._tokens(key, now) - 1, now)
            if len(self._buckets) > 4096:
                self._forget_full(now)
        return wait

    def _forget_full(self, now: float) -> None:
        for key in [k for k in self._buckets if self._tokens(k, now) >= self.limit.burst]:
            del self._buckets[key]

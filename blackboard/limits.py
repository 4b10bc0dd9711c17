"""Rate limits for the blackboard: token buckets per key, pure and clocked by the caller, with the
numbers in one place.

A bucket holds `burst` posts and refills at `per_hour`; a post takes one. A local post spends from
three buckets at once (its author, the API client that sent it, and this node as a whole) and a
relayed post from one (its origin node); `take_all` spends from every bucket or from none.

The key tables are bounded: past `max_keys` the least recently used key (spent from or refused) is
forgotten, in O(1), so a poster cycling through fresh author names or an origin cycling through
fresh keys costs at most `max_keys` entries. Forgetting a key forgives only that key's debt, and
only once `max_keys` other keys were used since its last try: a key that keeps trying is never
forgotten, and a local poster's other posts are counted by the client and node buckets anyway.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
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
# One API client (an address; every loopback client is 127.0.0.1): a few agents behind one address, whatever
# author names they give. Stops a client that invents a new author per post.
SOURCE_LIMIT = Limit(burst=60, per_hour=1200)
# Everything posted on this node, all clients together (matters with --listen-all, where clients have many
# addresses). An honest origin never creates more than this, which sizes ORIGIN_LIMIT.
NODE_LIMIT = Limit(burst=200, per_hour=3000)
# Everything one origin node's posts cost us when relayed: at least twice NODE_LIMIT, so an honest origin never
# meets it in steady state; a backlog over the burst (a node catching up) arrives over the next syncs.
ORIGIN_LIMIT = Limit(burst=500, per_hour=6000)

MAX_KEYS = 4096  # keys remembered per limiter


class RateLimiter:
    def __init__(self, limit: Limit, max_keys: int = MAX_KEYS) -> None:
        self.limit = limit
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at), oldest first

    def __len__(self) -> int:
        return len(self._buckets)

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
            self._buckets.move_to_end(key)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)  # the least recently used key: most likely full again
        elif key in self._buckets:
            self._buckets.move_to_end(key)  # a key that keeps trying is used: it stays, and keeps its debt
        return wait


def take_all(buckets: Sequence[tuple[RateLimiter, str]], now: float) -> tuple[float, int]:
    """Spend one post from every `(limiter, key)` or from none: `(0, -1)` when spent, else the seconds
    until every bucket has a post again and the index of the bucket that takes longest."""
    waits = [limiter.check(key, now) for limiter, key in buckets]
    longest = max(range(len(waits)), key=waits.__getitem__, default=-1)
    if longest >= 0 and waits[longest] > 0:
        return waits[longest], longest
    for limiter, key in buckets:
        limiter.take(key, now)
    return 0.0, -1

"""How posts spread, without I/O: who gets a new post, and what two nodes exchange to catch up.

Eager push (latency): a node that accepts a post it did not have sends it on at once. The origin
sends to every member when the mesh is small (≤ `FULL_PUSH` members; one hop, the 1 s target)
and to `fanout` random members otherwise; every other node forwards a new post to `fanout` random
members except the sender and the origin (infect-and-forward-once: each node forwards a post at
most once, since a post it already has is not new). Clients that carry the blackboard get every
new post from the member they pull from; a client's own posts go to the members it is connected to.

Anti-entropy (completeness): a node that was away, or missed a push, catches up by a digest
exchange with one member — on connect and every `SYNC_S` seconds. The digest is one short hash
per hour bucket of live posts (≤ 49 entries); only buckets that differ are listed id by id, and
then each side sends the posts the other lacks. Every step is bounded (`MAX_IDS`, `MAX_BATCH_BYTES`)
so a peer can neither make us send nor make us hold more than a frame's worth at once.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh_mcp.errors import ProtocolError

from .post import ID_HEX, Post, to_wire

FULL_PUSH = 32  # up to this many other members, the origin pushes to all of them
SYNC_S = 5.0  # anti-entropy period (each node, with one random member)
MAX_IDS = 20_000  # ids listed in one sync reply; the rest wait for the next round
MAX_BATCH_BYTES = 768 << 10  # posts per frame (under the 1 MiB control-frame limit)
MAX_BUCKETS = 64  # 48 h of hour buckets, and slack for clock skew


def fanout(members: int) -> int:
    """Forwarding degree ≈ log2(n) + 4: a node misses an infect-and-forward-once epidemic with
    probability ≈ e^-fanout (< 1e-4 from 33 members); the anti-entropy sync brings the rare miss."""
    n = max(members, 1)
    return min(n, n.bit_length() + 4)


def push_targets(
    post: Post, me: str, sender: str | None, members: Sequence[str], subscribers: Iterable[str], rng: random.Random
) -> list[str]:
    """Peers to send a post we just accepted. `sender` is None for a post written here; a sender
    that is no member is a client handing us its own post, so we make the first hop for it."""
    others = [m for m in members if m not in (me, sender, post.origin)]
    first_hop = sender is None or sender not in members
    small = len(set(members) - {post.origin}) <= FULL_PUSH  # the same answer on every node
    if first_hop and small:
        chosen = others
    elif sender == post.origin and small:
        chosen = []  # its origin sent it to every member already; anti-entropy covers a lost push
    else:
        chosen = rng.sample(others, min(len(others), fanout(len(members))))
    return chosen + sorted(s for s in subscribers if s not in (sender, me) and s not in chosen)


def differing(mine: Mapping[int, str], theirs: Mapping[int, str]) -> list[int]:
    """Hour buckets whose contents differ (present on one side only counts)."""
    return sorted(b for b in set(mine) | set(theirs) if mine.get(b) != theirs.get(b))


@dataclass(frozen=True)
class Exchange:
    want: list[str]  # ids they have and we lack: ask for these
    give: list[str]  # ids we have and they lack: send these


def plan_exchange(mine: Mapping[int, Sequence[str]], theirs: Mapping[int, Sequence[str]]) -> Exchange:
    """What to fetch and what to send, given both sides' ids in the buckets that differed.

    Buckets they did not list (their reply was cut at MAX_IDS) are left for the next round."""
    want: list[str] = []
    give: list[str] = []
    for bucket, their_ids in theirs.items():
        have = set(mine.get(bucket, ()))
        seen = set(their_ids)
        want.extend(i for i in their_ids if i not in have)
        give.extend(i for i in mine.get(bucket, ()) if i not in seen)
    return Exchange(want=want[:MAX_IDS], give=give[:MAX_IDS])


def bounded_ids(ids: Mapping[int, Sequence[str]]) -> dict[int, list[str]]:
    """Our ids for the differing buckets, oldest buckets first, cut at MAX_IDS in all."""
    out: dict[int, list[str]] = {}
    room = MAX_IDS
    for bucket in sorted(ids):
        if room <= 0:
            break
        out[bucket] = list(ids[bucket][:room])
        room -= len(out[bucket])
    return out


def batches(posts: Iterable[Post]) -> Iterator[list[dict[str, Any]]]:
    """Wire forms of posts grouped into frames of at most MAX_BATCH_BYTES of JSON."""
    batch: list[dict[str, Any]] = []
    size = 0
    for post in posts:
        wire = to_wire(post)
        n = len(json.dumps(wire, separators=(",", ":"), ensure_ascii=False).encode()) + 1
        if batch and size + n > MAX_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(wire)
        size += n
    if batch:
        yield batch


# --- strict parsing of peer input --------------------------------------------------------------------


def parse_digest(obj: object) -> dict[int, str]:
    if not isinstance(obj, dict) or len(obj) > MAX_BUCKETS:
        raise ProtocolError(f"a blackboard digest is an object of at most {MAX_BUCKETS} buckets")
    out: dict[int, str] = {}
    for key, value in obj.items():
        bucket = _bucket(key)
        if not isinstance(value, str) or len(value) > 64:
            raise ProtocolError("a digest bucket's hash is a short string")
        out[bucket] = value
    return out


def parse_ids(obj: object) -> dict[int, list[str]]:
    if not isinstance(obj, dict) or len(obj) > MAX_BUCKETS:
        raise ProtocolError(f"blackboard ids are an object of at most {MAX_BUCKETS} buckets")
    out: dict[int, list[str]] = {}
    total = 0
    for key, value in obj.items():
        out[_bucket(key)] = parse_id_list(value)
        total += len(value)
    if total > MAX_IDS:
        raise ProtocolError(f"more than {MAX_IDS} ids in one sync")
    return out


def parse_id_list(obj: object) -> list[str]:
    if not isinstance(obj, list) or len(obj) > MAX_IDS:
        raise ProtocolError(f"a list of at most {MAX_IDS} post ids expected")
    for item in obj:
        if not isinstance(item, str) or len(item) != ID_HEX:
            raise ProtocolError("a post id is 32 hex characters")
    return obj


def _bucket(key: object) -> int:
    try:
        bucket = int(str(key))
    except ValueError as exc:
        raise ProtocolError("a digest bucket is an hour number") from exc
    if not 0 <= bucket < 1 << 32:
        raise ProtocolError("a digest bucket is an hour number")
    return bucket

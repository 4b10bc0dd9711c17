"""Gossip membership (pure): who is in the mesh, what each member says about itself, who is alive.

No sockets and no clocks: `Gossip` takes `(input, now)` and returns the messages to send; the
transport carries them (JSON objects over authenticated streams) and tells `receive` who sent
each one. `now` is wall-clock seconds (`time.time()`): record versions are wall-clock ms, and
liveness timers use differences of it.

State. For every member: its latest signed `NodeRecord` (ordered by `records.supersedes`), its
heartbeat (a counter its origin advances every `heartbeat_period`; merged by max), and the local
time either last advanced. Every change goes through `_merge_record` / `_merge_heartbeat` (the
reducer): max-merges over total orders, so delivering the same records and heartbeats in any
order, any number of times, gives the same state. A member whose heartbeat has not advanced for
`fail_after` is dead; a signed `leaving` record makes it left at once. Dead and left members stay
as tombstones for `tombstone_s`, so stale gossip cannot bring them back: only a higher heartbeat
(dead ones) or a higher record version (a restart) does.

Protocol (version `PROTOCOL`; each round a node opens one exchange with `fanout` random members):

    A → B  syn    {full, pull, digest, hb}    digest: (node id, version) rows, hb: (node id, heartbeat)
    B → A  ack    {hb, records, wants, more}  records B has newer than A's digest, B's new records
                                              A did not list, (full) every member A did not list;
                                              wants: ids A listed newer than B's
    A → B  delta  {records}                   what B wanted

Only what is new travels: `hb` carries the heartbeats that advanced here in the last `hot_s` (and
our own), minus those the syn shows the peer already has; `digest` carries our own version and
the records that changed here in the last `rumor_s`. Every `full_sync_s` a syn carries the full
digest instead, which repairs whatever the rumours missed. Rows are packed binary (12 or 16 bytes
before base64), so a heartbeat costs 16 bytes on the wire. In a large mesh each origin beats less
often (`heartbeat_period`: the mesh's heartbeats are capped at `heartbeats_per_s`), which caps the
traffic per node, and `fail_after` grows with the time a heartbeat needs to cross the mesh.

Clients (role "client") are not members: nobody stores their records or gossips with them. A
client's tick sends a `pull` syn to one member, which answers it like any syn without merging
anything from it; a client never relays.
"""

from __future__ import annotations

import functools
import json
import math
import random
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from inference.errors import ProtocolError

from .records import (
    NodeRecord,
    b64,
    from_wire,
    is_node_id,
    next_version,
    public_key_bytes,
    sign,
    supersedes,
    to_wire,
    unb64,
    verify,
)

PROTOCOL = 1
MAX_MESSAGE_BYTES = 1 << 20
MAX_ROWS = 8192  # rows per digest or heartbeat list (and so the largest mesh a full digest covers)
MAX_RECORDS = 512  # records per message
RECORD_BUDGET = 640 * 1024  # encoded record bytes one outgoing message may carry
MAX_ORPHANS = MAX_ROWS  # heartbeats kept for ids whose record has not arrived yet
U32_MAX = (1 << 32) - 1
_HB = struct.Struct(">8sI")  # node id (8 raw bytes), heartbeat
_DIGEST = struct.Struct(">8sQ")  # node id, record version
_SYN_KEYS = frozenset({"v", "type", "full", "pull", "digest", "hb"})
_ACK_KEYS = frozenset({"v", "type", "hb", "records", "wants", "more"})
_DELTA_KEYS = frozenset({"v", "type", "records"})

Status = Literal["alive", "dead", "left"]


@dataclass(frozen=True)
class GossipConfig:
    interval_s: float = 0.5  # round period: each tick opens `fanout` exchanges
    fanout: int = 1
    heartbeat_s: float = 1.0  # own heartbeat period in a small mesh
    heartbeats_per_s: float = 250.0  # the whole mesh's heartbeat rate is capped here (large meshes)
    fail_after_s: float = 4.0  # a heartbeat stalled this long means dead (a floor; grows with the mesh)
    fail_margin: float = 1.5  # fail_after ≥ margin × (heartbeat period + time to cross the mesh)
    hot_s: float = 1.0  # a heartbeat that advanced here this recently is passed on
    rumor_s: float = 3.0  # a record version learned this recently is announced in digests
    full_sync_s: float = 20.0  # period of full-digest exchanges
    tombstone_s: float = 60.0  # dead and left members are remembered this long
    max_hot_rows: int = 1024  # heartbeat rows per message

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.fanout < 1 or self.heartbeat_s < 1.0 or self.heartbeats_per_s <= 0:
            raise ValueError("gossip config: interval_s > 0, fanout ≥ 1, heartbeat_s ≥ 1 s, heartbeats_per_s > 0")
        if not 0 < self.max_hot_rows <= MAX_ROWS:
            raise ValueError(f"gossip config: max_hot_rows must be 1..{MAX_ROWS}")

    def heartbeat_period(self, members: int) -> float:
        """How often each origin advances its heartbeat in a mesh of `members` nodes."""
        return max(self.heartbeat_s, members / self.heartbeats_per_s)

    def fail_after(self, members: int) -> float:
        """How long a member's heartbeat may stall before it is dead: the floor in small meshes,
        else a margin over one heartbeat period plus the rounds a push-pull rumour needs to reach
        every member (about log2 n)."""
        spread = self.interval_s * math.log2(max(members, 2))
        return max(self.fail_after_s, self.fail_margin * (self.heartbeat_period(members) + spread))


@dataclass(frozen=True)
class Outgoing:
    peer: str  # node id
    message: dict[str, Any]  # JSON-serializable; shared between outgoing copies: do not mutate


@dataclass(frozen=True)
class MembershipEvent:
    kind: Literal["joined", "updated", "left", "died"]
    node_id: str
    record: NodeRecord


@dataclass(frozen=True)
class Member:
    record: NodeRecord
    heartbeat: int
    status: Status


# ------------------------------------------------------------------------------------ messages


@dataclass(frozen=True)
class Syn:
    full: bool  # digest lists every member (else only recent changes)
    pull: bool  # sent by a client: answer, but merge nothing from it
    digest: bytes  # packed _DIGEST rows
    heartbeats: bytes  # packed _HB rows


@dataclass(frozen=True)
class Ack:
    heartbeats: bytes
    records: tuple[NodeRecord, ...]
    wants: tuple[str, ...]
    more: bool  # records were left out: the next round should be a full sync


@dataclass(frozen=True)
class Delta:
    records: tuple[NodeRecord, ...]


Message = Syn | Ack | Delta


def message_to_wire(msg: Message) -> dict[str, Any]:
    if isinstance(msg, Syn):
        return {
            "v": PROTOCOL,
            "type": "syn",
            "full": msg.full,
            "pull": msg.pull,
            "digest": b64(msg.digest),
            "hb": b64(msg.heartbeats),
        }
    if isinstance(msg, Ack):
        return {
            "v": PROTOCOL,
            "type": "ack",
            "hb": b64(msg.heartbeats),
            "records": [_wire(r) for r in msg.records],
            "wants": list(msg.wants),
            "more": msg.more,
        }
    return {"v": PROTOCOL, "type": "delta", "records": [_wire(r) for r in msg.records]}


def parse_message(obj: object) -> Message:
    """A gossip message from its wire form, strictly: ProtocolError for anything unexpected
    (signatures are checked when records are merged)."""
    if not isinstance(obj, dict):
        raise ProtocolError("a gossip message must be an object")
    if obj.get("v") != PROTOCOL or type(obj.get("v")) is not int:
        raise ProtocolError(f"gossip protocol {obj.get('v')!r} is not supported (this node speaks {PROTOCOL})")
    kind = obj.get("type")
    expected = {"syn": _SYN_KEYS, "ack": _ACK_KEYS, "delta": _DELTA_KEYS}.get(kind) if isinstance(kind, str) else None
    if expected is None:
        raise ProtocolError(f"unknown gossip message type {kind!r:.40}")
    if obj.keys() != expected:
        raise ProtocolError(f"gossip {kind}: fields must be exactly {sorted(expected)}")
    if kind == "syn":
        return Syn(
            full=_flag(obj, "full"),
            pull=_flag(obj, "pull"),
            digest=_rows(obj, "digest", _DIGEST),
            heartbeats=_rows(obj, "hb", _HB),
        )
    records = obj["records"]
    if not isinstance(records, list) or len(records) > MAX_RECORDS:
        raise ProtocolError(f"gossip {kind}: records must be a list of at most {MAX_RECORDS}")
    parsed = tuple(from_wire(r) for r in records)
    if kind == "delta":
        return Delta(records=parsed)
    wants = obj["wants"]
    if not isinstance(wants, list) or len(wants) > MAX_ROWS or not all(is_node_id(w) for w in wants):
        raise ProtocolError(f"gossip ack: wants must be a list of at most {MAX_ROWS} node ids")
    return Ack(heartbeats=_rows(obj, "hb", _HB), records=parsed, wants=tuple(wants), more=_flag(obj, "more"))


def encode(message: dict[str, Any]) -> bytes:
    """Compact JSON, as the transport sends it."""
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    """The inverse of `encode`, bounded by MAX_MESSAGE_BYTES (ProtocolError)."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"gossip message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"malformed gossip message: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("a gossip message must be a JSON object")
    return obj


def _flag(obj: dict[str, Any], key: str) -> bool:
    value = obj[key]
    if not isinstance(value, bool):
        raise ProtocolError(f"gossip message: {key} must be a boolean")
    return value


def _rows(obj: dict[str, Any], key: str, row: struct.Struct) -> bytes:
    data = unb64(obj[key], f"gossip {key}", max_size=MAX_ROWS * row.size)
    if len(data) % row.size:
        raise ProtocolError(f"gossip {key}: {len(data)} bytes is not a whole number of {row.size}-byte rows")
    return data


def _pack(row: struct.Struct, items: Iterable[tuple[str, int]]) -> bytes:
    return b"".join(row.pack(bytes.fromhex(nid), value) for nid, value in items)


def _unpack(row: struct.Struct, data: bytes) -> Iterator[tuple[str, int]]:
    for raw, value in row.iter_unpack(data):
        yield raw.hex(), value


@functools.lru_cache(maxsize=16384)
def _wire(record: NodeRecord) -> dict[str, Any]:
    # Cached (records are immutable): an ack may carry hundreds of them. Treat as read-only.
    return to_wire(record)


@functools.lru_cache(maxsize=16384)
def _wire_size(record: NodeRecord) -> int:
    return len(encode(_wire(record))) + 1


# ---------------------------------------------------------------------------------- the state


class Gossip:
    """One node's view of the mesh, and the protocol that keeps it converging (see module doc)."""

    def __init__(
        self, me: NodeRecord, private_key: Ed25519PrivateKey, config: GossipConfig, rng: random.Random, now: float
    ) -> None:
        if public_key_bytes(private_key) != me.public_key:
            raise ValueError("the private key does not match this node's record")
        self._key = private_key
        self._config = config
        self._rng = rng
        self._client = me.role == "client"
        self._me = sign(replace(me, version=next_version(me.version, now), leaving=False), private_key)
        self._my_hb = min(max(int(now), 0), U32_MAX)
        self._next_beat = now
        self._next_full = now + rng.uniform(0, config.full_sync_s)
        self._want_full = False
        self._left = False
        self._records: dict[str, NodeRecord] = {}  # other members, alive or tombstoned
        self._hb: dict[str, int] = {}  # heartbeats (also of orphans: ids whose record is still to come)
        self._orphans: dict[str, float] = {}
        self._seen: dict[str, float] = {}  # alive members → local time of their last advance, oldest first
        self._changed: dict[str, float] = {self._me.node_id: now}  # version learned at, oldest first
        self._down: dict[str, tuple[Status, float]] = {}  # tombstones: "dead" | "left", since
        self._events: list[MembershipEvent] = []

    # ------------------------------------------------------------------------------ queries

    @property
    def me(self) -> NodeRecord:
        return self._me

    @property
    def config(self) -> GossipConfig:
        return self._config

    def alive(self, now: float) -> list[NodeRecord]:
        """The members routing may use, this node included (until it leaves), by node id."""
        cutoff = now - self._config.fail_after(len(self._seen) + 1)
        out = [self._records[nid] for nid, t in self._seen.items() if t > cutoff]
        if not self._left:
            out.append(self._me)
        return sorted(out, key=lambda r: r.node_id)

    def is_alive(self, node_id: str, now: float) -> bool:
        if node_id == self._me.node_id:
            return not self._left
        t = self._seen.get(node_id)
        return t is not None and now - t < self._config.fail_after(len(self._seen) + 1)

    def record(self, node_id: str) -> NodeRecord | None:
        """The latest record known for `node_id`, alive or tombstoned."""
        return self._me if node_id == self._me.node_id else self._records.get(node_id)

    def members(self, now: float) -> list[Member]:
        """Every member known, tombstones included, with its status (for the console and tests)."""
        out = [Member(self._me, self._my_hb, "left" if self._left else "alive")]
        for nid, rec in self._records.items():
            if nid in self._down:
                status: Status = self._down[nid][0]
            else:
                status = "alive" if self.is_alive(nid, now) else "dead"
            out.append(Member(rec, self._hb.get(nid, 0), status))
        return sorted(out, key=lambda m: m.record.node_id)

    def drain_events(self) -> list[MembershipEvent]:
        events, self._events = self._events, []
        return events

    # ----------------------------------------------------------------------------- inputs

    def tick(self, now: float) -> list[Outgoing]:
        """The periodic step (every `interval_s`): expire, beat, open exchanges."""
        if self._left:
            return []
        self._expire(now)
        members = len(self._seen) + 1
        if now >= self._next_beat and not self._client:
            self._my_hb = min(self._my_hb + 1, U32_MAX)
            self._next_beat = now + self._config.heartbeat_period(members)
        full = self._want_full or now >= self._next_full
        if full:
            self._want_full = False
            self._next_full = now + self._config.full_sync_s
        alive = list(self._seen)
        targets = self._rng.sample(alive, min(self._config.fanout, len(alive)))
        dead = [nid for nid, (status, _) in self._down.items() if status == "dead"]
        if dead and (full or not targets):
            # Now and then try a dead member: heals partitions and finds restarted peers.
            targets.append(self._rng.choice(dead))
        if not targets:
            return []
        wire = message_to_wire(self._syn(full, now))
        return [Outgoing(peer, wire) for peer in targets]

    def receive(self, sender: str, message: dict[str, Any], now: float) -> list[Outgoing]:
        """Handle one message from an authenticated peer. ProtocolError (state unchanged) for
        anything malformed, oversized, of another version, or carrying a forged record."""
        msg = parse_message(message)
        if isinstance(msg, Syn):
            return self._on_syn(sender, msg, now)
        for record in msg.records:
            self._check(record)
        if isinstance(msg, Ack):
            self._merge_heartbeats(msg.heartbeats, now)
        for record in msg.records:
            self._merge_record(record, now)
        if isinstance(msg, Ack):
            if msg.more:
                self._want_full = True
            if msg.wants and not self._client and not self._left:
                known = [r for r in map(self.record, msg.wants) if r is not None]
                if known:
                    records, _ = self._budget(known)
                    return [Outgoing(sender, message_to_wire(Delta(records)))]
        return []

    def add_peer(self, record: NodeRecord, now: float) -> list[Outgoing]:
        """A peer the transport authenticated (its verified record): learn it and, if it is new
        to us, open a full exchange with it at once."""
        verify(record)
        nid = record.node_id
        if nid == self._me.node_id or record.role == "client" or self._left:
            return []  # clients are not members
        was_alive = nid in self._seen
        self._merge_record(record, now)
        if was_alive or nid not in self._seen:
            return []
        return [Outgoing(nid, message_to_wire(self._syn(True, now)))]

    def update_self(self, now: float, **changes: Any) -> NodeRecord:
        """Re-sign this node's record with `changes` and a new version; gossip spreads it."""
        fixed = changes.keys() & {"node_id", "public_key", "version", "signature"}
        if fixed:
            raise ValueError(f"update_self cannot change {sorted(fixed)}")
        if "role" in changes and (changes["role"] == "client") != self._client:
            raise ValueError("a node cannot switch between client and member roles")
        for key in ("addresses", "models_on_disk", "models_served"):
            if key in changes:
                changes[key] = tuple(changes[key])
        self._me = sign(replace(self._me, **changes, version=next_version(self._me.version, now)), self._key)
        self._note_changed(self._me.node_id, now)
        return self._me

    def leave(self, now: float) -> list[Outgoing]:
        """Clean shutdown: a signed leaving record to every alive member, which drop us at once."""
        if self._left:
            return []
        record = self.update_self(now, leaving=True)
        self._left = True
        if self._client:
            return []
        wire = message_to_wire(Delta((record,)))
        return [Outgoing(peer, wire) for peer in self._seen]

    # --------------------------------------------------------------------------- exchanges

    def _syn(self, full: bool, now: float) -> Syn:
        me = self._me
        if self._client:
            # A client relays nothing: its digest only says what it already has (on full pulls).
            rows = [(nid, r.version) for nid, r in self._records.items()] if full else []
            return Syn(full=full, pull=True, digest=_pack(_DIGEST, rows), heartbeats=b"")
        if full:
            listed = {nid: self._records[nid].version for nid in self._seen}
            listed.update((nid, self._version(nid)) for nid in self._recent(self._changed, now, self._config.rumor_s))
        else:
            listed = {nid: self._version(nid) for nid in self._recent(self._changed, now, self._config.rumor_s)}
        listed[me.node_id] = me.version
        hb = [(me.node_id, self._my_hb), *self._hot(now, {})]
        return Syn(
            full=full,
            pull=False,
            digest=_pack(_DIGEST, list(listed.items())[:MAX_ROWS]),
            heartbeats=_pack(_HB, hb[: self._config.max_hot_rows]),
        )

    def _on_syn(self, sender: str, syn: Syn, now: float) -> list[Outgoing]:
        if self._client or self._left:
            return []  # nobody gossips with clients; a leaving node answers no more
        my_id = self._me.node_id
        theirs_hb: dict[str, int] = {}
        if not syn.pull:
            theirs_hb = dict(_unpack(_HB, syn.heartbeats))
            self._merge_heartbeats(syn.heartbeats, now)
        theirs = dict(_unpack(_DIGEST, syn.digest))
        send: dict[str, NodeRecord] = {}
        wants: list[str] = []
        for nid, version in theirs.items():
            if nid == my_id:
                if version > self._me.version:  # our previous incarnation's record is still around
                    self._bump_version(version, now)
                elif version < self._me.version:
                    send[nid] = self._me
                continue
            known = self._records.get(nid)
            if known is None or version > known.version:
                if not syn.pull:
                    wants.append(nid)
            elif version < known.version:
                send[nid] = known
        for nid in self._recent(self._changed, now, self._config.rumor_s):
            if nid not in theirs and nid not in send:
                send[nid] = self._me if nid == my_id else self._records[nid]
        if syn.full:
            if my_id not in theirs:
                send[my_id] = self._me
            for nid in self._seen:
                if nid not in theirs and nid not in send:
                    send[nid] = self._records[nid]
        records, more = self._budget(list(send.values()))
        own = [] if theirs_hb.get(my_id, -1) >= self._my_hb else [(my_id, self._my_hb)]
        hb = [*own, *self._hot(now, theirs_hb)][: self._config.max_hot_rows]
        ack = Ack(heartbeats=_pack(_HB, hb), records=records, wants=tuple(wants[:MAX_ROWS]), more=more)
        return [Outgoing(sender, message_to_wire(ack))]

    def _hot(self, now: float, skip: dict[str, int]) -> Iterator[tuple[str, int]]:
        """(id, heartbeat) of the members that advanced within hot_s, newest first, except those the
        peer already has (`skip`)."""
        hb = self._hb
        for nid in self._recent(self._seen, now, self._config.hot_s):
            value = hb[nid]
            if skip.get(nid, -1) < value:
                yield nid, value

    @staticmethod
    def _recent(times: dict[str, float], now: float, window: float) -> Iterator[str]:
        cutoff = now - window
        for nid, t in reversed(times.items()):
            if t < cutoff:
                return
            yield nid

    def _budget(self, records: list[NodeRecord]) -> tuple[tuple[NodeRecord, ...], bool]:
        """As many records as one message may carry, and whether some were left out."""
        out: list[NodeRecord] = []
        size = 0
        for record in records:
            size += _wire_size(record)
            if size > RECORD_BUDGET or len(out) == MAX_RECORDS:
                return tuple(out), True
            out.append(record)
        return tuple(out), False

    # ----------------------------------------------------------------------------- reducer

    def _check(self, record: NodeRecord) -> None:
        """Verify a received record unless it is exactly one we hold (already verified)."""
        if record != self._records.get(record.node_id) and record != self._me:
            verify(record)

    def _merge_record(self, record: NodeRecord, now: float) -> None:
        """The reducer for records (verified): keep the greatest per origin, in `supersedes` order."""
        nid = record.node_id
        if nid == self._me.node_id:
            if supersedes(record, self._me):
                self._bump_version(record.version, now)
            return
        if record.role == "client":
            return  # clients are not members
        old = self._records.get(nid)
        if not supersedes(record, old):
            return
        self._records[nid] = record
        self._hb.setdefault(nid, 0)
        self._orphans.pop(nid, None)
        self._note_changed(nid, now)
        was_alive = self._seen.pop(nid, None) is not None
        if record.leaving:
            if was_alive:
                self._events.append(MembershipEvent("left", nid, record))
            self._down[nid] = ("left", now)
            return
        self._down.pop(nid, None)
        self._seen[nid] = now
        self._events.append(MembershipEvent("updated" if was_alive else "joined", nid, record))

    def _merge_heartbeats(self, rows: bytes, now: float) -> None:
        """The reducer for heartbeats: max per origin; an advance is a sign of life."""
        hb, seen, records, my_id = self._hb, self._seen, self._records, self._me.node_id
        for raw, value in _HB.iter_unpack(rows):
            nid = raw.hex()
            current = hb.get(nid)
            if current is not None and value <= current:
                continue
            if nid == my_id:
                if value >= self._my_hb:  # our previous incarnation beat this far
                    self._my_hb = min(value + 1, U32_MAX)
                continue
            if nid not in records:
                if current is None and len(self._orphans) >= MAX_ORPHANS:
                    continue
                self._orphans.setdefault(nid, now)
                hb[nid] = value
                continue
            hb[nid] = value
            down = self._down.get(nid)
            if down is not None:
                if down[0] == "left":
                    continue  # only a new version brings back a member that left
                del self._down[nid]
                self._events.append(MembershipEvent("joined", nid, records[nid]))
            seen.pop(nid, None)
            seen[nid] = now

    def _bump_version(self, above: int, now: float) -> None:
        self._me = sign(replace(self._me, version=next_version(max(above, self._me.version), now)), self._key)
        self._note_changed(self._me.node_id, now)

    def _note_changed(self, nid: str, now: float) -> None:
        self._changed.pop(nid, None)
        self._changed[nid] = now

    def _version(self, nid: str) -> int:
        return self._me.version if nid == self._me.node_id else self._records[nid].version

    def _expire(self, now: float) -> None:
        """Members whose heartbeat stalled become dead; old tombstones and orphans are forgotten."""
        cutoff = now - self._config.fail_after(len(self._seen) + 1)
        stalled = []
        for nid, t in self._seen.items():
            if t > cutoff:
                break
            stalled.append(nid)
        for nid in stalled:
            del self._seen[nid]
            self._down[nid] = ("dead", now)
            self._events.append(MembershipEvent("died", nid, self._records[nid]))
        forget = now - self._config.tombstone_s
        for nid in [n for n, (_, since) in self._down.items() if since < forget]:
            del self._down[nid], self._records[nid], self._hb[nid]
            self._changed.pop(nid, None)
        for nid in [n for n, t in self._orphans.items() if t < forget]:
            del self._orphans[nid], self._hb[nid]
        rumor = now - max(self._config.rumor_s, self._config.hot_s)
        while self._changed:
            nid, t = next(iter(self._changed.items()))
            if t >= rumor:
                break
            del self._changed[nid]

"""Gossip membership (pure): who is in the mesh, what each member says about itself, who is alive.

No sockets and no clocks: `Gossip` takes `(input, now)` and returns the messages to send; the
transport carries them (JSON objects over authenticated streams) and tells `receive` who sent
each one. `now` is wall-clock seconds (`time.time()`): record versions are wall-clock ms, and
liveness timers use differences of it. The messages themselves (fields, packing, bounds, strict
parsing) are `gossip_wire.py`'s.

State. For every member: its latest signed `NodeRecord` (ordered by `records.supersedes`), its
heartbeat (a counter its origin advances every `heartbeat_period`; the greatest wins), and the
local time either last advanced. Everything peers say goes through one reducer (`_apply`), made
of max-merges, so any order and any repetition of the same deliveries gives the same state. A
member whose heartbeat has not advanced for `fail_after` is dead; a signed `leaving` record makes
it left at once. Dead and left members stay as tombstones for `tombstone_s`, so stale gossip
cannot bring them back: only a higher heartbeat (dead ones) or record version (a restart) does.

Protocol (`PROTOCOL` in every message). Each round a node opens an exchange with `fanout` random
members (push-pull anti-entropy):

    A → B  syn    {full, pull, digest, hb}
    B → A  ack    {full, hb, digest, records, wants, more}
    A → B  delta  {records, wants, more}     if B wanted records or A wants some back
    B → A  delta  {records, wants: [], more} if A wanted records

`digest` rows are (node id, record version) and `hb` rows (node id, heartbeat). Only what is new
travels:

- a syn's digest lists our own version and the records that changed here in the last
  `rumor_rounds` rounds; B sends the records it has newer, wants those A has newer, and lists its
  own recent changes that A did not, for A to want in its delta;
- a syn's `hb` carries our heartbeat, those that advanced here in the last `hot_rounds` rounds,
  and those of members not heard from for `ask_after` (a question: B answers with any newer
  heartbeat it has). B's ack carries its own recent heartbeats except those A showed it has;
- a full syn (with each new peer, then after 1, 2, 4, 8... seconds, then every `full_sync_s`)
  lists every member in its digest: B answers with all A lacks, in pieces of at most
  MAX_RECORDS / RECORD_BUDGET (`more`: A asks again next round). This repairs missed rumours.

In a large mesh each origin beats less often (`heartbeat_period`: the mesh's heartbeats are
capped at `heartbeats_per_s`), which caps the traffic per node, and `fail_after` grows with the
time a heartbeat needs to cross the mesh. Every message is bounded (rows, records, wants) to stay
under MAX_MESSAGE_BYTES.

Clients (role "client") are not members: nobody stores their records or gossips with them. A
client's tick sends a `pull` syn to one member, which answers without merging anything from it;
a client wants records but never sends any, and never relays.

Size: one responsibility earns this module's length (about 550 lines, a tenth of them the specification above):
the membership state machine, `Gossip`, with its reducer. What each message carries and how the reducer merges it
are one design, checked together (tests/test_gossip.py, the fuzzer); splitting the class would split that design.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .gossip_wire import MAX_RECORDS, MAX_ROWS, RECORD_BUDGET, U32_MAX, Ack, Delta, Syn, message_to_wire, parse_message
from .records import (
    MAX_INT,
    NodeRecord,
    is_node_id,
    next_version,
    public_key_bytes,
    sign,
    supersedes,
    verify,
    wire_form,
)

MAX_ORPHANS = MAX_ROWS  # heartbeats kept for ids whose record has not arrived yet
MAX_CLOCK_SKEW_S = 86400  # heartbeats further ahead of our clock than this are ignored

Status = Literal["alive", "dead", "left"]


@dataclass(frozen=True)
class GossipConfig:
    interval_s: float = 0.5  # round period: each tick opens `fanout` exchanges
    fanout: int = 1
    heartbeat_s: float = 1.0  # own heartbeat period in a small mesh
    heartbeats_per_s: float = 150.0  # the whole mesh's heartbeat rate is capped here (large meshes)
    fail_after_s: float = 4.0  # a heartbeat stalled this long means dead (a floor; grows with the mesh)
    hot_rounds: int = 2  # a heartbeat that advanced here rides in this many of our syns (and acks meanwhile)
    rumor_rounds: int = 6  # a record version learned here is announced in our digests for this many rounds
    full_sync_s: float = 20.0  # period of full-digest exchanges
    tombstone_s: float = 60.0  # dead and left members are remembered this long
    max_hot_rows: int = 1024  # heartbeat rows per message

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.fanout < 1 or self.heartbeat_s < 1.0 or self.heartbeats_per_s <= 0:
            raise ValueError("gossip config: interval_s > 0, fanout ≥ 1, heartbeat_s ≥ 1 s, heartbeats_per_s > 0")
        if self.hot_rounds < 1 or self.rumor_rounds < 1:
            raise ValueError("gossip config: hot_rounds and rumor_rounds must be ≥ 1")
        if not 0 < self.max_hot_rows <= MAX_ROWS:
            raise ValueError(f"gossip config: max_hot_rows must be 1..{MAX_ROWS}")

    def heartbeat_period(self, members: int) -> float:
        """How often each origin advances its heartbeat in a mesh of `members` nodes."""
        return max(self.heartbeat_s, members / self.heartbeats_per_s)

    def ask_after(self, members: int) -> float:
        """A member not heard from for this long is listed in our syns, for the peer to refresh."""
        return self.heartbeat_period(members) + self.hot_rounds * self.interval_s

    def fail_after(self, members: int) -> float:
        """How long a member's heartbeat may stall before it is dead: the floor in small meshes,
        else `ask_after` plus the rounds a rumour needs to cross the mesh (about log2 n)."""
        spread = self.interval_s * math.log2(max(members, 2))
        return max(self.fail_after_s, self.ask_after(members) + spread)


@dataclass(frozen=True)
class Outgoing:
    peer: str  # node id
    message: dict[str, Any]  # JSON-serializable; may be shared between outgoing copies: do not mutate


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


def _first(rows: dict[bytes, int], limit: int) -> dict[bytes, int]:
    return rows if len(rows) <= limit else dict(itertools.islice(rows.items(), limit))


def _raw(node_id: str) -> bytes | None:
    """The 8 bytes a node id names inside this module (rows and dict keys), None if not a node id."""
    return bytes.fromhex(node_id) if is_node_id(node_id) else None


# ---------------------------------------------------------------------------------- the state


class Gossip:
    """One node's view of the mesh, and the protocol that keeps it converging (see module doc).

    Inside, members are keyed by the 8 raw bytes of their node id (as in the packed rows)."""

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
        self._my_raw = bytes.fromhex(self._me.node_id)
        self._my_hb = min(max(int(now), 0), U32_MAX)
        self._next_beat = now
        # Full syncs: with a new peer at once, then after 1, 2, 4, 8... s, then every full_sync_s.
        self._full_gap = config.interval_s
        self._next_full = now + self._full_gap
        self._want_full = True  # until an answer to a full syn comes back complete
        self._left = False
        self._records: dict[bytes, NodeRecord] = {}  # other members, alive or tombstoned
        self._hb: dict[bytes, int] = {}  # heartbeats (also of orphans: ids whose record is still to come)
        self._orphans: dict[bytes, float] = {}
        self._seen: dict[bytes, float] = {}  # alive members → local time of their last sign of life, oldest first
        # Heartbeats that advanced here, one dict per round, the last `hot_rounds` rounds and this one.
        self._beats: list[dict[bytes, int]] = [{} for _ in range(config.hot_rounds + 1)]
        # Record versions learned here, one dict per round, the last `rumor_rounds` rounds and this one.
        self._news: list[dict[bytes, int]] = [{} for _ in range(config.rumor_rounds + 1)]
        self._down: dict[bytes, tuple[Status, float]] = {}  # tombstones: "dead" | "left", since
        self._events: list[MembershipEvent] = []
        self._banned: frozenset[bytes] = frozenset()  # evicted by a key rotation: never members again

    # ------------------------------------------------------------------------------ queries

    @property
    def me(self) -> NodeRecord:
        return self._me

    @property
    def config(self) -> GossipConfig:
        return self._config

    def alive(self, now: float) -> list[NodeRecord]:
        """The members routing may use, this node included (until it leaves), by node id."""
        cutoff = now - self._fail_after()
        out = [self._records[raw] for raw, t in self._seen.items() if t > cutoff]
        if not self._left:
            out.append(self._me)
        return sorted(out, key=lambda r: r.node_id)

    def is_alive(self, node_id: str, now: float) -> bool:
        if node_id == self._me.node_id:
            return not self._left
        raw = _raw(node_id)
        t = self._seen.get(raw) if raw is not None else None
        return t is not None and now - t < self._fail_after()

    def record(self, node_id: str) -> NodeRecord | None:
        """The latest record known for `node_id`, alive or tombstoned."""
        if node_id == self._me.node_id:
            return self._me
        raw = _raw(node_id)
        return self._records.get(raw) if raw is not None else None

    def members(self, now: float) -> list[Member]:
        """Every member known, tombstones included, with its status (for the console and tests)."""
        out = [Member(self._me, self._my_hb, "left" if self._left else "alive")]
        cutoff = now - self._fail_after()
        for raw, rec in self._records.items():
            down = self._down.get(raw)
            status: Status = down[0] if down else ("alive" if self._seen[raw] > cutoff else "dead")
            out.append(Member(rec, self._hb[raw], status))
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
        for rounds in (self._beats, self._news):
            rounds.pop(0)
            rounds.append({})
        if now >= self._next_beat and not self._client:
            self._my_hb = min(self._my_hb + 1, U32_MAX)
            self._next_beat = now + self._config.heartbeat_period(len(self._seen) + 1)
        full = self._want_full or now >= self._next_full
        if full:
            self._full_gap = min(2 * self._full_gap, self._config.full_sync_s)
            self._next_full = now + self._full_gap * self._rng.uniform(0.75, 1.25)
        alive = list(self._seen)
        targets = self._rng.sample(alive, min(self._config.fanout, len(alive)))
        dead = [raw for raw, (status, _) in self._down.items() if status == "dead"]
        if dead and (full or not targets):
            # Now and then try a dead member: heals partitions and finds restarted peers.
            targets.append(self._rng.choice(dead))
        if not targets:
            return []
        wire = message_to_wire(self._syn(full, now))
        return [Outgoing(raw.hex(), wire) for raw in targets]

    def receive(self, sender: str, message: dict[str, Any], now: float) -> list[Outgoing]:
        """Handle one message from an authenticated peer. ProtocolError (and the state unchanged)
        for anything malformed, oversized, of another protocol version, or with a forged record."""
        msg = parse_message(message)
        if isinstance(msg, Syn):
            return self._on_syn(sender, msg, now)
        fresh = [r for r in msg.records if not self._holds(r)]
        for record in fresh:
            verify(record)  # all of them before any change
        self._apply(fresh, msg.heartbeats if isinstance(msg, Ack) else {}, now)
        if isinstance(msg, Ack) and msg.full:
            self._want_full = msg.more
        else:
            self._want_full |= msg.more
        if self._left:
            return []
        records, more = self._lookup(msg.wants)
        wants = self._wanted(msg.digest) if isinstance(msg, Ack) else ()
        reply = Delta(records, wants, more)
        if not records and not wants and not more:
            return []
        return [Outgoing(sender, message_to_wire(reply))]

    def add_peer(self, record: NodeRecord, now: float) -> list[Outgoing]:
        """A peer the transport authenticated (its verified record): learn it and, if it is new
        to us, open a full exchange with it at once."""
        verify(record)
        raw = bytes.fromhex(record.node_id)
        if raw == self._my_raw or record.role == "client" or self._left or raw in self._banned:
            return []  # clients are not members
        was_alive = raw in self._seen
        self._apply((record,), {}, now)
        if was_alive or raw not in self._seen:
            return []
        return [Outgoing(record.node_id, message_to_wire(self._syn(True, now)))]

    def ban(self, node_ids: Iterable[str], now: float) -> None:
        """Node ids an owner evicted (the mesh config's bounded list, replacing the last): each leaves at once
        and no record or heartbeat of it is merged again, whoever relays it."""
        self._banned = frozenset(raw for n in node_ids if (raw := _raw(n)) is not None and raw != self._my_raw)
        for raw in self._banned:
            if self._seen.pop(raw, None) is not None:
                for beats in self._beats:
                    beats.pop(raw, None)
                self._events.append(MembershipEvent("left", raw.hex(), self._records[raw]))
            if raw in self._records:
                self._down[raw] = ("left", now)

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
        self._news[-1][self._my_raw] = self._me.version
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
        return [Outgoing(raw.hex(), wire) for raw in self._seen]

    # --------------------------------------------------------------------------- exchanges

    def _syn(self, full: bool, now: float) -> Syn:
        stale = self._stale(now)  # members we have not heard from for a while: the peer may have news
        if self._client:
            # A client relays nothing: it lists only what it already has (all of it on full pulls).
            listed = {raw: r.version for raw, r in self._records.items()} if full else {}
            return Syn(full=full, pull=True, digest=listed, heartbeats=stale)
        listed = {raw: self._records[raw].version for raw in self._seen} if full else {}
        listed.update(self._rumors())
        rows = {self._my_raw: self._my_hb}
        rows.update(self._hot())
        rows.update(stale)
        return Syn(full=full, pull=False, digest=_first(listed, MAX_ROWS), heartbeats=_first(rows, self._max_rows))

    def _on_syn(self, sender: str, syn: Syn, now: float) -> list[Outgoing]:
        if self._client or self._left:
            return []  # nobody gossips with clients; a leaving node answers no more
        theirs_hb = syn.heartbeats
        if syn.pull:
            hb, seen = self._hb, self._seen
            newer = {raw: hb[raw] for raw, value in theirs_hb.items() if raw in seen and hb[raw] > value}
        else:
            newer = self._apply((), theirs_hb, now)
        theirs = syn.digest
        send: dict[bytes, NodeRecord] = {}
        wants: list[str] = []
        for raw, version in theirs.items():
            mine = self._me if raw == self._my_raw else self._records.get(raw)
            if mine is None or version > mine.version:
                # (Our own id here: our previous incarnation's record is still around. We want it:
                # merging it, signed, makes us bump our version above it.)
                if not syn.pull:
                    wants.append(raw.hex())
            elif version < mine.version:
                send[raw] = mine
        if syn.full:
            for raw in (self._my_raw, *self._seen):
                if raw not in theirs:
                    send[raw] = self._me if raw == self._my_raw else self._records[raw]
        digest = {raw: v for raw, v in self._rumors().items() if raw not in send and theirs.get(raw, -1) < v}
        records, more = self._budget(send.values())
        rows = {} if theirs_hb.get(self._my_raw, -1) >= self._my_hb else {self._my_raw: self._my_hb}
        rows.update(newer)  # answers to the members they asked about, and anything they had older
        rows.update({raw: value for raw, value in self._hot().items() if theirs_hb.get(raw, -1) < value})
        ack = Ack(
            full=syn.full,
            heartbeats=_first(rows, self._max_rows),
            digest=_first(digest, MAX_ROWS),
            records=records,
            wants=tuple(wants[:MAX_ROWS]),
            more=more,
        )
        return [Outgoing(sender, message_to_wire(ack))]

    def _wanted(self, digest: Mapping[bytes, int]) -> tuple[str, ...]:
        """The ids in a peer's digest of which it has a newer record than ours."""
        wants = []
        for raw, version in digest.items():
            known = self._me if raw == self._my_raw else self._records.get(raw)
            if known is None or version > known.version:
                wants.append(raw.hex())
        return tuple(wants)

    def _lookup(self, wants: tuple[str, ...]) -> tuple[tuple[NodeRecord, ...], bool]:
        """The records a peer wanted that we hold, as many as fit (a client hands out none: it
        never relays)."""
        if self._client:
            return (), False
        return self._budget(r for r in map(self.record, wants) if r is not None)

    def _hot(self) -> dict[bytes, int]:
        """id → heartbeat of the members whose heartbeat advanced here in the last `hot_rounds` rounds."""
        hot: dict[bytes, int] = {}
        for beats in self._beats:
            hot.update(beats)
        return hot

    def _stale(self, now: float) -> dict[bytes, int]:
        """(id, heartbeat) of the members not heard from for `ask_after`, oldest first."""
        cutoff = now - self._config.ask_after(len(self._seen) + 1)
        hb = self._hb
        out: dict[bytes, int] = {}
        for raw, t in self._seen.items():
            if t >= cutoff or len(out) == self._max_rows:
                break
            out[raw] = hb[raw]
        return out

    def _rumors(self) -> dict[bytes, int]:
        """id → version of our own record and of those that changed here in the last rumor_rounds."""
        out: dict[bytes, int] = {}
        for news in self._news:
            out.update(news)
        out[self._my_raw] = self._me.version
        return out

    @property
    def _max_rows(self) -> int:
        return self._config.max_hot_rows

    @staticmethod
    def _budget(records: Iterable[NodeRecord]) -> tuple[tuple[NodeRecord, ...], bool]:
        """As many records as one message may carry, and whether some were left out."""
        out: list[NodeRecord] = []
        size = 0
        for record in records:
            size += wire_form(record)[1] + 1
            if size > RECORD_BUDGET or len(out) == MAX_RECORDS:
                return tuple(out), True
            out.append(record)
        return tuple(out), False

    # ----------------------------------------------------------------------------- reducer

    def _apply(self, records: Iterable[NodeRecord], heartbeats: Mapping[bytes, int], now: float) -> dict[bytes, int]:
        """The reducer: the only way what peers say changes our state. Records (verified) are
        kept per origin by the greatest in `supersedes` order, heartbeats by the greatest value:
        max-merges, so any order and any repetition of the same deliveries gives the same state.
        Returns our heartbeats of alive members that are newer than the ones given."""
        for record in records:
            self._merge_record(record, now)
        return self._merge_heartbeats(heartbeats, now)

    def _holds(self, record: NodeRecord) -> bool:
        """Whether we hold exactly this record (verified and merged already)."""
        held = self._records.get(bytes.fromhex(record.node_id))
        return record is held or record is self._me or record == held

    def _merge_record(self, record: NodeRecord, now: float) -> None:
        """A verified record: the greatest per origin wins; membership follows."""
        raw = bytes.fromhex(record.node_id)
        if raw == self._my_raw:
            if supersedes(record, self._me):
                self._bump_version(record.version, now)
            return
        if record.role == "client" or raw in self._banned:
            return  # clients are not members; evicted nodes are not any more
        if not supersedes(record, self._records.get(raw)):
            return
        self._records[raw] = record
        self._hb.setdefault(raw, 0)
        self._orphans.pop(raw, None)
        self._news[-1][raw] = record.version
        was_alive = self._seen.pop(raw, None) is not None
        if record.leaving:
            for beats in self._beats:
                beats.pop(raw, None)
            if was_alive:
                self._events.append(MembershipEvent("left", record.node_id, record))
            self._down[raw] = ("left", now)
            return
        self._down.pop(raw, None)
        self._seen[raw] = now
        self._events.append(MembershipEvent("updated" if was_alive else "joined", record.node_id, record))

    def _merge_heartbeats(self, rows: Mapping[bytes, int], now: float) -> dict[bytes, int]:
        """Heartbeats: the greatest per origin wins; an advance is a sign of life."""
        hb, seen, beats, records, down = self._hb, self._seen, self._beats[-1], self._records, self._down
        my_raw = self._my_raw
        limit = int(now) + MAX_CLOCK_SKEW_S  # heartbeats start at their origin's clock (seconds)
        newer: dict[bytes, int] = {}
        for raw, value in rows.items():
            current = hb.get(raw)
            if current is not None and value <= current:
                if value < current and raw in seen:
                    newer[raw] = current
                continue
            if value > limit or raw in self._banned:
                continue  # a clock far ahead, or a forgery that would freeze this heartbeat; or evicted
            if raw == my_raw:
                if value > self._my_hb:  # our previous incarnation beat this far
                    self._my_hb = min(value + 1, U32_MAX)
                continue
            if raw not in records:
                if current is None and len(self._orphans) >= MAX_ORPHANS:
                    continue
                self._orphans.setdefault(raw, now)
                hb[raw] = value
                continue
            hb[raw] = value
            if raw in down:
                if down[raw][0] == "left":
                    continue  # only a new version brings back a member that left
                del down[raw]
                self._events.append(MembershipEvent("joined", raw.hex(), records[raw]))
            seen.pop(raw, None)
            seen[raw] = now
            beats[raw] = value
        return newer

    def _bump_version(self, above: int, now: float) -> None:
        if max(above, self._me.version) >= MAX_INT:
            return  # no version is left above it (only our key signs such a record; sign() would raise ValueError)
        self._me = sign(replace(self._me, version=next_version(max(above, self._me.version), now)), self._key)
        self._news[-1][self._my_raw] = self._me.version

    def _fail_after(self) -> float:
        return self._config.fail_after(len(self._seen) + 1)

    def _expire(self, now: float) -> None:
        """Members whose heartbeat stalled become dead; old tombstones and orphans are forgotten."""
        cutoff = now - self._fail_after()
        stalled = []
        for raw, t in self._seen.items():
            if t > cutoff:
                break
            stalled.append(raw)
        for raw in stalled:
            del self._seen[raw]
            for beats in self._beats:
                beats.pop(raw, None)
            self._down[raw] = ("dead", now)
            self._events.append(MembershipEvent("died", raw.hex(), self._records[raw]))
        forget = now - self._config.tombstone_s
        for raw in [r for r, (_, since) in self._down.items() if since < forget]:
            del self._down[raw], self._records[raw], self._hb[raw]
            for news in self._news:
                news.pop(raw, None)
        for raw in [r for r, t in self._orphans.items() if t < forget]:
            del self._orphans[raw], self._hb[raw]

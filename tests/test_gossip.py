"""Gossip membership, driven directly: nodes wired through an in-memory loop, a fake clock."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import deque
from collections.abc import Iterable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_mcp.errors import ProtocolError
from mesh_mcp.mesh.gossip import Gossip, GossipConfig, Member, Outgoing
from mesh_mcp.mesh.gossip_wire import (
    MAX_MESSAGE_BYTES,
    MAX_RECORDS,
    MAX_ROWS,
    PROTOCOL,
    RECORD_BUDGET,
    Ack,
    Delta,
    Syn,
    decode,
    encode,
    message_to_wire,
    parse_message,
)
from mesh_mcp.mesh.records import NodeRecord, ServedModel, public_key_bytes, sign, signing_bytes, unsigned

CONFIG = GossipConfig()
T0 = 1_000_000.0
MODEL = "SmolLM2-135M-Instruct-Q4_1"


def key(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes((i + 1).to_bytes(2, "big") * 16)


def record(i: int, role: str = "host", **fields: Any) -> NodeRecord:
    fields = {"name": f"node-{i}", "addresses": (f"10.0.0.{i}:9338",), "capacity_bytes": 1 << 30, **fields}
    return unsigned(key(i), role=role, **fields)


def node_id(i: int) -> str:
    return record(i).node_id


class Mesh:
    """Nodes joined by an in-memory network: every message goes through JSON and is delivered at
    once, in order; `down` nodes neither send nor receive."""

    def __init__(self, config: GossipConfig = CONFIG) -> None:
        self.config = config
        self.now = T0
        self.nodes: dict[str, Gossip] = {}
        self.down: set[str] = set()
        self.cut: set[frozenset[str]] = set()  # links that lose every message
        self.queue: deque[tuple[str, Outgoing]] = deque()
        self.log: list[tuple[str, str, dict[str, Any]]] = []

    def add(self, i: int, role: str = "host", seeds: Iterable[int] = (), **fields: Any) -> Gossip:
        g = Gossip(record(i, role, **fields), key(i), self.config, random.Random(i), self.now)
        self.nodes[g.me.node_id] = g
        self.down.discard(g.me.node_id)
        for s in seeds:
            self.connect(i, s)
        return g

    def connect(self, i: int, j: int) -> None:
        """What the transport's handshake does: each side learns the other's verified record."""
        a, b = self.nodes[node_id(i)], self.nodes[node_id(j)]
        self.send(a.me.node_id, a.add_peer(b.me, self.now))
        self.send(b.me.node_id, b.add_peer(a.me, self.now))
        self.flush()

    def send(self, src: str, outs: Iterable[Outgoing]) -> None:
        self.queue.extend((src, out) for out in outs)

    def flush(self) -> None:
        for _ in range(100_000):
            if not self.queue:
                return
            src, out = self.queue.popleft()
            if src in self.down or out.peer in self.down or out.peer not in self.nodes:
                continue
            if frozenset((src, out.peer)) in self.cut:
                continue
            data = encode(out.message)
            assert len(data) <= MAX_MESSAGE_BYTES
            message = decode(data)
            self.log.append((src, out.peer, message))
            self.send(out.peer, self.nodes[out.peer].receive(src, message, self.now))
        raise AssertionError("messages never stopped")

    def step(self) -> None:
        self.now += self.config.interval_s
        for nid, g in self.nodes.items():
            if nid not in self.down:
                self.send(nid, g.tick(self.now))
        self.flush()

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / self.config.interval_s)):
            self.step()

    def until(self, predicate: Any, limit: float) -> float:
        """Seconds of simulated time until `predicate()` holds (AssertionError after `limit`)."""
        start = self.now
        while not predicate():
            assert self.now - start <= limit, f"not within {limit} s"
            self.step()
        return self.now - start

    def alive_ids(self, i: int) -> set[str]:
        return {r.node_id for r in self.nodes[node_id(i)].alive(self.now)}

    def up(self) -> list[Gossip]:
        return [g for nid, g in self.nodes.items() if nid not in self.down]


def converged(mesh: Mesh, n: int) -> Mesh:
    for i in range(n):
        mesh.add(i, seeds=[0] if i else [])
    mesh.until(lambda: all(len(g.alive(mesh.now)) == n for g in mesh.up()), limit=5)
    return mesh


def snapshot(g: Gossip, now: float) -> list[Member]:
    return g.members(now)


# ------------------------------------------------------------------------------ convergence


def test_five_nodes_converge_through_one_seed() -> None:
    mesh = Mesh()
    for i in range(5):
        mesh.add(i, seeds=[0] if i else [])
    took = mesh.until(lambda: all(len(g.alive(mesh.now)) == 5 for g in mesh.up()), limit=5)
    assert took <= 2.0
    ids = {node_id(i) for i in range(5)}
    for i in range(5):
        assert mesh.alive_ids(i) == ids
        joined = {e.node_id for e in mesh.nodes[node_id(i)].drain_events() if e.kind == "joined"}
        assert joined == ids - {node_id(i)}


def test_a_record_update_reaches_everyone_within_a_few_rounds() -> None:
    mesh = converged(Mesh(), 5)
    for g in mesh.nodes.values():
        g.drain_events()
    g3 = mesh.nodes[node_id(3)]
    new = g3.update_self(mesh.now, models_served=[ServedModel(MODEL, "serving", 1)], in_flight=1)
    assert new.version > record(3).version and new.in_flight == 1

    def everyone_knows() -> bool:
        return all(g.record(new.node_id) == new for g in mesh.nodes.values())

    assert mesh.until(everyone_knows, limit=3) <= 2.0
    for nid, g in mesh.nodes.items():
        if nid != new.node_id:
            assert [(e.kind, e.node_id) for e in g.drain_events()] == [("updated", new.node_id)]


def test_update_self_refuses_identity_changes_and_role_switches() -> None:
    g = Mesh().add(0)
    for field in ("node_id", "public_key", "version", "signature"):
        with pytest.raises(ValueError, match="cannot change"):
            g.update_self(T0, **{field: getattr(g.me, field)})
    with pytest.raises(ValueError, match="client"):
        g.update_self(T0, role="client")
    with pytest.raises(ValueError, match="invalid"):
        g.update_self(T0, role="boss")
    assert g.update_self(T0, role="worker").role == "worker"


# ---------------------------------------------------------------------------------- liveness


def test_a_crashed_node_is_dropped_within_fail_after_plus_two_rounds() -> None:
    mesh = converged(Mesh(), 3)
    for g in mesh.nodes.values():
        g.drain_events()
    victim = node_id(2)
    mesh.down.add(victim)
    took = mesh.until(lambda: all(victim not in mesh.alive_ids(i) for i in (0, 1)), limit=10)
    assert CONFIG.fail_after(3) == 4.0
    assert took <= CONFIG.fail_after(3) + 2 * CONFIG.interval_s
    assert took <= 5.0  # the 3-node target
    for i in (0, 1):
        g = mesh.nodes[node_id(i)]
        assert [(e.kind, e.node_id) for e in g.drain_events()] == [("died", victim)]
        assert {m.record.node_id: m.status for m in g.members(mesh.now)}[victim] == "dead"


def test_no_false_deaths_while_everyone_is_up() -> None:
    mesh = converged(Mesh(), 4)
    mesh.run(30)
    for g in mesh.nodes.values():
        assert not [e for e in g.drain_events() if e.kind == "died"]
        assert len(g.alive(mesh.now)) == 4


def test_leave_removes_the_node_at_once() -> None:
    mesh = converged(Mesh(), 4)
    for g in mesh.nodes.values():
        g.drain_events()
    leaver = mesh.nodes[node_id(3)]
    outs = leaver.leave(mesh.now)
    assert {o.peer for o in outs} == {node_id(i) for i in range(3)}
    mesh.send(leaver.me.node_id, outs)
    mesh.flush()  # no tick, no time passes
    for i in range(3):
        assert node_id(3) not in mesh.alive_ids(i)
        assert [(e.kind, e.node_id) for e in mesh.nodes[node_id(i)].drain_events()] == [("left", node_id(3))]
    assert leaver.tick(mesh.now + 1) == [] and leaver.leave(mesh.now) == []
    assert node_id(3) not in {r.node_id for r in leaver.alive(mesh.now)}


def test_stale_gossip_does_not_resurrect_a_dead_node() -> None:
    mesh = converged(Mesh(), 3)
    victim = node_id(2)
    mesh.log.clear()
    mesh.run(2)
    old = [m for src, _, m in mesh.log if src == victim]  # its last words: syns, acks, deltas
    old_record = mesh.nodes[node_id(0)].record(victim)
    assert old and old_record is not None
    mesh.down.add(victim)
    mesh.until(lambda: all(victim not in mesh.alive_ids(i) for i in (0, 1)), limit=10)
    g0 = mesh.nodes[node_id(0)]
    for message in old:  # replayed late, from the dead node itself
        g0.receive(victim, message, mesh.now)
    g0.receive(node_id(1), message_to_wire(Delta((old_record,))), mesh.now)  # or relayed
    assert victim not in mesh.alive_ids(0)
    mesh.run(5)
    assert all(victim not in mesh.alive_ids(i) for i in (0, 1))


def test_liveness_travels_through_third_parties() -> None:
    """0 and 1 cannot reach each other: each still sees the other alive, through 2."""
    mesh = converged(Mesh(), 3)
    mesh.cut.add(frozenset((node_id(0), node_id(1))))
    mesh.run(30)
    for g in mesh.nodes.values():
        assert len(g.alive(mesh.now)) == 3
        assert not [e for e in g.drain_events() if e.kind == "died"]


def test_a_member_not_heard_from_is_asked_about() -> None:
    mesh = converged(Mesh(), 3)
    mesh.down.add(node_id(2))
    mesh.run(CONFIG.ask_after(3) + CONFIG.interval_s)
    g0 = mesh.nodes[node_id(0)]
    assert g0.is_alive(node_id(2), mesh.now)  # not yet dead: silent
    [syn] = g0.tick(mesh.now + CONFIG.interval_s)
    parsed = parse_message(syn.message)
    assert isinstance(parsed, Syn) and bytes.fromhex(node_id(2)) in parsed.heartbeats


def test_a_lost_full_sync_is_retried() -> None:
    mesh = Mesh()
    seed = mesh.add(0)
    joiner = mesh.add(1)
    lost = joiner.add_peer(seed.me, mesh.now)  # never delivered
    assert lost and lost[0].message["full"]
    seed.add_peer(joiner.me, mesh.now)
    [again] = joiner.tick(mesh.now + CONFIG.interval_s)
    assert again.message["full"]


def test_a_higher_heartbeat_brings_back_a_node_cut_off_for_a_while() -> None:
    mesh = converged(Mesh(), 3)
    cut = node_id(2)
    mesh.down.add(cut)
    mesh.until(lambda: cut not in mesh.alive_ids(0), limit=10)
    mesh.down.discard(cut)  # the partition heals: it never stopped beating
    mesh.until(lambda: all(len(g.alive(mesh.now)) == 3 for g in mesh.nodes.values()), limit=5)


def test_a_restarted_node_rejoins_with_a_higher_version() -> None:
    mesh = converged(Mesh(), 3)
    old = mesh.nodes[node_id(2)].me
    mesh.down.add(old.node_id)
    mesh.until(lambda: old.node_id not in mesh.alive_ids(0), limit=10)
    mesh.run(2)
    new = mesh.add(2, seeds=[1])  # same key, a fresh process
    assert new.me.version > old.version
    mesh.until(lambda: all(len(g.alive(mesh.now)) == 3 for g in mesh.nodes.values()), limit=3)
    assert mesh.nodes[node_id(0)].record(old.node_id) == new.me


def test_a_restart_behind_the_old_version_bumps_above_it() -> None:
    """The old incarnation's clock was ahead: the new one starts below its old version, learns the
    old record from its peers, and signs a version above it."""
    mesh = Mesh()
    ahead = int((T0 + 3600) * 1000)
    for i in range(3):
        fields: dict[str, Any] = {"version": ahead} if i == 2 else {}
        mesh.add(i, "host", [0] if i else [], **fields)
    mesh.run(3)
    old = mesh.nodes[node_id(2)].me
    assert old.version > ahead
    mesh.down.add(old.node_id)
    mesh.run(1)
    new = mesh.add(2)
    assert new.me.version < old.version
    mesh.connect(2, 0)
    mesh.until(lambda: all(g.record(old.node_id).version > old.version for g in mesh.up()), limit=3)  # type: ignore[union-attr]
    assert all(len(g.alive(mesh.now)) == 3 for g in mesh.up())


def test_heartbeat_claims_about_me_bump_mine_unless_absurd() -> None:
    mesh = converged(Mesh(), 2)
    g0 = mesh.nodes[node_id(0)]
    me = bytes.fromhex(g0.me.node_id)
    mine = g0.members(mesh.now)[[m.record.node_id for m in g0.members(mesh.now)].index(g0.me.node_id)].heartbeat

    def claim(value: int) -> dict[str, Any]:
        return message_to_wire(Ack(False, {me: value}, {}, (), (), False))

    g0.receive(node_id(1), claim(mine + 100), mesh.now)  # my previous incarnation beat this far
    after = {m.record.node_id: m.heartbeat for m in g0.members(mesh.now)}[g0.me.node_id]
    assert after > mine + 100
    g0.receive(node_id(1), claim(int(mesh.now) + 10 * 86400), mesh.now)  # a clock days ahead: ignored
    assert {m.record.node_id: m.heartbeat for m in g0.members(mesh.now)}[g0.me.node_id] == after


def test_a_record_of_my_old_incarnation_makes_me_bump() -> None:
    mesh = converged(Mesh(), 2)
    g0 = mesh.nodes[node_id(0)]
    mine = g0.me
    old = sign(dataclasses.replace(mine, version=mine.version + 10_000_000), key(0))
    g0.receive(node_id(1), message_to_wire(Delta((old,))), mesh.now)
    assert g0.me.version > old.version
    assert g0.me.name == mine.name and not g0.me.leaving


# ------------------------------------------------------------------- forged and malformed input


def forged_records(mesh: Mesh) -> list[NodeRecord]:
    genuine = mesh.nodes[node_id(0)].record(node_id(1))
    assert genuine is not None
    newer = dataclasses.replace(genuine, version=genuine.version + 1)
    other = sign(record(9, version=genuine.version + 1), key(9))
    return [
        dataclasses.replace(newer, name="evil"),  # signature over other content
        dataclasses.replace(other, node_id=genuine.node_id),  # valid signature, key not this node's
        dataclasses.replace(newer, signature=key(9).sign(signing_bytes(newer))),  # signed by another key
    ]


def test_forged_records_raise_and_change_nothing() -> None:
    mesh = converged(Mesh(), 3)
    g0 = mesh.nodes[node_id(0)]
    g0.drain_events()
    before = snapshot(g0, mesh.now)
    advance = {bytes.fromhex(node_id(1)): 2**31, bytes.fromhex(node_id(2)): 2**31}
    for forged in forged_records(mesh):
        for message in (
            Delta((forged,)),
            Ack(False, advance, {}, (forged,), (), False),  # good heartbeats, one bad record: all refused
        ):
            with pytest.raises(ProtocolError):
                g0.receive(node_id(2), message_to_wire(message), mesh.now)
        with pytest.raises(ProtocolError):
            g0.add_peer(forged, mesh.now)
    assert snapshot(g0, mesh.now) == before
    assert g0.drain_events() == []


def valid_messages(mesh: Mesh) -> dict[str, dict[str, Any]]:
    g1 = mesh.nodes[node_id(1)]
    syn = g1.tick(mesh.now + 0.5)[0].message
    rec = g1.me
    return {
        "syn": json.loads(json.dumps(syn)),
        "ack": json.loads(json.dumps(message_to_wire(Ack(False, {}, {}, (rec,), (node_id(0),), False)))),
        "delta": json.loads(json.dumps(message_to_wire(Delta((rec,), (), False)))),
    }


MUTATIONS: list[tuple[str, str, Any]] = [
    ("syn", "hb", ...),
    ("syn", "v", PROTOCOL + 1),
    ("syn", "v", "1"),
    ("syn", "v", True),
    ("syn", "type", "hello"),
    ("syn", "type", None),
    ("syn", "full", 1),
    ("syn", "pull", "no"),
    ("syn", "hb", "!!!"),
    ("syn", "hb", "AAAA"),  # 3 bytes: not a whole row
    ("syn", "hb", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),  # the same id twice
    ("syn", "digest", "A" * 2_000_000),  # far more rows than allowed
    ("syn", "digest", "////////////////////w=="),  # a version beyond 2**63 - 1
    ("ack", "records", {"a": 1}),
    ("ack", "records", [{"node_id": "x"}]),
    ("ack", "records", [None] * (MAX_RECORDS + 1)),
    ("ack", "wants", ["not-an-id"]),
    ("ack", "wants", "0123456789abcdef"),
    ("ack", "more", None),
    ("ack", "full", ...),
    ("delta", "records", None),
    ("delta", "wants", ...),
    ("delta", "more", 0),
]


@pytest.mark.parametrize(("kind", "field", "value"), MUTATIONS)
def test_malformed_messages_raise_and_change_nothing(kind: str, field: str, value: Any) -> None:
    mesh = converged(Mesh(), 3)
    message = valid_messages(mesh)[kind]
    g0 = mesh.nodes[node_id(0)]
    g0.receive(node_id(1), json.loads(json.dumps(message)), mesh.now)  # the unmutated one is fine
    before = snapshot(g0, mesh.now)
    if value is ...:
        del message[field]
    else:
        message[field] = value
    with pytest.raises(ProtocolError):
        g0.receive(node_id(1), message, mesh.now)
    assert snapshot(g0, mesh.now) == before


def test_worst_case_messages_fit_in_the_bound() -> None:
    ids = [i.to_bytes(8, "big") for i in range(MAX_ROWS)]
    rows = {raw: 2**32 - 1 for raw in ids}
    versions = {raw: 2**63 - 1 for raw in ids}
    wants = tuple(raw.hex() for raw in ids)
    fat = [
        sign(record(i, models_on_disk=tuple(f"{i}-{j:03d}" + "m" * 120 for j in range(8))), key(i))
        for i in range(10, 10 + MAX_RECORDS)
    ]
    records, size = [], 0
    for r in fat:
        size += len(encode(message_to_wire(Delta((r,))))) - len(encode(message_to_wire(Delta(()))))
        if size > RECORD_BUDGET:
            break
        records.append(r)
    for message in (
        Ack(True, rows, versions, tuple(records), wants, True),
        Syn(True, False, versions, rows),
        Delta(tuple(records), wants, True),
    ):
        assert len(encode(message_to_wire(message))) <= MAX_MESSAGE_BYTES


def test_decode_bounds_and_shapes() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(b" " * (MAX_MESSAGE_BYTES + 1))
    for data in (b"{", b"[1]", b"\xff\xfe", b'"syn"'):
        with pytest.raises(ProtocolError):
            decode(data)
    assert decode(encode({"v": 1})) == {"v": 1}
    with pytest.raises(ProtocolError):
        Mesh().add(0).receive(node_id(1), [], T0)  # type: ignore[arg-type]


def test_a_large_state_is_sent_in_bounded_pieces() -> None:
    mesh = Mesh()
    big = mesh.add(0)
    others = [sign(record(i, models_on_disk=tuple(f"model-{j}" for j in range(20))), key(i)) for i in range(10, 710)]
    for start in range(0, len(others), MAX_RECORDS):
        big.receive(node_id(1), message_to_wire(Delta(tuple(others[start : start + MAX_RECORDS]))), mesh.now)
    assert len(big.alive(mesh.now)) == 701
    newcomer = Gossip(record(1), key(1), CONFIG, random.Random(1), mesh.now)
    outs = newcomer.add_peer(big.me, mesh.now)
    for _ in range(5):
        [answer] = big.receive(newcomer.me.node_id, outs[0].message, mesh.now)
        assert len(encode(answer.message)) <= MAX_MESSAGE_BYTES
        assert len(answer.message["records"]) <= MAX_RECORDS
        newcomer.receive(big.me.node_id, answer.message, mesh.now)
        if not answer.message["more"]:
            break
        outs = newcomer.tick(mesh.now)  # the next round is a full sync again
        assert outs[0].message["full"]
    assert len(newcomer.alive(mesh.now)) == 702


# ------------------------------------------------------------------------------------ clients


def test_clients_pull_state_but_are_never_targets_and_never_relay() -> None:
    mesh = converged(Mesh(), 3)
    clients = [mesh.add(i, role="client", seeds=[i % 3]) for i in (7, 8)]
    client_ids = {c.me.node_id for c in clients}
    mesh.run(3)
    members = {node_id(i) for i in range(3)}
    for c in clients:
        assert {r.node_id for r in c.alive(mesh.now)} == members | {c.me.node_id}
    for i in range(3):
        g = mesh.nodes[node_id(i)]
        assert mesh.alive_ids(i) == members
        assert all(g.record(cid) is None for cid in client_ids)
    for src, dst, message in mesh.log:
        if dst in client_ids:
            assert message["type"] in ("ack", "delta"), "a member opened an exchange with a client"
        if src in client_ids:
            assert (message["type"] == "syn" and message["pull"]) or (
                message["type"] == "delta" and message["records"] == []
            ), "a client relayed something"
    # What a client says is not merged: not its heartbeat claims, not its digest.
    g0 = mesh.nodes[node_id(0)]
    before = snapshot(g0, mesh.now)
    raw1 = bytes.fromhex(node_id(1))
    pull = message_to_wire(Syn(full=True, pull=True, digest={raw1: 2**62}, heartbeats={raw1: 2**31}))
    [answer] = g0.receive(clients[0].me.node_id, pull, mesh.now)
    assert answer.message["wants"] == []
    assert snapshot(g0, mesh.now) == before
    # Updates reach clients too.
    new = mesh.nodes[node_id(1)].update_self(mesh.now, in_flight=5)
    mesh.until(lambda: all(c.record(new.node_id) == new for c in clients), limit=3)


def test_a_client_never_sends_records_even_when_asked() -> None:
    mesh = converged(Mesh(), 2)
    client = mesh.add(7, role="client", seeds=[0])
    asked = client.receive(node_id(0), message_to_wire(Delta((), (node_id(1),), False)), mesh.now)
    assert asked == []
    assert client.receive(node_id(0), mesh.nodes[node_id(0)].tick(mesh.now)[0].message, mesh.now) == []
    assert client.leave(mesh.now) == []


# ------------------------------------------------------------------------- merge properties

ORIGINS = (20, 21, 22)


def _versions(i: int) -> list[NodeRecord]:
    base = int(T0 * 1000)
    return [
        sign(record(i, version=base + 1), key(i)),
        sign(record(i, version=base + 2, in_flight=3), key(i)),
        sign(record(i, version=base + 3, leaving=True), key(i)),
        sign(record(i, version=base + 4, name=f"restarted-{i}"), key(i)),
        sign(record(i, version=base + 2, in_flight=4), key(i)),  # equivocation: another record, same version
    ]


POOL: list[tuple[str, Any]] = [("record", r) for i in ORIGINS for r in _versions(i)]
POOL += [("hb", (bytes.fromhex(node_id(i)), hb)) for i in ORIGINS for hb in (int(T0) + 5, int(T0) + 9)]


def deliver(g: Gossip, items: Iterable[tuple[str, Any]], now: float) -> None:
    for kind, item in items:
        message: Delta | Ack = Delta((item,)) if kind == "record" else Ack(False, dict([item]), {}, (), (), False)
        g.receive(node_id(0), message_to_wire(message), now)


def fresh(now: float = T0) -> Gossip:
    return Gossip(record(0), key(0), CONFIG, random.Random(0), now)


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(st.sampled_from(POOL), min_size=1, max_size=14),
    data=st.data(),
)
def test_merge_is_commutative_and_idempotent(items: list[tuple[str, Any]], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(items))
    repeats = data.draw(st.lists(st.sampled_from(items), max_size=6))
    a, b = fresh(), fresh()
    deliver(a, items, T0)
    deliver(b, [*shuffled, *repeats, *items], T0)
    assert snapshot(a, T0) == snapshot(b, T0)
    assert a.alive(T0) == b.alive(T0)
    for i in ORIGINS:
        assert a.record(node_id(i)) == b.record(node_id(i))


def test_the_merge_keeps_the_greatest_record_and_a_left_node_stays_left() -> None:
    g = fresh()
    versions = _versions(20)
    deliver(g, [("record", versions[3]), ("record", versions[0]), ("record", versions[2])], T0)
    assert g.record(node_id(20)) == versions[3]
    assert node_id(20) in {r.node_id for r in g.alive(T0)}
    g2 = fresh()
    deliver(g2, [("record", versions[2]), ("hb", (bytes.fromhex(node_id(20)), int(T0) + 50))], T0)
    assert node_id(20) not in {r.node_id for r in g2.alive(T0)}  # a heartbeat does not undo a leave


# ------------------------------------------------------------------------------- configuration


def test_config_scales_with_the_mesh() -> None:
    assert CONFIG.fail_after(3) == 4.0
    assert CONFIG.heartbeat_period(3) == 1.0
    assert CONFIG.heartbeat_period(1000) == pytest.approx(1000 / 150)
    assert CONFIG.fail_after(1000) > CONFIG.ask_after(1000) > CONFIG.heartbeat_period(1000)
    assert CONFIG.fail_after(1000) < 15
    for bad in ({"interval_s": 0}, {"fanout": 0}, {"heartbeat_s": 0.5}, {"hot_rounds": 0}, {"max_hot_rows": 0}):
        with pytest.raises(ValueError):
            GossipConfig(**bad)


def test_gossip_needs_its_own_key() -> None:
    with pytest.raises(ValueError, match="private key"):
        Gossip(record(0), key(1), CONFIG, random.Random(0), T0)
    assert public_key_bytes(key(0)) == record(0).public_key


def test_runs_are_deterministic() -> None:
    logs = []
    for _ in range(2):
        mesh = converged(Mesh(), 4)
        mesh.run(3)
        logs.append(mesh.log)
    assert logs[0] == logs[1]


def test_a_newer_versions_message_fields_are_ignored_up_to_a_bound() -> None:
    """Forward compatibility: a message with a field this version does not know parses as if it were absent; more
    than MAX_UNKNOWN of them is a malformed message."""
    from mesh_mcp.mesh.gossip_wire import MAX_UNKNOWN

    syn = valid_messages(converged(Mesh(), 2))["syn"]
    assert parse_message({**syn, "later": {"x": 1}}) == parse_message(syn)
    with pytest.raises(ProtocolError, match="at most"):
        parse_message({**syn, **{f"later{i}": i for i in range(MAX_UNKNOWN + 1)}})

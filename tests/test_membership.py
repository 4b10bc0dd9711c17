"""Membership through the pure gossip state machine, on an in-memory network with an injected
clock: convergence, updates, crash and leave detection, restarts, forged input, clients."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh_mcp.errors import ProtocolError
from mesh_mcp.mesh.gossip import Gossip, GossipConfig, Outgoing
from mesh_mcp.mesh.records import ServedModel, signing_bytes, to_wire, unsigned

T0 = 1_800_000_000.0


class Net:
    """Nodes joined by an in-memory network: messages are delivered on the next step."""

    def __init__(self, n: int, clients: int = 0, seed: int = 7) -> None:
        self.now = T0
        self.keys: dict[str, Ed25519PrivateKey] = {}
        self.nodes: dict[str, Gossip] = {}
        self.down: set[str] = set()
        self.queue: deque[tuple[str, Outgoing]] = deque()
        rng = random.Random(seed)
        for i in range(n + clients):
            key = Ed25519PrivateKey.generate()
            role = "client" if i >= n else "host"
            rec = unsigned(key, name=f"n{i}", addresses=(f"127.0.0.1:{7000 + i}",), role=role)
            g = Gossip(rec, key, GossipConfig(), random.Random(rng.random()), self.now)
            self.keys[g.me.node_id] = key
            self.nodes[g.me.node_id] = g
        self.ids = list(self.nodes)
        seed_node = self.nodes[self.ids[0]]
        for nid in self.ids[1:]:  # everyone joins through the first node, as with a token
            self.send(nid, self.nodes[nid].add_peer(seed_node.me, self.now))
            self.send(self.ids[0], seed_node.add_peer(self.nodes[nid].me, self.now))

    def send(self, sender: str, outs: list[Outgoing]) -> None:
        self.queue.extend((sender, o) for o in outs)

    def step(self, dt: float = 0.5) -> None:
        self.now += dt
        for nid, g in self.nodes.items():
            if nid not in self.down:
                self.send(nid, g.tick(self.now))
        for _ in range(10_000):
            if not self.queue:
                break
            sender, out = self.queue.popleft()
            if out.peer in self.down or sender in self.down or out.peer not in self.nodes:
                continue
            self.send(out.peer, self.nodes[out.peer].receive(sender, out.message, self.now))

    def alive_ids(self, nid: str) -> set[str]:
        return {r.node_id for r in self.nodes[nid].alive(self.now)}

    def until(self, cond, limit_s: float) -> float:  # type: ignore[no-untyped-def]
        start = self.now
        while not cond():
            assert self.now - start < limit_s, f"not within {limit_s}s"
            self.step()
        return self.now - start


def members(net: Net) -> set[str]:
    return {nid for nid in net.ids if net.nodes[nid].me.role != "client"}


def test_a_mesh_converges_and_spreads_an_update() -> None:
    net = Net(5)
    net.until(lambda: all(net.alive_ids(n) == set(net.ids) for n in net.ids), 10)
    changer = net.nodes[net.ids[3]]
    new = changer.update_self(net.now, models_served=(ServedModel("m", "serving", 0),))

    def everyone_knows() -> bool:
        return all((r := net.nodes[n].record(new.node_id)) is not None and r.version >= new.version for n in net.ids)

    assert net.until(everyone_knows, 5) <= 5


def test_a_crashed_member_is_dropped_within_five_seconds() -> None:
    net = Net(3)
    net.until(lambda: all(net.alive_ids(n) == set(net.ids) for n in net.ids), 10)
    dead = net.ids[2]
    net.down.add(dead)
    took = net.until(lambda: all(dead not in net.alive_ids(n) for n in net.ids[:2]), 10)
    assert took <= 5.0


def test_a_leaving_member_is_dropped_at_once_and_not_resurrected() -> None:
    net = Net(4)
    net.until(lambda: all(net.alive_ids(n) == set(net.ids) for n in net.ids), 10)
    leaver = net.ids[1]
    stale = net.nodes[leaver].me
    net.send(leaver, net.nodes[leaver].leave(net.now))
    net.step(0.01)  # the leaving record goes out, then the node is gone
    net.down.add(leaver)
    assert all(leaver not in net.alive_ids(n) for n in net.ids if n != leaver)
    # old gossip about it does not bring it back
    other = net.nodes[net.ids[0]]
    other.add_peer(stale, net.now)
    assert leaver not in net.alive_ids(net.ids[0])


def test_a_restart_with_the_same_key_rejoins() -> None:
    net = Net(3)
    net.until(lambda: all(net.alive_ids(n) == set(net.ids) for n in net.ids), 10)
    nid = net.ids[2]
    net.down.add(nid)
    net.until(lambda: nid not in net.alive_ids(net.ids[0]), 10)
    key = net.keys[nid]
    old = net.nodes[nid].me
    fresh = Gossip(replace(old, version=0, signature=b""), key, GossipConfig(), random.Random(1), net.now)
    net.nodes[nid] = fresh
    net.down.discard(nid)
    net.send(nid, fresh.add_peer(net.nodes[net.ids[0]].me, net.now))
    net.send(net.ids[0], net.nodes[net.ids[0]].add_peer(fresh.me, net.now))
    net.until(lambda: all(nid in net.alive_ids(n) for n in net.ids), 10)


def test_forged_and_malformed_messages_are_rejected_without_changing_state() -> None:
    net = Net(2)
    net.until(lambda: all(net.alive_ids(n) == set(net.ids) for n in net.ids), 10)
    a, b = net.ids
    victim = net.nodes[a]
    before = {r.node_id: r.version for r in victim.alive(net.now)}
    forger = Ed25519PrivateKey.generate()
    genuine = net.nodes[b].me
    tampered = replace(genuine, name="evil", version=genuine.version + 10)
    forged = replace(tampered, signature=forger.sign(signing_bytes(tampered)))  # b's id, signed by another key
    for bad in ({"v": 99, "type": "syn"}, {"type": "nope"}, {"v": 1, "type": "delta", "records": [to_wire(forged)]}):
        with pytest.raises(ProtocolError):
            victim.receive(b, bad, net.now)
    assert {r.node_id: r.version for r in victim.alive(net.now)} == before
    assert victim.record(b) == genuine


def test_clients_pull_routing_state_but_are_never_gossiped_with() -> None:
    net = Net(3, clients=2)
    client_ids = set(net.ids) - members(net)
    net.until(lambda: all(members(net) <= net.alive_ids(c) for c in client_ids), 10)
    for _ in range(10):
        net.step()
        for sender, out in list(net.queue):
            assert out.peer in members(net) or sender in members(net)
    for m in members(net):
        assert not client_ids & net.alive_ids(m), "clients are not members"

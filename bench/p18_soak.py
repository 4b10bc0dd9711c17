"""P18 soak: a small mesh under a bounded load and churn for `--minutes`, checked for lost answers and leaks.

Real node processes on loopback addresses: replicas A and B of the model (`--threads 1`), a standby S (no model: it
lends capacity and may promote itself), and a client C that takes every request. `--workers` closed-loop workers
stream chats through C (random `max_tokens` 8–96, temperature 0.7); each answer is either whole (its `[DONE]`) or
failed cleanly (an HTTP error, or the in-stream error event) — anything else (a stream that just stops, a
malformed event) is a defect. Churn, every `--churn-s`: in turn, a replica is killed (-9, its process group) and
started again (same home, so the same identity), or the model is dropped on a replica (`POST /api/drop`) and the
node restarted serving it.

Every 30 s it samples, per node: the node's RSS, open file descriptors, and its live processes (the node and its
llama-server / rpc-server children); growth is measured from the first sample after `--warmup-s`
to the last, on the nodes that were never restarted (S and C) and, for all, the process count.

    python -m bench.p18_soak --minutes 30            # the issue's run; --minutes 5 for a quick look

Results go to bench/RESULTS.md by hand, with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx2

from bench.p6_promotion import MODEL, wait
from inference import paths
from inference.models import ensure_model
from tests.harness import NodeProcess

SAMPLE_EVERY_S = 30.0


def serving(status: dict[str, Any]) -> bool:
    return any(m["name"] == MODEL and m["state"] == "serving" for m in status["models"])


def descendants(root: int) -> list[int]:
    """`root` and every live process below it (llama-server and rpc-server run in sessions of their own, so the
    process group would miss them)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parent[int(entry)] = int(fields[1])
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, ppid in parent.items() if ppid == pid and child not in found]
        found.update(children)
        frontier.extend(children)
    return sorted(p for p in found if p in parent)


def sample(node: NodeProcess) -> dict[str, int] | None:
    """The node process's RSS (KiB) and open fds, and how many live processes it and its children are."""
    if node.proc is None or node.proc.poll() is not None:
        return None
    pid = node.proc.pid
    try:
        with open(f"/proc/{pid}/status") as fh:
            rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None
    return {"rss_kib": rss, "fds": fds, "procs": len(descendants(pid))}


class Load:
    """Closed-loop streaming workers through the client; every answer classified."""

    def __init__(self, api: str, workers: int, seed: int) -> None:
        self.api, self.results, self.stop = api, Counter[str](), threading.Event()
        self.defects: list[str] = []
        self._threads = [threading.Thread(target=self._run, args=(seed + i,), daemon=True) for i in range(workers)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(300)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Write {rng.randint(2, 6)} short lines about the sea."}],
                "max_tokens": rng.randint(8, 96),
                "temperature": 0.7,
                "stream": True,
            }
            self.results[self._one(body)] += 1

    def _one(self, body: dict[str, Any]) -> str:
        try:
            with httpx2.stream("POST", self.api + "/v1/chat/completions", json=body, timeout=300) as r:
                if r.status_code != 200:
                    r.read()
                    return f"http_{r.status_code}"
                done, error = False, False
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        error = error or "error" in event
            if done and not error:
                return "whole"
            if error:
                return "failed_cleanly"
            self.defects.append(f"a stream ended without [DONE] or an error event ({body['max_tokens']} tokens)")
            return "cut_silently"
        except httpx2.TransportError as exc:
            self.defects.append(f"transport error: {exc}")
            return "transport_error"
        except ValueError as exc:
            self.defects.append(f"malformed event: {exc}")
            return "malformed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--churn-s", type=float, default=120)
    ap.add_argument("--warmup-s", type=float, default=300)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    models = Path(os.environ.get("MESH_LLM_TEST_MODELS", paths.cache_dir() / "test-models"))
    models.mkdir(parents=True, exist_ok=True)
    anyio.run(lambda: ensure_model(MODEL, models_dir=models))
    env = {"MESH_LLM_MODELS": str(models)}
    replica_args = ["--model", MODEL, "--threads", "1"]
    with tempfile.TemporaryDirectory(prefix="p18-soak-") as tmp:
        home = Path(tmp)
        nodes: dict[str, NodeProcess] = {}
        ips = {"a": "127.0.0.2", "b": "127.0.0.3", "s": "127.0.0.4", "c": "127.0.0.5"}

        def start(name: str, *extra: str) -> NodeProcess:
            node = NodeProcess(home / name, ["--mesh-host", ips[name], "--name", name, *extra], env=env).start()
            nodes[name] = node
            return node

        samples: dict[str, list[dict[str, int]]] = {name: [] for name in ips}
        events: list[str] = []
        try:
            a = start("a", *replica_args)
            wait(a, "A serving", serving, 240)
            token = wait(a, "token", lambda s: bool(s.get("invite_token")))["invite_token"]
            wait(start("b", *replica_args, "--join", token), "B serving", serving, 240)
            start("s", "--join", token)
            c = start("c", "--client", "--join", token)
            wait(c, "C routes", lambda s: any(m["name"] == MODEL and m["servers"] for m in s["mesh"]["models"]))
            load = Load(c.api, args.workers, args.seed)
            t0 = time.monotonic()
            load.start()
            next_sample, next_churn, turn = t0, t0 + args.churn_s, 0
            while time.monotonic() - t0 < args.minutes * 60:
                now = time.monotonic()
                if now >= next_sample:
                    for name, node in nodes.items():
                        if (got := sample(node)) is not None:
                            samples[name].append({"t": round(now - t0), **got})
                    next_sample += SAMPLE_EVERY_S
                if now >= next_churn:
                    victim = ("a", "b")[turn % 2]
                    node = nodes[victim]
                    if turn % 3 == 2:  # the model dropped, then the node restarted serving it
                        httpx2.post(node.console + "/api/drop", json={"model": MODEL}, timeout=30)
                        node.stop()
                        events.append(f"{round(now - t0)} s: dropped {MODEL} on {victim}, restarted it")
                    else:
                        assert node.proc is not None
                        os.killpg(node.proc.pid, signal.SIGKILL)
                        node.proc.wait(30)
                        events.append(f"{round(now - t0)} s: killed {victim} (-9), restarted it")
                    fresh = wait(nodes["c"], "C's token", lambda s: bool(s.get("invite_token")))["invite_token"]
                    restarted = start(victim, *replica_args, "--join", fresh)
                    wait(restarted, f"{victim} serving again", serving, 240)
                    turn += 1
                    next_churn = time.monotonic() + args.churn_s
                time.sleep(1)
            load.join()
            for name, node in nodes.items():
                if (got := sample(node)) is not None:
                    samples[name].append({"t": round(time.monotonic() - t0), **got})
        finally:
            for node in nodes.values():
                node.stop()
    total = sum(load.results.values())
    print(f"\n{args.minutes:g} min, {args.workers} workers, churn every {args.churn_s:g} s; requests: {total}")
    for result, count in load.results.most_common():
        print(f"  {result:16s} {count}")
    for line in events:
        print("  " + line)
    print("\nnode  samples  RSS MiB (after warm-up → end)  fds  processes (min / max)")
    for name, rows in samples.items():
        after = [r for r in rows if r["t"] >= args.warmup_s] or rows
        if not after:
            continue
        first, last = after[0], after[-1]
        procs = [r["procs"] for r in rows]
        print(
            f"  {name}   {len(rows):4d}   {first['rss_kib'] / 1024:7.1f} → {last['rss_kib'] / 1024:7.1f}"
            f" ({100 * (last['rss_kib'] / first['rss_kib'] - 1):+.1f} %)   {first['fds']} → {last['fds']}"
            f"   {min(procs)} / {max(procs)}   median RSS {statistics.median(r['rss_kib'] for r in after) / 1024:.1f}"
        )
    print("\nRSS MiB every 5 min (the curve: a plateau is warm-up, a line is a leak)")
    for name, rows in samples.items():
        marks = [r for r in rows if r["t"] % 300 < SAMPLE_EVERY_S] or rows
        print(f"  {name}   " + "  ".join(f"{r['rss_kib'] / 1024:.0f}" for r in marks))
    for defect in load.defects[:20]:
        print("  defect: " + defect)


if __name__ == "__main__":
    main()

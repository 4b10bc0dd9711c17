"""Mesh benchmarks on real node processes (loopback, distinct 127.0.0.x addresses):

- one mesh hop: streaming chat asked of a client node (routed over QUIC to the serving node)
  against asking the serving node itself: tokens/s ratio (target ≥ 0.97) and added TTFT;
- join-to-visible: a new client node starts with the token → the model is in its /v1/models
  (target 2 s, measured from the process start);
- death-to-removed: kill -9 the serving node → the model leaves the client's /v1/models (target 5 s).

All nodes share one machine here, unlike a real mesh: with `--isolate` (default on) llama-server
runs one thread pinned to CPU 0 and every Python process (nodes, this client) is pinned to CPU 1,
so the client node's work does not steal cycles from llama-server as it could not across machines.

    python bench/mesh_bench.py [--runs 10] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.p1_proxy import MODEL, one_run, prepare
from tests.harness import NodeProcess


def serving(node: NodeProcess) -> set[str]:
    try:
        data = httpx2.get(node.api + "/v1/models", timeout=2).json()["data"]
    except httpx2.TransportError:
        return set()
    return {m["id"] for m in data if m["state"] == "serving"}


def pin(pid: int, cpus: set[int]) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def pin_all(*nodes: NodeProcess) -> None:
    """llama-server on CPU 0, every Python process on CPU 1 (see the module doc)."""
    for node in nodes:
        assert node.proc is not None
        pin(node.proc.pid, {1})
        for m in node.status()["models"]:
            if m.get("pid"):
                pin(m["pid"], {0})
    os.sched_setaffinity(0, {1})


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on `timeout`/kill
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--no-isolate", dest="isolate", action="store_false")
    args = ap.parse_args()
    models_dir = prepare()
    env = {"MESH_LLM_MODELS": str(models_dir)}
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--llama-arg=--threads", "--llama-arg=1"] if args.isolate else []
        host = NodeProcess(
            Path(tmp) / "a", ["--mesh-host", "127.0.0.2", "--model", MODEL, "--parallel", "1", *extra], env
        )
        nodes = [host.start()]
        try:
            host.wait_model_state(MODEL, "serving", timeout=300)
            token = host.status()["invite_token"]
            t0 = time.monotonic()
            client = NodeProcess(Path(tmp) / "c", ["--mesh-host", "127.0.0.3", "--client", "--join", token], env)
            nodes.append(client.start())
            while MODEL not in serving(client):
                time.sleep(0.02)
            result["join_to_visible_s"] = round(time.monotonic() - t0, 2)
            if args.isolate:
                pin_all(host, client)
            with httpx2.Client(timeout=120) as http:
                for base in (host.api, client.api):
                    one_run(http, base, 8)
                rows: dict[str, list[tuple[float, float, float]]] = {"direct": [], "mesh": []}
                for _ in range(args.runs):
                    rows["direct"].append(one_run(http, host.api, args.tokens))
                    rows["mesh"].append(one_run(http, client.api, args.tokens))
            med = {k: [statistics.median(r[i] for r in v) for i in range(3)] for k, v in rows.items()}
            result.update(
                runs=args.runs,
                tokens=args.tokens,
                direct_ttft_ms=round(med["direct"][0] * 1e3, 2),
                mesh_ttft_ms=round(med["mesh"][0] * 1e3, 2),
                added_ttft_ms=round((med["mesh"][0] - med["direct"][0]) * 1e3, 2),
                direct_tok_s=round(med["direct"][1], 1),
                mesh_tok_s=round(med["mesh"][1], 1),
                tok_s_ratio=round(med["mesh"][1] / med["direct"][1], 4),
                delivered_share_direct=round(med["direct"][2], 4),
                delivered_share_mesh=round(med["mesh"][2], 4),
                tok_s_ratio_per_request=round(med["mesh"][2] / med["direct"][2], 4),
            )
            assert host.proc is not None
            os.kill(host.proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            while MODEL in serving(client):
                time.sleep(0.02)
            result["death_to_removed_s"] = round(time.monotonic() - t0, 2)
        finally:
            for n in nodes:
                n.stop()
    result["isolated"] = args.isolate
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

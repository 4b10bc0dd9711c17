"""The console's load time (issue 16: "loads in under a second on a 10-node mesh status"), in the real browser.

The real console app (`build_console`) serves a synthetic mesh of N members through its real `/api/status` and
`/api/events`: every member serves one to three of six models, one model is split over three of them, each member
measured its eight nearest peers, three clients are connected, and there is demand. Debian's Chromium, driven by
Playwright as in the tests, opens the page in a fresh context each time; "loaded" is the page's own
`document.body.dataset.ready === "1"` (set once the first status has rendered) with every member and client drawn.
Reported per size: the page's time from navigation start to loaded (`performance.now()`, median and max of
`--loads`), the `/api/status` size and `mesh_view`'s time for it.

    python -m bench.p16_console                  # 10, 100 and 1000 members, 5 loads each

Results go to bench/RESULTS.md by hand, with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from typing import Any

import httpx2
import uvicorn
from playwright.sync_api import sync_playwright

from mesh_mcp.api.console import build_console
from mesh_mcp.api.console_view import mesh_view
from mesh_mcp.mesh.records import NodeRecord, ServedModel
from mesh_mcp.state import NodeState
from tests.browser import ARGS, chromium_path
from tests.harness import free_port

MODELS = ["Qwen2.5-Coder-1.5B", "SmolLM2-135M", "gemma-3-270m", "Qwen3-30B-A3B", "Llama-3.1-8B", "Mistral-7B"]
GIB = 1 << 30


def nid(n: int) -> str:
    return f"{n:016x}"


def synthetic(n: int) -> tuple[list[NodeRecord], list[dict[str, Any]]]:
    """N members of a busy mesh: models, a three-stage split, RTTs to the eight nearest, demand."""
    records = []
    for i in range(n):
        served = [
            ServedModel(MODELS[(i + k) % len(MODELS)], "serving", i % 3, True, (k + 1) * GIB, 4096, 2, tps=150 + i)
            for k in range(1 + i % 3)
        ]
        if i == 0:
            stages = ((nid(1 % n), 0, 9), (nid(2 % n), 10, 19), (nid(0), 20, 31))
            served.append(ServedModel("Llama-3.3-70B", "serving", 1, True, 40 * GIB, 8192, 4, stages, 52, 61))
        rtt = tuple(
            sorted(
                (nid(p), 10 * (1 + abs(p - i)) + (i % 7) * 37) for p in range(max(0, i - 4), min(n, i + 5)) if p != i
            )
        )
        records.append(
            NodeRecord(
                node_id=nid(i),
                public_key=b"",
                name=f"node-{i:04d}",
                addresses=(f"10.0.{i // 250}.{i % 250 + 1}:4000",),
                role="host",
                capacity_bytes=(8 + 8 * (i % 3)) * GIB,
                models_served=tuple(served),
                rtt=rtt,
            )
        )
    demand = [{"model": m, "rate_per_min": 12.0 / (k + 1)} for k, m in enumerate(MODELS)]
    return records, demand


def serve(app: Any) -> tuple[uvicorn.Server, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise SystemExit("the console did not start")
        time.sleep(0.05)
    return server, url


def measure(n: int, loads: int, executable: str) -> dict[str, Any]:
    records, demand = synthetic(n)
    clients = [nid(100_000 + c) for c in range(3)]
    state = NodeState(node_id=nid(0), name="node-0000", version="bench", api_url="", console_url="")
    started = time.perf_counter()
    view = mesh_view(self_id=nid(0), alive=records, clients=clients, demand=demand)
    view_ms = (time.perf_counter() - started) * 1000
    state.mesh = lambda rows: mesh_view(self_id=nid(0), alive=records, clients=clients, demand=rows)
    state.demand = lambda: demand
    server, url = serve(build_console(state))
    try:
        status_bytes = len(httpx2.get(url + "/api/status", timeout=30).content)
        drawn = len(view["members"])
        times = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, args=ARGS)
            for _ in range(loads):
                context = browser.new_context()
                page = context.new_page()
                page.goto(url + "/")
                page.wait_for_function(
                    "(want) => document.body.dataset.ready === '1'"
                    " && document.querySelectorAll('#topology g.node').length === want",
                    arg=drawn,
                    timeout=60_000,
                )
                times.append(page.evaluate("performance.now()"))
                context.close()
            browser.close()
    finally:
        server.should_exit = True
    return {
        "members": n,
        "drawn": drawn,
        "links": len(view["links"]),
        "status_kib": round(status_bytes / 1024, 1),
        "view_ms": round(view_ms, 1),
        "load_ms_median": round(statistics.median(times)),
        "load_ms_max": round(max(times)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args()
    executable = chromium_path()
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    for n in (int(s) for s in args.sizes.split(",")):
        print(json.dumps(measure(n, args.loads, executable)))


if __name__ == "__main__":
    main()

"""Replica scaling: load beyond one server's throughput makes a standby add a replica; throughput follows; the
replica is released once the load stops and the demand TTL passes.

Two real node processes on loopback addresses, each llama-server on `--threads 1 --parallel 1` (a fixed share of
the machine, so two servers can do twice one's work on a 2-core machine): A serves the model (`--model`), B joins
without one (a standby, the model in its models directory). The run:

1. baseline: A alone, 4 closed-loop workers for `--measure` s → one server's throughput T1 (req/s);
2. B joins; an open-loop generator sends 2 × T1 req/s (at most 32 outstanding: the rest counted as shed) to A;
   per 5 s window: completions and who answered. Measured: load start → B's decision ("adds a replica") → B
   serving, and the mean throughput of the 12 windows after (against T1);
3. the load stops; the machine's ceiling for two servers is measured (both asked directly, 4 workers each: on a
   2-core machine the two llama-servers and three Python processes share the cores); then → B releases the replica
   (its status says "stopped"), `--demand-ttl` set low.

    python -m bench.p14_replicas                        # SmolLM2-135M, TTL 30 s

Results go to bench/RESULTS.md by hand, with the command and the machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx2

from bench.p6_promotion import MODEL, Watch, wait
from inference import paths
from inference.models import ensure_model
from mesh_mcp.mesh.tunnel import HOP_HEADER
from tests.harness import NodeProcess

WINDOW_S = 5.0
MAX_OUTSTANDING = 32
LOCAL = HOP_HEADER.decode()  # the header a node sets on a request it routes: the receiver serves it itself
AFTER_WINDOWS = 12  # windows measured once the replica serves


def _chat(i: int) -> dict[str, Any]:
    # A new conversation each request: sessions stick to a server, conversations spread over replicas.
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Count to five, run {i}"}], "max_tokens": 32}


def _model_state(node: NodeProcess) -> str | None:
    return next((m["state"] for m in node.status()["models"] if m["name"] == MODEL), None)


def baseline(apis: list[str], seconds: float) -> float:
    """Closed loop, 4 workers per API, each request served where it is sent (the routed-hop header: no forwarding):
    one API measures one server; two measure the machine's ceiling for two servers side by side."""
    done = 0
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker(k: int) -> None:
        nonlocal done
        i, api = 0, apis[k % len(apis)]
        while time.monotonic() < end:
            chat = _chat(1000 * k + i)
            r = httpx2.post(api + "/v1/chat/completions", json=chat, headers={LOCAL: "1"}, timeout=120)
            r.raise_for_status()
            i += 1
            with lock:
                done += 1

    started = time.monotonic()
    with ThreadPoolExecutor(4 * len(apis)) as pool:
        list(pool.map(worker, range(4 * len(apis))))
    return done / (time.monotonic() - started)


class Generator:
    """Open loop at `rate` req/s to `api`; completions per window and the answering node."""

    def __init__(self, api: str, rate: float) -> None:
        self.api, self.rate = api, rate
        self.started = time.monotonic()
        self.done: list[tuple[float, str]] = []  # (monotonic, x-mesh-node)
        self.shed = self.errors = 0
        self._stop = threading.Event()
        self._sem = threading.Semaphore(MAX_OUTSTANDING)
        self._pool = ThreadPoolExecutor(MAX_OUTSTANDING)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _one(self, i: int) -> None:
        try:
            r = httpx2.post(self.api + "/v1/chat/completions", json=_chat(i), timeout=300)
            if r.status_code == 200:
                self.done.append((time.monotonic(), r.headers.get("x-mesh-node", "")))
            else:
                self.errors += 1
        except httpx2.HTTPError:
            self.errors += 1
        finally:
            self._sem.release()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            due = self.started + i / self.rate
            if (pause := due - time.monotonic()) > 0:
                time.sleep(pause)
            if self._sem.acquire(blocking=False):
                self._pool.submit(self._one, i)
            else:
                self.shed += 1
            i += 1

    def window(self, end: float) -> tuple[float, dict[str, int]]:
        """Throughput (req/s) of the WINDOW_S ending at `end`, and completions by node."""
        got = [n for t, n in self.done if end - WINDOW_S < t <= end]
        by: dict[str, int] = {}
        for n in got:
            by[n] = by.get(n, 0) + 1
        return len(got) / WINDOW_S, by

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)


def run(tmp: Path, models: Path, measure: float, ttl: float) -> None:
    env = {"MESH_LLM_MODELS": str(models)}
    common = ["--threads", "1", "--parallel", "1", "--demand-ttl", str(int(ttl))]
    a = NodeProcess(tmp / "a", ["--mesh-host", "127.0.0.2", "--model", MODEL, *common], env=env).start()
    nodes = [a]
    try:
        wait(a, "A serving", lambda s: _model_state_in(s) == "serving", 240)
        t1 = baseline([a.api], measure)
        print(f"one server (A alone, 4 closed-loop workers, {measure:.0f} s): {t1:.2f} req/s", flush=True)
        token = wait(a, "token", lambda s: bool(s.get("invite_token")))["invite_token"]
        b = NodeProcess(tmp / "b", ["--mesh-host", "127.0.0.3", "--join", token, *common], env=env).start()
        nodes.append(b)
        b_id = wait(b, "B a standby", lambda s: (s.get("standby") or {}).get("decision") == "stay")["node_id"]
        decided = Watch(b, r"adds a replica of " + MODEL)
        gen = Generator(a.api, 2 * t1)
        print(f"load: {2 * t1:.2f} req/s open loop (2 × one server)", flush=True)
        serving_at = doubled_at = None
        after: list[float] = []  # throughput of each window once B serves
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and len(after) < AFTER_WINDOWS:
            time.sleep(WINDOW_S)
            now = time.monotonic()
            rate, by = gen.window(now)
            if serving_at is None and _model_state(b) == "serving":
                serving_at = now
            elif serving_at is not None:
                after.append(rate)
            print(f"  t={now - gen.started:6.1f} s  {rate:5.2f} req/s  by node {by}", flush=True)
            if serving_at is not None and rate >= 1.8 * t1 and doubled_at is None:
                doubled_at = now
        gen.stop()
        ceiling = baseline([a.api, b.api], measure) if _model_state(b) == "serving" else 0.0
        stopped = time.monotonic()
        t_decided = decided.result(1)
        released = None
        while time.monotonic() - stopped < ttl + 300:
            if _model_state(b) == "stopped":
                released = time.monotonic()
                break
            time.sleep(1)
        from_b = sum(1 for _, n in gen.done if n == b_id)
        print(f"\none server: {t1:.2f} req/s; offered {2 * t1:.2f} req/s; shed {gen.shed}, errors {gen.errors}")
        start = gen.started

        def at(t: float | None) -> str:
            return "never" if t is None else f"{t - start:.1f} s"

        print(f"B decided to add a replica at {at(t_decided)} after the load began; serving by {at(serving_at)}")
        mean = sum(after) / max(1, len(after))
        print(f"throughput once B serves: {mean:.2f} req/s over {len(after)} windows = {mean / t1:.2f} × one server")
        print(f"first window ≥ 1.8 × one server: {at(doubled_at)}")
        print(f"ceiling: both servers asked directly, 4 workers each: {ceiling:.2f} req/s = {ceiling / t1:.2f} × one")
        print(f"requests answered by B: {from_b} of {len(gen.done)}")
        where = "never" if released is None else f"{released - stopped:.1f} s"
        print(f"load stopped → B released the replica after {where} (demand TTL {ttl:.0f} s)")
    finally:
        for node in nodes:
            node.stop()


def _model_state_in(status: dict[str, Any]) -> str | None:
    return next((m["state"] for m in status["models"] if m["name"] == MODEL), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", type=float, default=30.0, help="seconds of the one-server baseline")
    ap.add_argument("--ttl", type=float, default=30.0, help="--demand-ttl of both nodes")
    args = ap.parse_args()
    models = Path(os.environ.get("MESH_LLM_TEST_MODELS", paths.cache_dir() / "test-models"))
    models.mkdir(parents=True, exist_ok=True)
    anyio.run(lambda: ensure_model(MODEL, models_dir=models))
    with tempfile.TemporaryDirectory(prefix="p14r-") as tmp:
        run(Path(tmp), models, args.measure, args.ttl)


if __name__ == "__main__":
    main()

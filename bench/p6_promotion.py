"""P6: the last server of a model is killed → the model is served again by a standby, nobody typing a command.

Three real node processes on loopback addresses: A serves the model, B joined without one (a standby with the model
in its models directory), C is a client sending one request a second. Each run kills A (-9, its whole process
group) and measures, from B's log and C's answers:

- detection: kill → B's membership declares A dead ("member … died");
- decision: declared dead → B logs "promoting to serve …";
- load: decision → C's first answer from B (download if any, llama-server start, gossip of `serving`);
- gap: kill → C's first answer from B (C's requests in between get 503 + Retry-After).

    python -m bench.p6_promotion --runs 10            # SmolLM2-135M, the embedded default

Results go to bench/RESULTS.md by hand, with the command and the machine.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2

from inference import paths
from inference.models import ensure_model
from tests.harness import NodeProcess

MODEL = "SmolLM2-135M-Instruct-Q4_1"


class Watch:
    """The monotonic time `pattern` first appears in a node's log (polled every 20 ms in a thread)."""

    def __init__(self, node: NodeProcess, pattern: str) -> None:
        self.at: float | None = None
        self._node, self._pattern, self._stop = node, re.compile(pattern), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.at is None:
            if self._pattern.search(self._node.log()):
                self.at = time.monotonic()
            time.sleep(0.02)

    def result(self, timeout: float) -> float | None:
        self._thread.join(timeout)
        self._stop.set()
        return self.at


def _watching(status: dict[str, Any]) -> bool:
    """A standby that stays, having seen the requests (demand is requests; a server's pin ends with the server)."""
    wanted = {d["model"] for d in status["demand"] if d["last_wanted_s_ago"] is not None}
    return (status.get("standby") or {}).get("decision") == "stay" and MODEL in wanted


def wait(node: NodeProcess, what: str, check: Any, timeout: float = 120) -> dict[str, Any]:
    return node.wait_for(what, check, timeout)


def one_run(tmp: Path, models: Path, run: int) -> dict[str, float]:
    env = {"MESH_LLM_MODELS": str(models)}
    base = ["--mesh-host"]
    a = NodeProcess(tmp / f"a{run}", [*base, "127.0.0.2", "--model", MODEL], env=env).start()
    nodes = [a]
    try:
        wait(a, "A serving", lambda s: any(m["name"] == MODEL and m["state"] == "serving" for m in s["models"]), 240)
        token = wait(a, "token", lambda s: bool(s.get("invite_token")))["invite_token"]
        b = NodeProcess(tmp / f"b{run}", [*base, "127.0.0.3", "--join", token], env=env).start()
        c = NodeProcess(tmp / f"c{run}", [*base, "127.0.0.4", "--client", "--join", token], env=env).start()
        nodes += [b, c]
        a_id = a.status()["node_id"]
        wait(c, "C routes to A", lambda s: MODEL in {m for p in s["peers"] for m in p["serving"]})
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx2.post(c.api + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
        wait(b, "B a standby that stays, the request seen", _watching)
        died = Watch(b, rf"member {a_id} .*died")
        decided = Watch(b, r"promoting to serve " + MODEL)
        assert a.proc is not None
        killed = time.monotonic()
        os.killpg(a.proc.pid, signal.SIGKILL)
        answered, refused = None, 0
        while answered is None and time.monotonic() - killed < 300:
            r = httpx2.post(c.api + "/v1/chat/completions", json=chat, timeout=60)
            if r.status_code == 200:
                answered = time.monotonic()
            else:
                refused += r.status_code == 503
                time.sleep(0.2)
        t_died, t_decided = died.result(5), decided.result(5)
        if answered is None or t_died is None or t_decided is None:
            raise SystemExit(f"run {run}: no promotion seen\n{b.log()[-3000:]}")
        return {
            "detection_s": t_died - killed,
            "decision_s": t_decided - t_died,
            "load_s": answered - t_decided,
            "gap_s": answered - killed,
            "503s": float(refused),
        }
    finally:
        for node in nodes:
            node.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    models = Path(os.environ.get("MESH_LLM_TEST_MODELS", paths.cache_dir() / "test-models"))
    models.mkdir(parents=True, exist_ok=True)
    anyio.run(lambda: ensure_model(MODEL, models_dir=models))
    rows = []
    with tempfile.TemporaryDirectory(prefix="p6-") as tmp:
        for run in range(args.runs):
            row = one_run(Path(tmp), models, run)
            rows.append(row)
            print(f"run {run + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    print(f"\n{args.runs} runs, {MODEL}: median / max")
    for key in rows[0]:
        values = [r[key] for r in rows]
        print(f"  {key:12s} {statistics.median(values):6.2f} / {max(values):6.2f}")


if __name__ == "__main__":
    main()

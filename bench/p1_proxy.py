"""P1: what the node's API proxy costs against asking llama-server directly.

Starts a real node serving SmolLM2, then alternates identical streaming chat requests sent to the
node (:9337 path) and straight to its llama-server, and reports the tokens/s ratio (target ≥ 0.98)
and the time-to-first-token the proxy adds (target ≤ 2 ms), medians over interleaved runs.

    python bench/p1_proxy.py [--runs 20] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference import paths
from inference.models import ensure_model
from inference.provision import ensure_llama_cpp
from tests.harness import NodeProcess

MODEL = "SmolLM2-135M-Instruct-Q4_1"


def one_run(client: httpx2.Client, base: str, tokens: int) -> tuple[float, float, float]:
    """(ttft seconds, delivered tokens/s, delivered ÷ generated tokens/s) for one streamed chat.

    llama-server's own decode speed varies run to run on a shared 2-core machine far more than any
    proxy costs, so the comparison that isolates the hop is how much of the speed llama-server
    reports for *this* request (`timings.predicted_per_second` in the last chunk) reaches the client.
    """
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    generated = 0.0
    with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                now = time.perf_counter()
                if not n:
                    first = now
                last = now
                n += 1
            if '"timings"' in line:
                generated = json.loads(line[6:])["timings"]["predicted_per_second"]
    delivered = (n - 1) / (last - first) if n > 1 else 0.0
    return first - t0, delivered, delivered / generated if generated else 0.0


def prepare() -> Path:
    """llama.cpp built and the model fetched (both cached); returns the models directory."""
    anyio.run(ensure_llama_cpp)
    models_dir = paths.cache_dir() / "test-models"
    anyio.run(lambda: ensure_model(MODEL, models_dir=models_dir))
    return models_dir


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on `timeout`/kill
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--isolate", action="store_true", help="llama-server 1 thread on CPU 0, Python on CPU 1")
    args = ap.parse_args()
    models_dir = prepare()
    with tempfile.TemporaryDirectory() as home:
        node = NodeProcess(
            home=Path(home),
            args=[
                "--model",
                MODEL,
                "--parallel",
                "1",
                *(["--llama-arg=--threads", "--llama-arg=1"] if args.isolate else []),
            ],
            env={"MESH_LLM_MODELS": str(models_dir)},
        )
        node.start()
        try:
            status = node.wait_model_state(MODEL, "serving", timeout=300)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)", status["detail"])
            assert m, status
            direct, proxied = m.group(1), node.api
            if args.isolate:
                from bench.mesh_bench import pin_all

                pin_all(node)
            with httpx2.Client(timeout=120) as client:
                for base in (direct, proxied):  # warm both paths and the prompt cache
                    one_run(client, base, 8)
                rows: dict[str, list[tuple[float, float, float]]] = {"direct": [], "proxied": []}
                for _ in range(args.runs):
                    rows["direct"].append(one_run(client, direct, args.tokens))
                    rows["proxied"].append(one_run(client, proxied, args.tokens))
        finally:
            node.stop()
    med = {k: [statistics.median(r[i] for r in v) for i in range(3)] for k, v in rows.items()}
    result = {
        "runs": args.runs,
        "tokens": args.tokens,
        "direct_ttft_ms": round(med["direct"][0] * 1e3, 2),
        "proxied_ttft_ms": round(med["proxied"][0] * 1e3, 2),
        "added_ttft_ms": round((med["proxied"][0] - med["direct"][0]) * 1e3, 2),
        "direct_tok_s": round(med["direct"][1], 1),
        "proxied_tok_s": round(med["proxied"][1], 1),
        "tok_s_ratio": round(med["proxied"][1] / med["direct"][1], 4),
        "delivered_share_direct": round(med["direct"][2], 4),
        "delivered_share_proxied": round(med["proxied"][2], 4),
        "tok_s_ratio_per_request": round(med["proxied"][2] / med["direct"][2], 4),
        "isolated": args.isolate,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

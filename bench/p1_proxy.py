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
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference import paths
from inference.llamacpp import ensure_llama_cpp
from inference.models import ensure_model
from tests.harness import NodeProcess

MODEL = "SmolLM2-135M-Instruct-Q4_1"


def one_run(client: httpx2.Client, base: str, tokens: int) -> tuple[float, float, int]:
    """(ttft seconds, decode tokens/s, content chunks) for one streamed chat completion."""
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
    with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                now = time.perf_counter()
                if not n:
                    first = now
                last = now
                n += 1
    return first - t0, (n - 1) / (last - first) if n > 1 else 0.0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    anyio.run(ensure_llama_cpp)
    models_dir = paths.cache_dir() / "test-models"
    anyio.run(lambda: ensure_model(MODEL, models_dir=models_dir))
    with tempfile.TemporaryDirectory() as home:
        node = NodeProcess(
            home=Path(home), args=["--model", MODEL, "--parallel", "1"], env={"MESH_LLM_MODELS": str(models_dir)}
        )
        node.start()
        try:
            status = node.wait_model_state(MODEL, "serving", timeout=300)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)", status["detail"])
            assert m, status
            direct, proxied = m.group(1), node.api
            with httpx2.Client(timeout=120) as client:
                for base in (direct, proxied):  # warm both paths and the prompt cache
                    one_run(client, base, 8)
                rows: dict[str, list[tuple[float, float, int]]] = {"direct": [], "proxied": []}
                for _ in range(args.runs):
                    rows["direct"].append(one_run(client, direct, args.tokens))
                    rows["proxied"].append(one_run(client, proxied, args.tokens))
        finally:
            node.stop()
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in rows.items()}
    result = {
        "runs": args.runs,
        "tokens": args.tokens,
        "direct_ttft_ms": round(med["direct"][0] * 1e3, 2),
        "proxied_ttft_ms": round(med["proxied"][0] * 1e3, 2),
        "added_ttft_ms": round((med["proxied"][0] - med["direct"][0]) * 1e3, 2),
        "direct_tok_s": round(med["direct"][1], 1),
        "proxied_tok_s": round(med["proxied"][1], 1),
        "tok_s_ratio": round(med["proxied"][1] / med["direct"][1], 4),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Speculative decoding, solo: tokens/s with ÷ without each speculation type, acceptance, and where the time goes.

For each `--threads` value, llama-server (this node's pinned build, the flags a mesh-llm node uses) runs the target
alone, then with each speculation type, and answers every prompt of bench/spec_prompts.py (20 code, 20 prose) at
temperature 0 with `--tokens` tokens. Tokens/s is generated tokens over llama-server's own generation time
(`timings.predicted_ms`), summed over the prompts of a class; acceptance is `draft_n_accepted / draft_n`. Every
answer with speculation is compared with the answer without (greedy verification is lossless: they must match).

Where the time goes, per generated token: the draft's share is the tokens it drafted per generated token times its
own decode time per token (the draft served alone, measured here); the rest of the time with speculation is the
target's verification passes, (drafted + 1) tokens each.

The controller row (`--controller`): a mesh-llm node serving the target with `--draft DRAFT` and nothing forced,
`--threads T --parallel 1`; once it has calibrated and chosen (`/api/status` `speculation`), the same prompts are
asked through its API, and its speed is compared with the `none` row.

    python bench/spec_solo.py --threads 2,1 [--per-class 20] [--tokens 128] [--controller]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.spec_prompts import CODE, PROSE
from inference.provision import ensure_llama_cpp

MODES: dict[str, list[str]] = {
    "none": [],
    "draft": [
        "--spec-type",
        "draft-simple",
        "--spec-draft-n-max",
        "4",
        "--spec-draft-p-min",
        "0.75",
        "-md",
        "{draft}",
        "-devd",
        "none",
    ],
    "draft-p0": ["--spec-type", "draft-simple", "--spec-draft-n-max", "4", "-md", "{draft}", "-devd", "none"],
    "ngram": ["--spec-type", "ngram-simple"],
}


def serve(binary: Path, model: Path, threads: int, extra: list[str], port: int) -> subprocess.Popen[bytes]:
    args = [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--threads",
            str(threads), "--ctx-size", "8192", "--parallel", "1", "--no-webui", "--metrics", "--jinja",
            "--fit", "off", "--reasoning-format", "deepseek", *extra]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited ({proc.returncode}) with {extra}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("llama-server did not become ready")


def ask(port: int, prompt: str, tokens: int, model: str | None = None) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0}
    body |= {"model": model} if model else {}
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=900)
    r.raise_for_status()
    j = r.json()
    t = j["timings"]
    return {"text": j["choices"][0]["message"]["content"], "n": t["predicted_n"], "ms": t["predicted_ms"],
            "drafted": t.get("draft_n", 0), "accepted": t.get("draft_n_accepted", 0)}  # fmt: skip


def run_mode(binary: Path, model: Path, threads: int, extra: list[str], prompts: dict[str, list[str]],
             tokens: int, port: int) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    proc = serve(binary, model, threads, extra, port)
    try:
        return {cls: [ask(port, p, tokens) for p in ps] for cls, ps in prompts.items()}
    finally:
        proc.terminate()
        proc.wait()


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    n, ms = sum(r["n"] for r in rows), sum(r["ms"] for r in rows)
    drafted, accepted = sum(r["drafted"] for r in rows), sum(r["accepted"] for r in rows)
    return {"tokens": n, "tok_s": 1000 * n / ms, "drafted": drafted,
            "acceptance": accepted / drafted if drafted else 0.0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path.home() / ".models/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf")
    ap.add_argument("--draft", type=Path, default=Path.home() / ".models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--modes", default="none,draft,ngram")
    ap.add_argument("--out", type=Path, default=Path("/tmp/spec_solo.json"))
    ap.add_argument("--controller", action="store_true", help="also the row of a node left to choose")
    a = ap.parse_args()
    llama = anyio.run(ensure_llama_cpp)
    binary = llama.server
    prompts = {"code": CODE[: a.per_class], "prose": PROSE[: a.per_class]}
    results: dict[str, Any] = {"command": " ".join(sys.argv), "build": llama.version, "rows": []}
    port = 18111
    for threads in [int(t) for t in a.threads.split(",")]:
        # The draft alone: its decode time per token (where the time goes)
        alone = run_mode(binary, a.draft, threads, [], {"code": CODE[:3]}, a.tokens, port)
        t_draft_ms = sum(r["ms"] for r in alone["code"]) / sum(r["n"] for r in alone["code"])
        base: dict[str, list[dict[str, Any]]] = {}
        for mode in a.modes.split(","):
            extra = [x.replace("{draft}", str(a.draft)) for x in MODES[mode]]
            got = run_mode(binary, a.model, threads, extra, prompts, a.tokens, port)
            if mode == "none":
                base = got
            for cls, rows in got.items():
                s, b = summary(rows), summary(base[cls]) if base else None
                same = sum(r["text"] == q["text"] for r, q in zip(rows, base[cls], strict=True)) if base else 0
                per_tok_ms = 1000 / s["tok_s"]
                draft_ms = s["drafted"] / s["tokens"] * t_draft_ms if mode == "draft" else 0.0
                row = {"threads": threads, "mode": mode, "class": cls, **s,
                       "ratio": s["tok_s"] / b["tok_s"] if b else None, "same_output": f"{same}/{len(rows)}",
                       "ms_per_token": per_tok_ms, "draft_ms_per_token": draft_ms,
                       "verify_ms_per_token": per_tok_ms - draft_ms, "t_draft_ms": t_draft_ms}  # fmt: skip
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
                a.out.write_text(json.dumps(results, indent=1))
        if a.controller:
            spec, got = controller(a.model, a.draft, threads, prompts, a.tokens)
            for cls, rows in got.items():
                s, b = summary(rows), summary(base[cls])
                row = {"threads": threads, "mode": f"controller ({spec['mode']})", "class": cls, **s,
                       "ratio": s["tok_s"] / b["tok_s"], "why": spec["why"], "decided_on": spec["decided_on"],
                       "acceptance_calibration": spec.get("acceptance")}  # fmt: skip
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
                a.out.write_text(json.dumps(results, indent=1))


def controller(model: Path, draft: Path, threads: int, prompts: dict[str, list[str]], tokens: int
               ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:  # fmt: skip
    """A node left to choose: its decision, then the prompts through its API in the mode it chose."""
    from tests.harness import NodeProcess

    with tempfile.TemporaryDirectory() as home:
        node = NodeProcess(Path(home), ["--model", str(model), "--draft", str(draft), "--threads", str(threads),
                                        "--parallel", "1"]).start()  # fmt: skip
        try:
            name = model.stem
            node.wait_model_state(name, "serving", timeout=600)

            def decided(s: dict[str, Any]) -> bool:
                m = node.model(s, name) or {}
                spec = m.get("speculation") or {}
                return bool(spec.get("chosen")) and spec.get("mode") == spec.get("chosen") and m["state"] == "serving"

            status = node.wait_for("the controller's decision", decided, timeout=1800)
            spec = (node.model(status, name) or {})["speculation"]
            port = int(node.api.rsplit(":", 1)[1])
            return spec, {cls: [ask(port, p, tokens, name) for p in ps] for cls, ps in prompts.items()}
        finally:
            node.stop()


if __name__ == "__main__":
    main()

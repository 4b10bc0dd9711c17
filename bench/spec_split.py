"""Speculative decoding across pipeline splits: with ÷ without, what the controller chose, and where the time goes.

For each node count (`--nodes`) and injected round trip (`--rtt-ms`, 0 = loopback), real mesh-llm nodes on
127.0.0.x (every process `--threads 1 --parallel 1`, as bench/p3_split.py: a CPU-only host keeps the output layer
on its own rpc-server, the workers hold the file) serve the target `--split N` three times:

1. **controller**: `--draft DRAFT`, nothing forced. The node calibrates every mode (off, the draft, n-gram lookup)
   and chooses; its `/api/status` `speculation.decided_on` is the calibration's tokens/s per mode. Then the
   benchmark prompts are asked in the mode it chose (the controller row).
2. **draft**: the draft forced on (`MESH_LLM_SPEC_FORCE=1`); the same prompts.
3. **off**: `--no-draft`; the same prompts.

So each row has the prompts' tokens/s with the draft and without (with ÷ without), acceptance, the controller's
choice and its speed ÷ no speculation. With links (`--rtt-ms`), every node binds 127.0.0.(2+i) and advertises
127.0.0.(12+i), where a UDP link (QUIC) and a TCP link (the data plane) add half the RTT each way (tests/netproxy.py).

Where the time goes, per generated token: the chain's round trips are paid once per target pass (host → worker 1 →
… → host: N crossings of RTT/2), and a pass yields its accepted drafts + 1 tokens, so passes = tokens − accepted;
the draft's compute is drafted tokens × its decode time per token (`--t-draft-ms`, the draft alone at one thread:
bench/spec_solo.py); the rest is the target's compute (verification).

    python bench/spec_split.py --nodes 2,3 --rtt-ms 0,5,20,50 [--per-class 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.p3_split import linked_args
from bench.spec_prompts import CODE_EDIT, CODE_WRITE, PROSE
from tests.harness import NodeProcess

FORCE = {"MESH_LLM_SPEC_FORCE": "1"}


def ask(api: str, model: str, prompt: str, tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens}
    body |= {"temperature": 0}
    for _ in range(600):
        r = httpx2.post(api + "/v1/chat/completions", json=body, timeout=900)
        if r.status_code != 503:
            break
        time.sleep(0.5)
    r.raise_for_status()
    j = r.json()
    t = j["timings"]
    return {"text": j["choices"][0]["message"]["content"], "n": t["predicted_n"], "ms": t["predicted_ms"],
            "drafted": t.get("draft_n", 0), "accepted": t.get("draft_n_accepted", 0)}  # fmt: skip


def totals(rows: list[dict[str, Any]]) -> dict[str, float]:
    n, ms = sum(r["n"] for r in rows), sum(r["ms"] for r in rows)
    drafted, accepted = sum(r["drafted"] for r in rows), sum(r["accepted"] for r in rows)
    return {"tokens": n, "tok_s": 1000 * n / ms, "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / drafted if drafted else 0.0}  # fmt: skip


def mesh_run(tmp: Path, model: str, n: int, rtt_ms: float, extra: list[str], env: dict[str, str],
             prompts: list[str], tokens: int, models_dir: Path, decide: bool) -> dict[str, Any]:  # fmt: skip
    env = {"MESH_LLM_MODELS": str(models_dir), **env}
    nodes: list[NodeProcess] = []
    with contextlib.ExitStack() as links:

        def linked(i: int) -> list[str]:
            return linked_args(links, i, rtt_ms)

        try:
            tag = f"{n}-{rtt_ms:g}-{len(list(tmp.iterdir()))}"
            host = NodeProcess(tmp / f"h{tag}", ["--mesh-host", "127.0.0.2", "--model", model, "--split", str(n),
                               "--threads", "1", "--parallel", "1", *extra, *linked(0)], env=env).start()  # fmt: skip
            nodes.append(host)
            token = host.wait_for("token", lambda s: bool(s.get("invite_token")), timeout=60)["invite_token"]
            for i in range(1, n):
                args = ["--mesh-host", f"127.0.0.{2 + i}", "--join", token, "--threads", "1", *linked(i)]
                nodes.append(NodeProcess(tmp / f"w{tag}{i}", args, env=env).start())
            host.wait_model_state(model, "serving", timeout=1800)
            spec: dict[str, Any] = {}
            if decide:
                status = host.wait_for(
                    "the controller's decision",
                    lambda s: bool(((host.model(s, model) or {}).get("speculation") or {}).get("chosen")),
                    timeout=3600,
                )
                spec = (host.model(status, model) or {})["speculation"]
                chosen = spec["chosen"]
                host.wait_for(
                    "the chosen mode",
                    lambda s: (
                        (m := host.model(s, model)) is not None
                        and m["state"] == "serving"
                        and (m.get("speculation") or {}).get("mode") == chosen
                    ),
                    timeout=1800,
                )
            api = host.api
            ask(api, model, "Hello", 4)  # warm
            rows = [ask(api, model, p, tokens) for p in prompts]
            final = (host.model(host.status(), model) or {}).get("speculation") or {}
            return {"rows": rows, "speculation": spec or final}
        finally:
            for node in nodes:
                node.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M")
    ap.add_argument("--draft", default="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M")
    ap.add_argument("--models-dir", type=Path, default=Path.home() / ".models")
    ap.add_argument("--nodes", default="3,2")
    ap.add_argument("--rtt-ms", default="50,20,5,0")
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--t-draft-ms", type=float, default=0.0, help="the draft's decode ms/token at one thread")
    ap.add_argument("--out", type=Path, default=Path("/tmp/spec_split.json"))
    a = ap.parse_args()
    k = a.per_class
    code = (CODE_WRITE[: (k + 1) // 2] + CODE_EDIT[: k // 2])[:k]
    prompts = {"code": code, "prose": PROSE[:k]}
    flat = [p for ps in prompts.values() for p in ps]
    results: dict[str, Any] = {"command": " ".join(sys.argv), "rows": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for n in [int(x) for x in a.nodes.split(",")]:
            for rtt in [float(x) for x in a.rtt_ms.split(",")]:
                ctl = mesh_run(tmp, a.model, n, rtt, ["--draft", a.draft], {}, flat, a.tokens, a.models_dir, True)
                chosen = ctl["speculation"].get("chosen", "off")
                forced = mesh_run(
                    tmp, a.model, n, rtt, ["--draft", a.draft], FORCE, flat, a.tokens, a.models_dir, False
                )
                plain = mesh_run(tmp, a.model, n, rtt, ["--no-draft"], {}, flat, a.tokens, a.models_dir, False)
                on_rows, off_rows, ctl_rows, on_mode = forced["rows"], plain["rows"], ctl["rows"], "draft"
                same = sum(x["text"] == y["text"] for x, y in zip(on_rows, off_rows, strict=True))
                for cls, ps in prompts.items():
                    idx = [i for i, p in enumerate(flat) if p in ps]
                    on, off = totals([on_rows[i] for i in idx]), totals([off_rows[i] for i in idx])
                    by_ctl = totals([ctl_rows[i] for i in idx])
                    passes = (on["tokens"] - on["accepted"]) / on["tokens"]
                    rtt_ms_tok = passes * n * rtt / 2
                    draft_ms_tok = on["drafted"] / on["tokens"] * a.t_draft_ms
                    ms_tok = 1000 / on["tok_s"]
                    row = {
                        "nodes": n, "rtt_ms": rtt, "class": cls, "on_mode": on_mode, "tok_s_on": on["tok_s"],
                        "tok_s_off": off["tok_s"], "ratio": on["tok_s"] / off["tok_s"], "acceptance": on["acceptance"],
                        "chosen": chosen, "tok_s_controller": by_ctl["tok_s"],
                        "controller_ratio": by_ctl["tok_s"] / off["tok_s"],
                        "calibration_tok_s": ctl["speculation"].get("decided_on"),
                        "why": ctl["speculation"].get("why"), "same_output": f"{same}/{len(flat)}",
                        "ms_per_token_on": ms_tok, "rtt_ms_per_token_on": rtt_ms_tok,
                        "draft_ms_per_token_on": draft_ms_tok,
                        "verify_ms_per_token_on": ms_tok - rtt_ms_tok - draft_ms_tok,
                        "ms_per_token_off": 1000 / off["tok_s"], "rtt_ms_per_token_off": n * rtt / 2,
                    }  # fmt: skip
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""P18: the pause a client sees when the node generating its stream is killed (issue 18's failover benchmark).

Real node processes on loopback addresses: two replicas of the model (`--threads 1` each) and a client C that takes
the requests. Each run streams one chat through C (temperature 0, the same question as the uninterrupted reference
run), kills the node C routed it to (-9, its whole process group) at a random token, and measures from the client:
- pause: the kill → the next content event (what a user notices: failure detection, the continuation's prompt
  processing on the other server, the relay);
- detection: the kill → C's membership declaring the node dead (C's log);
- whether the text equals the uninterrupted run's.
Then a new replica joins in place of the dead one, so every run has two servers.

A text that differs is told apart by where it went another way: before the kill (the first server's own run
already differed from the reference) or after it (the continuation). llama-server at temperature 0 is not one
function of the request: a prompt found in its cache is evaluated otherwise (the cached part came from a batch of
another size, the last token is evaluated alone), and the logits differ enough to flip a near-tie (llama.cpp
#28527; seen here: the same server answered this question with 121 tokens fresh and 200 after it had served a
continuation). The survivor of one run, whose cache holds the continuation it served, may be the first server of
the next. `--no-prompt-cache` sends `cache_prompt: false` so every request evaluates its whole prompt; what differs
then is the continuation's: its prefill evaluated as one batch where the first server decoded token by token.

    python -m bench.p18_failover --runs 20           # SmolLM2-135M, the embedded default

Results go to bench/RESULTS.md by hand, with the command and the machine.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import openai

from bench.p6_promotion import MODEL, Watch, wait
from inference import paths
from inference.models import ensure_model
from tests.harness import NodeProcess

PROMPT = "Count from 1 to 80, separated by commas."
MAX_TOKENS = 200


def serving(status: dict[str, Any]) -> bool:
    return any(m["name"] == MODEL and m["state"] == "serving" for m in status["models"])


def servers(status: dict[str, Any]) -> int:
    rows = [m for m in status["mesh"]["models"] if m["name"] == MODEL]
    return len(rows[0]["servers"]) if rows else 0


def stream(
    c: NodeProcess, kill_at: int | None, replicas: dict[str, NodeProcess], extra: dict[str, Any]
) -> dict[str, Any]:
    client = openai.OpenAI(base_url=c.api + "/v1", api_key="unused", max_retries=0, timeout=300)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body=extra,
    )
    served_by = raw.headers["x-mesh-node"]
    text, events, killed, resumed, died, before_kill = "", 0, None, None, None, ""
    for chunk in raw.parse():
        if not (chunk.choices and chunk.choices[0].delta.content):
            continue
        now = time.monotonic()
        if killed is not None and resumed is None:
            resumed = now
        text += chunk.choices[0].delta.content
        events += 1
        if events == kill_at:
            victim = replicas[served_by]
            died = Watch(c, rf"member {served_by} .*died")
            assert victim.proc is not None
            killed = time.monotonic()
            os.killpg(victim.proc.pid, signal.SIGKILL)
            before_kill = text
    t_died = died.result(5) if died is not None else None
    return {
        "text": text,
        "before_kill": before_kill,
        "events": events,
        "served_by": served_by,
        "pause_s": (resumed - killed) if killed is not None and resumed is not None else None,
        "detection_s": (t_died - killed) if killed is not None and t_died is not None else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kill-at", type=int, help="kill at this token every run (default: a random one)")
    ap.add_argument(
        "--no-prompt-cache",
        action="store_true",
        help="send `cache_prompt: false`: every request evaluates its whole prompt in one batch (see the docstring)",
    )
    args = ap.parse_args()
    extra = {"cache_prompt": False} if args.no_prompt_cache else {}
    rng = random.Random(args.seed)
    models = Path(os.environ.get("MESH_LLM_TEST_MODELS", paths.cache_dir() / "test-models"))
    models.mkdir(parents=True, exist_ok=True)
    anyio.run(lambda: ensure_model(MODEL, models_dir=models))
    env = {"MESH_LLM_MODELS": str(models)}
    nodes: list[NodeProcess] = []
    with tempfile.TemporaryDirectory(prefix="p18-") as tmp:

        def replica(name: str, ip: str, *extra: str) -> NodeProcess:
            node = NodeProcess(
                Path(tmp) / name, ["--mesh-host", ip, "--model", MODEL, "--threads", "1", *extra], env=env
            ).start()
            nodes.append(node)
            wait(node, f"{name} serving", serving, 240)
            return node

        try:
            a = replica("a", "127.0.0.2")
            token = wait(a, "token", lambda s: bool(s.get("invite_token")))["invite_token"]
            b = replica("b", "127.0.0.3", "--join", token)
            c = NodeProcess(Path(tmp) / "c", ["--mesh-host", "127.0.0.4", "--client", "--join", token], env=env)
            nodes.append(c.start())
            wait(c, "C sees two servers", lambda s: servers(s) == 2, 120)
            replicas = {n.status()["node_id"]: n for n in (a, b)}
            reference = stream(c, None, replicas, extra)
            print(f"reference: {reference['events']} content events", flush=True)
            rows = []
            for run in range(args.runs):
                kill_at = args.kill_at or rng.randint(5, max(6, reference["events"] - 5))
                row = stream(c, kill_at, replicas, extra)
                row["same_text"] = row["text"] == reference["text"]
                # where it went another way: before the kill (the first server's own run differed from the
                # reference: its prompt cache, llama.cpp #28527) or after (the continuation)
                row["diverged"] = (
                    "-" if row["same_text"] else "before kill" if not reference["text"].startswith(row["before_kill"])
                    else "after kill"
                )  # fmt: skip
                if not row["same_text"]:
                    pairs = zip(row["text"], reference["text"], strict=False)
                    at = next((i for i, (x, y) in enumerate(pairs) if x != y), None)
                    at = min(len(row["text"]), len(reference["text"])) if at is None else at
                    print(f"  differs at char {at}: {row['text'][max(0, at - 20) : at + 30]!r} vs "
                          f"{reference['text'][max(0, at - 20) : at + 30]!r}")  # fmt: skip
                rows.append(row)
                print(
                    f"run {run + 1}: killed at token {kill_at}, pause {row['pause_s']:.2f} s, "
                    f"detection {row['detection_s'] if row['detection_s'] is None else round(row['detection_s'], 2)}"
                    f" s, same text {row['same_text']} ({row['diverged']})",
                    flush=True,
                )
                dead = replicas.pop(row["served_by"])
                dead.stop()
                survivor = next(iter(replicas.values()))
                fresh_token = wait(survivor, "token", lambda s: bool(s.get("invite_token")))["invite_token"]
                fresh = replica(f"r{run}", f"127.0.0.{10 + run}", "--join", fresh_token)
                replicas[fresh.status()["node_id"]] = fresh
                wait(c, "C sees two servers again", lambda s: servers(s) == 2, 180)
        finally:
            for node in nodes:
                node.stop()
    pauses = [r["pause_s"] for r in rows if r["pause_s"] is not None]
    detections = [r["detection_s"] for r in rows if r["detection_s"] is not None]
    same = sum(r["same_text"] for r in rows)
    print(f"\n{args.runs} runs, {MODEL}: median / max")
    print(f"  pause       {statistics.median(pauses):6.2f} / {max(pauses):6.2f} s")
    if detections:
        print(f"  detection   {statistics.median(detections):6.2f} / {max(detections):6.2f} s")
    print(f"  same text as the uninterrupted run: {same} / {len(rows)}")
    for where in ("before kill", "after kill"):
        if n := sum(r["diverged"] == where for r in rows):
            print(f"    went another way {where}: {n}")


if __name__ == "__main__":
    main()

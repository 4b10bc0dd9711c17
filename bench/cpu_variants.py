"""Tokens/s of llama.cpp CPU build variants on this machine (issue 11: which CPU flags the build uses).

Runs each given `llama-bench` on each model (prompt processing ppN and generation tgN, every core) and
prints a markdown table; a binary killed by a signal is reported as such (the AMX crash), not skipped.

    python bench/cpu_variants.py --bench native=/path/to/llama-bench --bench avx512=/other/llama-bench \
        --model ~/.models/SmolLM2-135M-Instruct-Q4_1.gguf --runs 3

`--bench NAME=PATH:ARGS` appends llama-bench arguments (e.g. `native-norepack=PATH:--repack 0`).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import signal
import subprocess
from pathlib import Path


def run_bench(binary: str, extra: list[str], model: Path, prompt: int, gen: int, runs: int, threads: int) -> dict:
    cmd = [binary, "-m", str(model), "-p", str(prompt), "-n", str(gen), "-r", str(runs), "-t", str(threads)]
    cmd += ["-o", "csv", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        why = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return {"error": why}
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    out = {}
    for row in rows:
        key = f"pp{row['n_prompt']}" if int(row["n_prompt"]) else f"tg{row['n_gen']}"
        out[key] = (float(row["avg_ts"]), float(row["stddev_ts"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", action="append", default=[], metavar="NAME=PATH[:ARGS]")
    p.add_argument("--model", action="append", default=[], type=Path)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    print(f"| build | model | pp{args.prompt} tok/s | tg{args.gen} tok/s |")
    print("|---|---|---|---|")
    for spec in args.bench:
        name, _, rest = spec.partition("=")
        binary, _, extra = rest.partition(":")
        for model in args.model:
            r = run_bench(binary, extra.split(), model, args.prompt, args.gen, args.runs, args.threads)
            if "error" in r:
                print(f"| {name} | {model.stem} | {r['error']} | {r['error']} |", flush=True)
                continue
            pp, tg = r[f"pp{args.prompt}"], r[f"tg{args.gen}"]
            print(f"| {name} | {model.stem} | {pp[0]:.1f} ± {pp[1]:.1f} | {tg[0]:.1f} ± {tg[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()

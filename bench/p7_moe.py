"""P7: expert shards — decode speed against the full model, quality per shard, and bytes between nodes per token.

No mixture-of-experts GGUF ships on PyPI, so the model is generated (`tests/ggufgen.write_skewed_moe`, qwen3moe by
default: random weights, routing skewed onto `--hot` experts per layer, a real byte-level tokenizer). Its numbers say
what sharding costs and preserves for a model whose routing is that skewed, not for a trained model.

1. Speed: llama-server (`-t 1`, ctx 512, 1 slot) on the full model and on each shard, both loaded, asked in turn
   (full, shard, full, shard, …) so both see the same machine; tok/s is llama-server's own
   `timings.predicted_per_second`; the ratio is the median shard run over the median full run of the same pairs.
   Target: shard ÷ full ≥ 1.0.
2. Quality: for 2-, 3- and 4-way shards, the experts each shard keeps come from llama-imatrix counts over the
   bundled calibration text (`moe_stats`) dealt by `moe_assign` with K experts per layer: K = ⌈n/N⌉ (no room to
   replicate: the hot experts are split) and K = ⌈n/N⌉ + hot (room for the hot core on every shard). Every shard is
   scored against the full model (`moe_quality`: teacher-forced top-1 agreement, KL over top-10); the gate verdict
   uses `DEFAULT_GATE`.
3. Bytes per token: `mesh-llm --model M --split 3` on 127.0.0.2 plus two members (capped with `--max-vram` so each
   holds the ⌈n/3⌉ + hot layout), sessions routed to the coordinator's own shard; QUIC bytes in + out on every node
   during a generation minus the same nodes' bytes over an idle window as long; per token = the difference between
   a 1536- and a 16-token answer over 1520 (what a request costs once — its in-flight count is gossiped — cancels).
   Target: 0.

    python bench/p7_moe.py [--layers 8 --embd 512 --experts 32 --used 4 --hot 8 --wtype f16] [--runs 3 --tokens 128]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference.gguf_facts import read_facts
from inference.llama_server import LlamaServer, ServerSettings
from inference.llamacpp import LlamaCpp
from inference.moe_assign import assign
from inference.moe_layout import moe_layout
from inference.moe_plan import expert_bytes
from inference.moe_quality import DEFAULT_GATE, reference_for, score
from inference.moe_shard import model_hash, write_shard
from inference.moe_stats import ensure_stats
from inference.provision import ensure_llama_cpp
from tests.ggufgen import write_skewed_moe
from tests.harness import NodeProcess

PROMPT = "the thin house in the world, "
MESH_TOKENS = 1536  # a long answer (the generated model is trained for 2048), so gossip noise per token is small


async def tok_s(url: str, tokens: int, runs: int) -> float:
    body = {"prompt": PROMPT, "n_predict": tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    out = []
    async with httpx2.AsyncClient(timeout=600) as client:
        for i in range(runs + 1):
            r = await client.post(url + "/completion", json=body)
            r.raise_for_status()
            if i or not runs:  # the first of several runs warms up
                out.append(float(r.json()["timings"]["predicted_per_second"]))
    return statistics.median(out)


async def paired(full_url: str, url: str, tokens: int, runs: int) -> tuple[float, float]:
    """(shard tok/s, full tok/s): medians of runs taken in turn, after one warm-up each."""
    shard, full = [], []
    for _ in range(runs):
        full.append(await tok_s(full_url, tokens, 0 if full else 1))
        shard.append(await tok_s(url, tokens, 0 if shard else 1))
    return statistics.median(shard), statistics.median(full)


def one_thread_server(llama: LlamaCpp, model: Path, alias: str) -> LlamaServer:
    return LlamaServer(
        llama=llama,
        model_path=model,
        alias=alias,
        log_path=model.with_suffix(f".{alias}.log"),
        settings=ServerSettings(ctx_per_slot=512, slots=1, extra_args=("--threads", "1"), max_start_failures=1),
    )


async def with_server(llama: LlamaCpp, model: Path, work: Any) -> Any:
    server = one_thread_server(llama, model, "bench")
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        assert server.base_url is not None
        result = await work(server.base_url)
        tg.cancel_scope.cancel()
    return result


async def shards_table(llama: LlamaCpp, path: Path, tmp: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    facts = read_facts(path)
    layout = moe_layout(facts)
    key = model_hash(facts, tmp / "hashes")
    t0 = time.monotonic()
    stats = await ensure_stats(llama, path, cache_dir=tmp / "stats", model_key=key, threads=1)
    t_stats = time.monotonic() - t0
    t0 = time.monotonic()
    ref = await reference_for(llama, path, cache_dir=tmp / "stats", model_key=key, threads=1)
    t_ref = time.monotonic() - t0
    print(f"statistics {t_stats:.1f} s ({stats.source}); reference {t_ref:.1f} s", flush=True)
    full_server = one_thread_server(llama, path, "full")
    async with anyio.create_task_group() as tg:
        await tg.start(full_server.run)
        assert full_server.base_url is not None
        rows = await _table(llama, path, tmp, args, layout, key, stats, ref, full_server.base_url)
        tg.cancel_scope.cancel()
    return rows


async def _table(
    llama: LlamaCpp,
    path: Path,
    tmp: Path,
    args: argparse.Namespace,
    layout: Any,
    key: str,
    stats: Any,
    ref: Any,
    full_url: str,
) -> list[dict[str, Any]]:
    full = await tok_s(full_url, args.tokens, args.runs)
    print(f"full model: {full:.1f} tok/s ({path.stat().st_size / 1e6:.0f} MB)", flush=True)
    rows: list[dict[str, Any]] = []
    n = layout.n_expert
    for n_shards in (2, 3, 4):
        for k in sorted({math.ceil(n / n_shards), min(n, math.ceil(n / n_shards) + args.hot)}):
            a = assign(n, layout.expert_used or args.used, stats.mass(), n_shards, capacity=k)
            for i, shard in enumerate(a.shards):
                per_layer: list[tuple[int, ...]] = [()] * layout.n_layers
                for row, layer in enumerate(layout.moe_layers):
                    per_layer[layer] = shard[row]
                out = write_shard(path, per_layer, tmp / f"s{n_shards}-{k}-{i}.gguf", source_key=key)

                async def measure(url: str) -> tuple[Any, float, float]:
                    return (await score(url, ref), *await paired(full_url, url, args.tokens, args.runs))

                quality, speed, full = await with_server(llama, out.path, measure)
                row = {
                    "shards": n_shards,
                    "k": k,
                    "core": a.core,
                    "shard": i,
                    "mb": out.n_bytes / 1e6,
                    "kept_mass": min(a.kept_mass[i]),
                    "agreement": quality.agreement,
                    "kl": quality.kl,
                    "passes": quality.passes(DEFAULT_GATE),
                    "tok_s": speed,
                    "ratio": speed / full,
                }
                rows.append(row)
                print(
                    f"{n_shards}-way K={k:>2} core={a.core:>2} shard {i}: {row['mb']:.0f} MB, min kept mass "
                    f"{row['kept_mass']:.3f}, agreement {quality.agreement:.3f}, KL {quality.kl:.4f} "
                    f"({'pass' if row['passes'] else 'REFUSED'}), {speed:.1f} tok/s = {speed / full:.3f} × full",
                    flush=True,
                )
                out.path.unlink()
    return rows


def status(node: NodeProcess) -> dict[str, Any]:
    return dict(httpx2.get(node.console + "/api/status", timeout=10).json())


def quic(nodes: list[NodeProcess]) -> int:
    return sum(status(n)["traffic"]["quic_bytes_in"] + status(n)["traffic"]["quic_bytes_out"] for n in nodes)


def mesh_bytes(path: Path, tmp: Path, args: argparse.Namespace) -> None:
    facts = read_facts(path)
    sizes = expert_bytes(facts, 4096, 1)
    k = min(sizes.n_expert, math.ceil(sizes.n_expert / 3) + args.hot)
    cap = f"{(sizes.shard_need(k) + sizes.expert_bytes // 2) / 2**30:.9f}"
    common = ["--models-dir", str(path.parent), "--max-vram", cap, "--threads", "1", "--ctx-size", "4096"]
    common += ["--parallel", "1"]
    nodes: list[NodeProcess] = []
    try:
        host = NodeProcess(
            home=tmp / "host", args=["--mesh-host", "127.0.0.2", "--model", str(path), "--split", "3", *common]
        ).start()
        nodes.append(host)
        token = host.wait_for("token", lambda s: bool(s.get("invite_token")), timeout=60)["invite_token"]
        for i in (1, 2):
            nodes.append(
                NodeProcess(
                    home=tmp / f"w{i}", args=["--mesh-host", f"127.0.0.{2 + i}", "--join", token, *common]
                ).start()
            )
        model = host.wait_model_state(path.stem, "serving", timeout=900)
        for s in model["placement"]["shards"]:
            q = s["quality"]
            print(f"mesh shard {s['shard']} on {s['node_id']}: agreement {q['agreement']:.3f}, KL {q['kl']:.4f}")
        for n in nodes:
            n.wait_for("3 shards", lambda s: sum(path.stem in p.get("serving", []) for p in s["peers"]) == 3, 60)
        host_id = status(host)["node_id"]
        body = {"model": path.stem, "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
        user = next(
            f"u{i}"
            for i in range(200)
            if httpx2.post(host.api + "/v1/completions", json={**body, "user": f"u{i}"}, timeout=120).headers[
                "x-mesh-node"
            ]
            == host_id
        )

        def extra(tokens: int) -> float:
            """Bytes on the mesh while the request runs, less the same nodes' bytes over an idle window as long."""
            before, t0 = quic(nodes), time.monotonic()
            r = httpx2.post(
                host.api + "/v1/completions", json={**body, "max_tokens": tokens, "user": user}, timeout=600
            )
            took, gen = time.monotonic() - t0, quic(nodes) - before
            assert r.headers["x-mesh-node"] == host_id and r.json()["usage"]["completion_tokens"] == tokens
            before = quic(nodes)
            time.sleep(took)
            idle = quic(nodes) - before
            print(f"{tokens} tokens in {took:.2f} s: {gen} B on the mesh, idle {idle} B over as long", flush=True)
            return gen - idle

        # Per request (the node publishes its in-flight count) vs per token: the slope between short and long.
        short, long = 16, MESH_TOKENS
        slopes = [(extra(long) - extra(short)) / (long - short) for _ in range(args.runs)]
        print(
            "cross-node bytes per generated token, (long − short) / (tokens − tokens): "
            + ", ".join(f"{x:+.1f}" for x in slopes)
            + f"; median {statistics.median(slopes):+.1f}"
        )
    finally:
        for n in nodes:
            n.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="qwen3moe", choices=["qwen3moe", "olmoe"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--embd", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--used", type=int, default=4)
    p.add_argument("--hot", type=int, default=8)
    p.add_argument("--ff", type=int, default=512)
    p.add_argument("--wtype", default="f16", choices=["f32", "f16", "q8_0"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--skip-mesh", action="store_true")
    p.add_argument("--only-mesh", action="store_true", help="skip the speed and quality table")
    args = p.parse_args()
    llama = anyio.run(ensure_llama_cpp)
    with tempfile.TemporaryDirectory(prefix="p7-") as d:
        tmp = Path(d)
        (tmp / "models").mkdir()
        path = tmp / "models" / f"moe-{args.arch}.gguf"
        t0 = time.monotonic()
        write_skewed_moe(
            path,
            args.arch,  # type: ignore[arg-type]
            args.layers,
            args.embd,
            args.experts,
            n_expert_used=args.used,
            n_hot=args.hot,
            n_ff=args.ff,
            wtype=args.wtype,  # type: ignore[arg-type]
        )
        print(f"generated {path.name}: {path.stat().st_size / 1e6:.0f} MB in {time.monotonic() - t0:.1f} s", flush=True)
        if not args.only_mesh:
            anyio.run(shards_table, llama, path, tmp, args)
        if not args.skip_mesh:
            mesh_bytes(path, tmp, args)


if __name__ == "__main__":
    main()

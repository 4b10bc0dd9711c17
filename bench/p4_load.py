"""P4: weight bytes over the network and load time of a layer split, with and without a pre-seeded RPC cache.

For each model: a real ggml-rpc-server (cache on) and llama-server `--rpc` with every layer offloaded to it,
with a counting TCP relay in between that parses the client→server RPC stream. Three loads per model:

- cold: empty cache (what a worker pays today: every byte crosses the network; the server fills its cache),
- seeded: a fresh rpc-server whose cache `inference.rpc_cache.seed` filled from the worker's own GGUF,
- and the seed itself (hashing + copying on the worker, no network).

Reports the bytes the relay saw (total client→server, and full SET_TENSOR payloads of large tensors, i.e.
hash misses), hash offers, and the load time until llama-server's /health answers 200.

    python bench/p4_load.py [--models PATH ...] [--json out.json]

Without --models it uses SmolLM2 (fetched by the test fixtures) plus whatever of Gemma-3-270M and
Qwen2.5-Coder-1.5B is already cached under ~/.cache/mesh-llm/test-models or ~/.models (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import mmap
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx2
from anyio.abc import SocketStream, TaskStatus

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference import fnv1a, paths
from inference.fnv1a import FNV_OFFSET, fnv1a64
from inference.llama_server import FAILED, SERVING, LlamaServer, ServerSettings
from inference.llamacpp import LlamaCpp
from inference.provision import ensure_llama_cpp
from inference.rpc_cache import HASH_THRESHOLD, hashed_tensors, read_directory, seed
from inference.rpc_server import RpcServer, RpcSettings

CMD_SET_TENSOR, CMD_SET_TENSOR_HASH = 6, 7
RPC_TENSOR_SIZE = 296  # sizeof(rpc_tensor), packed: GGML_MAX_DIMS 4, GGML_MAX_SRC 10, op_params 64 B, name 64 B
SET_TENSOR_HEADER = RPC_TENSOR_SIZE + 1 + 8  # rpc_tensor | cache_flag:u8 | offset:u64 | data


@dataclass
class Traffic:
    """What a `CountingRelay` saw, summed over connections."""

    to_server: int = 0
    to_client: int = 0
    connections: int = 0
    commands: Counter[int] = field(default_factory=Counter)  # requests per command number
    command_bytes: Counter[int] = field(default_factory=Counter)  # request payload bytes per command
    hash_offers: int = 0  # SET_TENSOR_HASH requests
    hash_misses: int = 0  # SET_TENSOR with cache_flag=1: a large tensor sent in full after a miss
    miss_bytes: int = 0  # tensor bytes of those

    def summary(self) -> dict[str, int]:
        return {
            "to_server": self.to_server,
            "to_client": self.to_client,
            "connections": self.connections,
            "hash_offers": self.hash_offers,
            "hash_misses": self.hash_misses,
            "miss_bytes": self.miss_bytes,
            "set_tensor_bytes": self.command_bytes[CMD_SET_TENSOR],
        }


class _RequestParser:
    """Follows `cmd:u8 | size:u64 | payload` frames in the client→server byte stream."""

    def __init__(self, traffic: Traffic) -> None:
        self.t = traffic
        self.head = bytearray()
        self.cmd: int | None = None
        self.size = 0
        self.remaining = 0
        self.peek = bytearray()

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.cmd is None:
                take = min(9 - len(self.head), n - i)
                self.head += data[i : i + take]
                i += take
                if len(self.head) == 9:
                    self.cmd, self.size = struct.unpack("<BQ", self.head)
                    self.head.clear()
                    self.remaining, self.peek = self.size, bytearray()
                    self.t.commands[self.cmd] += 1
                    self.t.command_bytes[self.cmd] += self.size
                    if self.cmd == CMD_SET_TENSOR_HASH:
                        self.t.hash_offers += 1
                    if self.remaining == 0:
                        self.cmd = None
                continue
            take = min(self.remaining, n - i)
            if self.cmd == CMD_SET_TENSOR and len(self.peek) <= RPC_TENSOR_SIZE:
                want = min(take, RPC_TENSOR_SIZE + 1 - len(self.peek))
                self.peek += data[i : i + want]
                if len(self.peek) == RPC_TENSOR_SIZE + 1 and self.peek[RPC_TENSOR_SIZE]:
                    self.t.hash_misses += 1
                    self.t.miss_bytes += self.size - SET_TENSOR_HEADER
            i += take
            self.remaining -= take
            if self.remaining == 0:
                self.cmd = None


class CountingRelay:
    """A loopback TCP relay to one target that counts bytes per direction and parses RPC requests."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.traffic = Traffic()
        self.port = 0

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started()
            await listener.serve(self._handle)

    async def _handle(self, client: SocketStream) -> None:
        self.traffic.connections += 1
        parser = _RequestParser(self.traffic)
        async with client, await anyio.connect_tcp(*self.target) as upstream:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, upstream, parser, tg.cancel_scope)
                tg.start_soon(self._pump, upstream, client, None, tg.cancel_scope)

    async def _pump(
        self, src: SocketStream, dst: SocketStream, parser: _RequestParser | None, scope: anyio.CancelScope
    ) -> None:
        try:
            async for chunk in src:
                if parser is not None:
                    self.traffic.to_server += len(chunk)
                    parser.feed(chunk)
                else:
                    self.traffic.to_client += len(chunk)
                await dst.send(chunk)
            await dst.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            scope.cancel()


def _byte_level_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: one printable character per byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_test_model(path: Path, *, n_layer: int = 3, n_embd: int = 512, n_ff: int = 5200, seed: int = 0) -> Path:
    """A loadable llama-architecture GGUF with random F32 weights whose FFN matrices exceed the RPC hash
    threshold (512 x 5200 x 4 B = 10.6 MB > 10 MiB) while everything else stays below it.

    264-token byte-level BPE vocabulary (256 bytes, 4 merges, 4 control tokens), untied output."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    merges = ["Ġ t", "h e", "t h", "Ġ a"]
    tokens = [*_byte_level_tokens(), *(m.replace(" ", "") for m in merges), "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"]
    types = [gguf.TokenType.NORMAL] * 260 + [gguf.TokenType.CONTROL] * 4
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("p4-test")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(8)
    w.add_head_count_kv(8)
    w.add_rope_dimension_count(n_embd // 8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(260)
    w.add_eos_token_id(261)
    w.add_pad_token_id(262)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    ones = np.ones(n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", weight(len(tokens), n_embd))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", weight(len(tokens), n_embd))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", weight(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class LoadResult:
    ok: bool
    load_s: float
    traffic: Traffic
    detail: str = ""


async def load_through_relay(
    llama: LlamaCpp,
    model: Path,
    rpc_home: Path,
    work: Path,
    *,
    gpu_layers: int = 999,
    load_timeout_s: float = 300.0,
) -> LoadResult:
    """Start rpc-server (cache in `<rpc_home>/rpc-cache`), a relay, and llama-server `--rpc` through it;
    return the load time and the relay's counts once llama-server serves. Stops everything it started."""
    rpc = RpcServer(llama, rpc_home, RpcSettings(max_start_failures=1))
    states: list[tuple[str, str]] = []
    async with anyio.create_task_group() as tg:
        await tg.start(rpc.run)
        if rpc.port is None or rpc.endpoint is None:
            raise RuntimeError(f"rpc-server did not start; see {rpc.log_path}")
        relay = CountingRelay("127.0.0.1", rpc.port)
        await tg.start(relay.serve)
        server = LlamaServer(
            llama,
            model,
            "p4",
            work / "llama-server.log",
            ServerSettings(
                ctx_per_slot=512,
                slots=1,
                gpu_layers=gpu_layers,
                extra_args=("--rpc", f"127.0.0.1:{relay.port}"),
                load_timeout_s=load_timeout_s,
                max_start_failures=1,
            ),
            on_state=lambda state, detail: states.append((state, detail)),
        )
        t0 = time.perf_counter()
        await tg.start(server.run)
        load_s = time.perf_counter() - t0
        ok = bool(states) and states[-1][0] == SERVING
        if ok and server.base_url:
            async with httpx2.AsyncClient(timeout=60) as client:
                r = await client.post(server.base_url + "/completion", json={"prompt": "Hello", "n_predict": 4})
                ok = r.status_code == 200
        detail = states[-1][1] if states and states[-1][0] == FAILED else ""
        tg.cancel_scope.cancel()
    return LoadResult(ok=ok, load_s=load_s, traffic=relay.traffic, detail=detail)


def candidate_models() -> list[Path]:
    dirs = [paths.cache_dir() / "test-models", Path.home() / ".models"]
    found: list[Path] = []
    for pattern in ("SmolLM2-135M*.gguf", "gemma-3-270m*.gguf", "Qwen2.5-Coder-1.5B*.gguf"):
        for d in dirs:
            hits = sorted(d.glob(pattern)) + sorted(d.glob(pattern.lower()))
            if hits:
                found.append(hits[0])
                break
    return found


def hash_throughput(path: Path) -> dict[str, float]:
    """MB/s of one FNV-1a chain over the whole (page-cached) file, native and pure Python (first 2 MB)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        fnv1a64(mm)  # warm the page cache
        t0 = time.perf_counter()
        fnv1a64(mm)
        native = len(mm) / 1e6 / (time.perf_counter() - t0)
        with memoryview(mm) as view:
            head = view[: 2 << 20]
            t0 = time.perf_counter()
            fnv1a._fnv_python(head, FNV_OFFSET)
            python = len(head) / 1e6 / (time.perf_counter() - t0)
            head.release()
    return {"native_mb_s": round(native, 1), "python_mb_s": round(python, 1)}


async def bench_model(llama: LlamaCpp, model: Path, work: Path) -> dict[str, object]:
    directory = read_directory(model)
    big = hashed_tensors(model)
    cold = await load_through_relay(llama, model, work / "cold", work)
    llama_files = sorted(p.name for p in (work / "cold" / "rpc-cache" / "rpc").iterdir())
    seeded_home = work / "seeded"
    t0 = time.perf_counter()
    result = await anyio.to_thread.run_sync(lambda: seed(model, seeded_home / "rpc-cache"))
    seed_s = time.perf_counter() - t0
    warm = await load_through_relay(llama, model, seeded_home, work)
    return {
        "model": model.name,
        "model_bytes": model.stat().st_size,
        "offloadable_bytes": sum(t.size for t in directory.tensors),
        "hashed_tensors": len(big),
        "hashed_bytes": sum(t.size for t in big),
        "llama_cache_files": llama_files,
        "seed_files_equal": sorted(result.written) == llama_files,
        "seed_s": round(seed_s, 3),
        **hash_throughput(model),
        "cold": {"ok": cold.ok, "load_s": round(cold.load_s, 2), **cold.traffic.summary()},
        "seeded": {"ok": warm.ok, "load_s": round(warm.load_s, 2), **warm.traffic.summary()},
    }


def _mb(n: object) -> str:
    return f"{int(n) / 1e6:.1f}" if isinstance(n, int) else "?"


def _gbit_s(n: object) -> str:
    """Seconds the bytes take on a 1 Gbit/s link."""
    return f"{int(n) * 8 / 1e9:.2f}" if isinstance(n, int) else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", type=Path)
    ap.add_argument("--no-synthetic", action="store_true", help="skip the generated big-FFN test model")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    async def run() -> list[dict[str, object]]:
        llama = await ensure_llama_cpp()
        models = args.models or candidate_models()
        rows = []
        with tempfile.TemporaryDirectory(prefix="p4-") as tmp:
            if not args.no_synthetic:
                models = [*models, write_test_model(Path(tmp) / "p4-synthetic-3x10.6MB-ffn.gguf")]
            if not models:
                sys.exit("no model found; run the tests once (they fetch SmolLM2) or pass --models")
            for i, model in enumerate(models):
                row = await bench_model(llama, model, Path(tmp) / str(i))
                rows.append(row)
                print(json.dumps(row), flush=True)
        return rows

    rows = anyio.run(run)
    print(f"\nhash threshold {HASH_THRESHOLD} bytes; every layer offloaded to one rpc-server through the relay")
    print(
        "| model | MB | offloaded MB | > 10 MiB: tensors (MB) | cold: to server MB (s at 1 Gb/s), load s "
        "| seeded: to server MB (s at 1 Gb/s), load s | seed s | FNV MB/s native / Python |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cold, warm = r["cold"], r["seeded"]
        assert isinstance(cold, dict) and isinstance(warm, dict)
        print(
            f"| {r['model']} | {_mb(r['model_bytes'])} | {_mb(r['offloadable_bytes'])} "
            f"| {r['hashed_tensors']} ({_mb(r['hashed_bytes'])}) "
            f"| {_mb(cold['to_server'])} ({_gbit_s(cold['to_server'])}), {cold['load_s']} "
            f"| {_mb(warm['to_server'])} ({_gbit_s(warm['to_server'])}), {warm['load_s']} "
            f"| {r['seed_s']} | {r['native_mb_s']} / {r['python_mb_s']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

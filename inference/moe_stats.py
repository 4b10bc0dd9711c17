"""Expert routing statistics: how often the router of each MoE layer picks each expert, measured once per model.

`llama-imatrix` runs the model over a bundled calibration text (`calibration_text()`: varied English prose, code,
numbers and tables, interleaved so that any prefix is varied; the first `chunks × ctx` tokens are used) and stores,
for every expert tensor, `blk.N.ffn_down_exps.weight.counts`: float32 `[1, n_expert]`, the selections of each
expert, summing to tokens × top-k. We read those counts (`parse_imatrix`; the gate or up tensors when there is no
down tensor) into an `ExpertStats`, keyed by the model's sha256 (`moe_shard.model_hash`), cached as
`<cache_dir>/<model key>.json` and sent to other nodes as that JSON, so one node computes it for the mesh.

Layers line up with `moe_shard`: `counts` has one entry per `blk.N` layer (`moe_layout().n_layers`), `()` for
layers without experts (DeepSeek's leading dense layers, `leading_dense_block_count`); `mass()` keeps only the
rows of MoE layers, in `moe_layout().moe_layers` order, which is what `moe_assign.assign` takes. A MoE layer that
llama-imatrix does not run (next-token-prediction layers) gets zero counts: `assign` ranks its experts by id.

The whole model is needed, not a shard: on CPU (`gpu_layers=0`, the default) llama-imatrix memory-maps the file,
so a model larger than the RAM a node offers still runs, paging weights in from disk — slowly (every token touches
the trunk and k experts per layer), which is why the result is cached and shared. The process is supervised: its
output goes to `<cache_dir>/<model key>.imatrix.log`, it is killed when the caller is cancelled, and a failure
raises `BackendError` with the log's tail. Two nodes computing the same statistics at once both write the cache
atomically (temp file + rename); the last one wins, and both results are equal in use.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import anyio
import numpy as np

from mesh_mcp.errors import BackendError, CorruptModel, ModelError, ProtocolError

from .gguf_facts import read_facts
from .llamacpp import LlamaCpp
from .moe_layout import MoeLayout, moe_layout
from .moe_shard import model_hash
from .process import terminate
from .supervise import tail

log = logging.getLogger("mesh_llm.moe_stats")

FORMAT = 1  # the JSON's version
MAX_LAYERS = 4096
MAX_EXPERTS = 4096
MAX_SOURCE = 256
_KEY = re.compile(r"^[0-9a-f]{16,128}$")
_COUNTS = re.compile(r"^blk\.(\d+)\.ffn_(down|gate|up|gate_up)_exps\.weight\.counts$")
_PREFERENCE = ("down", "gate", "up", "gate_up")  # the down projection sees every selected expert


@dataclass(frozen=True)
class ExpertStats:
    model_key: str  # sha256 of the model's bytes
    n_expert: int
    n_expert_used: int
    counts: tuple[tuple[float, ...], ...]  # [blk.N layer] -> selections per expert; () for layers without experts
    tokens: int  # tokens the counts come from
    source: str  # e.g. "llama-imatrix b11434, 8 chunks of 128 tokens"

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The `blk.N` layers with experts: `moe_layout().moe_layers` of the model."""
        return tuple(i for i, row in enumerate(self.counts) if row)

    def mass(self) -> np.ndarray:
        """`[len(moe_layers)][n_expert]` float64 routing mass, rows in `moe_layers` order: `assign`'s input."""
        rows = [row for row in self.counts if row]
        return np.array(rows, dtype=np.float64).reshape(len(rows), self.n_expert)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "model_key": self.model_key,
                "n_expert": self.n_expert,
                "n_expert_used": self.n_expert_used,
                "counts": [[_num(c) for c in row] for row in self.counts],
                "tokens": self.tokens,
                "source": self.source,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ExpertStats:
        """Parse and validate; `ProtocolError` on anything else (it arrives from other nodes and from disk)."""
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"expert statistics are not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise ProtocolError("expert statistics must be a JSON object")
        fields = {"format", "model_key", "n_expert", "n_expert_used", "counts", "tokens", "source"}
        if set(obj) != fields:
            raise ProtocolError(f"expert statistics need exactly the fields {sorted(fields)}, got {sorted(obj)}")
        if obj["format"] != FORMAT:
            raise ProtocolError(f"expert statistics of format {obj['format']!r}; this version reads {FORMAT}")
        key, n, k, tokens, source = (obj[f] for f in ("model_key", "n_expert", "n_expert_used", "tokens", "source"))
        if not isinstance(key, str) or not _KEY.match(key):
            raise ProtocolError("expert statistics: model_key must be a lowercase hex sha256")
        if not _int(n) or not 1 < n <= MAX_EXPERTS:
            raise ProtocolError(f"expert statistics: n_expert must be in 2..{MAX_EXPERTS}")
        if not _int(k) or not 1 <= k <= n:
            raise ProtocolError(f"expert statistics: n_expert_used must be in 1..n_expert ({n})")
        if not _int(tokens) or tokens < 0:
            raise ProtocolError("expert statistics: tokens must be a non-negative integer")
        if not isinstance(source, str) or len(source) > MAX_SOURCE:
            raise ProtocolError(f"expert statistics: source must be a string of at most {MAX_SOURCE} characters")
        counts = obj["counts"]
        if not isinstance(counts, list) or not 0 < len(counts) <= MAX_LAYERS:
            raise ProtocolError(f"expert statistics: counts must list 1..{MAX_LAYERS} layers")
        rows: list[tuple[float, ...]] = []
        for i, row in enumerate(counts):
            if not isinstance(row, list) or len(row) not in (0, n):
                raise ProtocolError(f"expert statistics: layer {i} must have 0 or {n} counts")
            if not all(_real(c) and c >= 0 for c in row):
                raise ProtocolError(f"expert statistics: layer {i} has a count that is not a finite number ≥ 0")
            rows.append(tuple(float(c) for c in row))
        if not any(rows):
            raise ProtocolError("expert statistics: no layer has experts")
        return cls(key, n, k, tuple(rows), tokens, source)

    def matches(self, layout: MoeLayout) -> bool:
        """Whether these statistics were measured on a model with `layout`'s layers and experts."""
        return (
            self.n_expert == layout.n_expert
            and len(self.counts) == layout.n_layers
            and self.moe_layers == layout.moe_layers
        )


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _num(c: float) -> int | float:
    return int(c) if float(c).is_integer() else float(c)


# --- calibration text and the imatrix file ----------------------------------------------------------------------


def calibration_text() -> str:
    """The bundled calibration text (about 20 KB)."""
    return (resources.files(__package__) / "data" / "calibration.txt").read_text(encoding="utf-8")


def parse_imatrix(path: Path, n_layers: int, n_expert: int) -> list[list[float]]:
    """Per `blk.N` layer (0..n_layers-1) the selection count of each expert from a llama-imatrix GGUF; `[]` for
    layers without expert counts. `CorruptModel` when the file is not an imatrix or its counts do not fit."""
    import gguf  # numpy and 250 ms of import: only here

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise CorruptModel(f"{path} is not a readable imatrix GGUF: {exc}") from exc
    found: dict[int, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        m = _COUNTS.match(t.name)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(t.data, dtype=np.float64).ravel()
    out: list[list[float]] = []
    for layer in range(n_layers):
        per = found.pop(layer, {})
        row = next((per[p] for p in _PREFERENCE if p in per), None)
        if row is None:
            out.append([])
            continue
        if row.size != n_expert or not np.all(np.isfinite(row)) or np.any(row < 0):
            raise CorruptModel(f"{path}: layer {layer} has {row.size} expert counts, the model {n_expert} experts")
        out.append([float(c) for c in row])
    if found:
        raise CorruptModel(f"{path}: expert counts for layer {min(found)}, the model has {n_layers} layers")
    return out


def _imatrix_tokens(path: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(path)

    def field(key: str) -> int:
        f = reader.fields.get(key)
        v = None if f is None else f.contents()
        return int(v) if isinstance(v, int) else 0

    return field("imatrix.chunk_count") * field("imatrix.chunk_size")


# --- computing and caching --------------------------------------------------------------------------------------


def stats_path(cache_dir: Path, model_key: str) -> Path:
    return cache_dir / f"{model_key}.json"


def load_cached(cache_dir: Path, model_key: str, layout: MoeLayout) -> ExpertStats | None:
    """The cached statistics of the model, or None when missing, unreadable or made for another layout."""
    path = stats_path(cache_dir, model_key)
    try:
        stats = ExpertStats.from_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ProtocolError) as exc:
        log.warning("ignoring the cached expert statistics %s (%s); measuring again", path, exc)
        return None
    if stats.model_key != model_key or not stats.matches(layout):
        log.warning("ignoring the cached expert statistics %s: made for another model; measuring again", path)
        return None
    return stats


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


async def ensure_stats(
    llama: LlamaCpp,
    model: Path,
    *,
    cache_dir: Path,
    model_key: str | None = None,
    threads: int | None = None,
    chunks: int = 8,
    ctx: int = 128,
    gpu_layers: int = 0,
) -> ExpertStats:
    """The routing statistics of `model` (the whole model: the first GGUF of a split set), from the cache or
    measured with llama-imatrix (see the module docstring). `model_key`: the model's sha256 when known."""
    facts = await anyio.to_thread.run_sync(read_facts, model)
    layout = moe_layout(facts)  # ShardError for dense models
    key = (
        model_key if model_key is not None else await anyio.to_thread.run_sync(model_hash, facts, cache_dir / "hashes")
    )
    if not _KEY.match(key):
        raise ValueError(f"model_key must be the model's sha256 in lowercase hex, not {key[:80]!r}")
    cached = await anyio.to_thread.run_sync(load_cached, cache_dir, key, layout)
    if cached is not None:
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"{key}.imatrix.{os.getpid()}.gguf"
    text = cache_dir / f"{key}.calibration.{os.getpid()}.txt"
    start = time.monotonic()
    try:
        text.write_text(calibration_text(), encoding="utf-8")
        await _run_imatrix(llama, model, text, out, cache_dir / f"{key}.imatrix.log", threads, chunks, ctx, gpu_layers)
        counts = await anyio.to_thread.run_sync(parse_imatrix, out, layout.n_layers, layout.n_expert)
        tokens = await anyio.to_thread.run_sync(_imatrix_tokens, out)
    finally:
        out.unlink(missing_ok=True)
        text.unlink(missing_ok=True)
    moe = set(layout.moe_layers)
    rows = tuple(
        (tuple(row) if row else (0.0,) * layout.n_expert) if layer in moe else () for layer, row in enumerate(counts)
    )
    missing = [layer for layer in layout.moe_layers if not counts[layer]]
    if len(missing) == len(layout.moe_layers):
        raise ModelError(f"llama-imatrix recorded no expert counts for {model.name}: its experts cannot be ranked")
    used_key = f"{layout.architecture}.expert_used_count"
    version = llama.version.split()[0] if llama.version else "?"
    chunks_run = tokens // ctx if ctx else 0
    stats = ExpertStats(
        model_key=key,
        n_expert=layout.n_expert,
        n_expert_used=max(
            1, min(_experts_used(facts.expert_used_count, facts.metadata.get(used_key)), layout.n_expert)
        ),
        counts=rows,
        tokens=tokens,
        source=f"llama-imatrix {version}, {chunks_run} chunks of {ctx} tokens"[:MAX_SOURCE],
    )
    log.info(
        "expert statistics of %s: %s in %.1f s%s",
        model.name,
        stats.source,
        time.monotonic() - start,
        f"; no counts for MoE layer(s) {missing}" if missing else "",
    )
    await anyio.to_thread.run_sync(write_atomic, stats_path(cache_dir, key), stats.to_json())
    return stats


def _experts_used(count: int, raw: object) -> int:
    """top-k: `expert_used_count`, or the largest of its per-layer values."""
    if count:
        return count
    if isinstance(raw, list | tuple):
        return max((int(v) for v in raw if isinstance(v, int) and not isinstance(v, bool)), default=1)
    return 1


def imatrix_args(
    binary: Path, model: Path, text: Path, out: Path, threads: int | None, chunks: int, ctx: int, gpu_layers: int
) -> list[str]:
    """The llama-imatrix command line (pure)."""
    args = [
        str(binary),
        "--model", str(model),
        "--file", str(text),
        "--output", str(out),
        "--ctx-size", str(ctx),
        "--batch-size", str(ctx),
        "--chunks", str(chunks),
        "--n-gpu-layers", str(gpu_layers),
        "--no-ppl",
        "--output-frequency", str(1 << 30),  # one file, at the end
    ]  # fmt: skip
    if threads:
        args += ["--threads", str(threads)]
    return args


async def _run_imatrix(
    llama: LlamaCpp,
    model: Path,
    text: Path,
    out: Path,
    log_path: Path,
    threads: int | None,
    chunks: int,
    ctx: int,
    gpu_layers: int,
) -> None:
    binary = llama.bin_dir / "llama-imatrix"
    cmd = imatrix_args(binary, model, text, out, threads, chunks, ctx, gpu_layers)
    with open(log_path, "ab") as logf:
        logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n".encode())
        logf.flush()
        try:
            # The pdeathsig shim makes llama-imatrix die with us even if we are SIGKILLed.
            proc = await anyio.open_process(
                [sys.executable, "-m", "inference.pdeathsig", "--", *cmd],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise BackendError(f"could not start {binary}: {exc}") from exc
    log.info("llama-imatrix pid %d measuring expert routing of %s (log %s)", proc.pid, model.name, log_path)
    try:
        code = await proc.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await terminate(proc)
    if code != 0 or not out.is_file():
        raise BackendError(f"llama-imatrix failed on {model.name} (exit {code}); log {log_path}:\n{tail(log_path, 12)}")

"""Expert routing statistics: the JSON that travels between nodes (round trip, garbage refused), the imatrix file's
per-expert counts lined up with `moe_shard`'s layers (leading dense layers included), the cache, a supervised
llama-imatrix (a fake one: failure, cancellation) — and (slow) the real llama-imatrix on a generated model whose
routing is skewed onto known experts."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import anyio
import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.gguf_facts import read_facts
from inference.llamacpp import LlamaCpp
from inference.moe_assign import assign
from inference.moe_layout import moe_layout
from inference.moe_shard import ensure_shard, model_hash
from inference.moe_stats import (
    ExpertStats,
    calibration_text,
    ensure_stats,
    imatrix_args,
    parse_imatrix,
    stats_path,
)
from mesh_mcp.errors import BackendError, CorruptModel, ProtocolError
from tests.test_moe_shard import tiny

KEY = "ab" * 32


def stats(**kw: object) -> ExpertStats:
    args: dict[str, object] = {
        "model_key": KEY,
        "n_expert": 4,
        "n_expert_used": 2,
        "counts": ((), (5.0, 0.0, 3.0, 2.0), (1.0, 1.0, 1.0, 7.5)),
        "tokens": 5,
        "source": "llama-imatrix b1, 1 chunks of 5 tokens",
    } | kw
    return ExpertStats(**args)  # type: ignore[arg-type]


# --- the JSON --------------------------------------------------------------------------------------------------


def test_mass_keeps_the_moe_layers_in_order() -> None:
    s = stats()
    assert s.moe_layers == (1, 2)
    assert s.mass().tolist() == [[5, 0, 3, 2], [1, 1, 1, 7.5]]
    assert s.mass().dtype == np.float64


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 12),
    layers=st.lists(st.booleans(), min_size=1, max_size=6).filter(any),
    data=st.data(),
)
def test_json_round_trips(n: int, layers: list[bool], data: st.DataObject) -> None:
    count = st.one_of(st.integers(0, 10**6).map(float), st.floats(0, 1e6, allow_nan=False, allow_infinity=False))
    counts = tuple(tuple(data.draw(st.lists(count, min_size=n, max_size=n))) if moe else () for moe in layers)
    s = stats(n_expert=n, n_expert_used=data.draw(st.integers(1, n)), counts=counts, tokens=data.draw(st.integers(0)))
    assert ExpertStats.from_json(s.to_json()) == s


def _mangle(**changes: object) -> bytes:
    obj = json.loads(stats().to_json()) | changes
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"format": 1}',
        _mangle(format=2),
        _mangle(extra=1),
        _mangle(model_key="../../etc/passwd"),
        _mangle(n_expert=1),
        _mangle(n_expert=True),
        _mangle(n_expert_used=5),
        _mangle(n_expert_used=0),
        _mangle(tokens=-1),
        _mangle(tokens=1.5),
        _mangle(source="x" * 1000),
        _mangle(counts=[]),
        _mangle(counts=[[], []]),
        _mangle(counts=[[1, 2, 3]]),
        _mangle(counts=[[1, 2, 3, -4]]),
        _mangle(counts=[[1, 2, 3, "4"]]),
        _mangle(counts=[[1, 2, 3, True]]),
        _mangle(counts=[[1, 2, 3, 1e400]]),
        _mangle(counts={"0": [1, 2, 3, 4]}),
    ],
)
def test_garbage_is_refused_with_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="expert statistics"):
        ExpertStats.from_json(data)


def test_the_calibration_text_is_bundled_and_varied() -> None:
    text = calibration_text()
    assert 20_000 <= len(text.encode()) <= 40_000
    head = text[:1500]  # llama-imatrix reads from the start: the first chunks already mix prose, code and numbers
    assert "def " in head and "return" in head and any(c.isdigit() for c in head) and ". " in head


def test_imatrix_command_line() -> None:
    args = imatrix_args(Path("/b/llama-imatrix"), Path("m.gguf"), Path("t.txt"), Path("o.gguf"), 3, 8, 128, 0)
    assert args[0] == "/b/llama-imatrix"
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    assert pairs["--model"] == "m.gguf" and pairs["--file"] == "t.txt" and pairs["--output"] == "o.gguf"
    assert pairs["--ctx-size"] == "128" and pairs["--chunks"] == "8" and pairs["--n-gpu-layers"] == "0"
    assert args[-2:] == ["--threads", "3"] and "--no-ppl" in args
    assert "--threads" not in imatrix_args(Path("b"), Path("m"), Path("t"), Path("o"), None, 8, 128, 0)


# --- the imatrix file ------------------------------------------------------------------------------------------


def write_imatrix(path: Path, counts: dict[str, list[float]], chunks: int = 2, chunk_size: int = 64) -> Path:
    """An imatrix GGUF as llama-imatrix writes it: `<tensor>.counts` float32 [1, n_expert] per expert tensor."""
    w = gguf.GGUFWriter(str(path), "imatrix")
    w.add_uint32("imatrix.chunk_count", chunks)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name, row in counts.items():
        w.add_tensor(f"{name}.counts", np.array([row], dtype=np.float32))
        w.add_tensor(f"{name}.in_sum2", np.ones((len(row), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_parse_imatrix_prefers_down_then_gate_and_leaves_dense_layers_empty(tmp_path: Path) -> None:
    f = write_imatrix(
        tmp_path / "i.gguf",
        {
            "blk.0.ffn_down.weight": [7.0],  # a dense layer: not an expert tensor
            "blk.1.ffn_gate_exps.weight": [1, 2, 3, 4],
            "blk.1.ffn_down_exps.weight": [4, 3, 2, 1],
            "blk.2.ffn_gate_exps.weight": [0, 0, 5, 5],
        },
    )
    assert parse_imatrix(f, 3, 4) == [[], [4, 3, 2, 1], [0, 0, 5, 5]]


@pytest.mark.parametrize(
    ("counts", "n_layers", "message"),
    [
        ({"blk.0.ffn_down_exps.weight": [1, 2, 3]}, 1, "3 expert counts"),
        ({"blk.5.ffn_down_exps.weight": [1, 2, 3, 4]}, 2, "layer 5"),
    ],
)
def test_parse_imatrix_refuses_counts_that_do_not_fit_the_model(
    tmp_path: Path, counts: dict[str, list[float]], n_layers: int, message: str
) -> None:
    with pytest.raises(CorruptModel, match=message):
        parse_imatrix(write_imatrix(tmp_path / "i.gguf", counts), n_layers, 4)


def test_parse_imatrix_refuses_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(CorruptModel, match="not a readable imatrix"):
        parse_imatrix(tmp_path / "x.gguf", 2, 4)


# --- ensure_stats with a fake llama-imatrix --------------------------------------------------------------------


def write_leading_dense(path: Path, n_expert: int = 4) -> Path:
    """A 3-layer deepseek2-style MoE whose layer 0 is dense (`leading_dense_block_count` 1): not for llama.cpp."""
    rng = np.random.default_rng(2)
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_block_count(3)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(2)
    w.add_uint32("deepseek2.leading_dense_block_count", 1)
    w.add_tensor("token_embd.weight", rng.random((4, 16), dtype=np.float32))
    for p in ("gate", "up", "down"):
        w.add_tensor(f"blk.0.ffn_{p}.weight", rng.random((16, 16), dtype=np.float32))
    for i in (1, 2):
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", rng.random((n_expert, 16), dtype=np.float32))
        for p in ("gate", "up", "down"):
            w.add_tensor(f"blk.{i}.ffn_{p}_exps.weight", rng.random((n_expert, 8, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


FAKE_IMATRIX = """#!{python}
import os, shutil, sys, time
args = sys.argv[1:]
out = args[args.index("--output") + 1]
with open({calls!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
mode = open({mode!r}).read().strip()
print("fake llama-imatrix", mode, flush=True)
if mode == "fail":
    print("error: the fake imatrix was told to fail", flush=True)
    sys.exit(3)
if mode == "hang":
    with open({pid!r}, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
shutil.copy({result!r}, out)
"""


class Fake:
    """A llama.cpp whose llama-imatrix copies a prepared imatrix file (or fails, or hangs) and logs each call."""

    def __init__(self, root: Path) -> None:
        self.root = root
        bin_dir = root / "bin"
        bin_dir.mkdir(parents=True)
        self.calls, self.mode, self.pid, self.result = (root / n for n in ("calls", "mode", "pid", "result.gguf"))
        self.set("ok")
        script = bin_dir / "llama-imatrix"
        script.write_text(
            FAKE_IMATRIX.format(
                python=sys.executable,
                calls=str(self.calls),
                mode=str(self.mode),
                pid=str(self.pid),
                result=str(self.result),
            )
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        self.llama = LlamaCpp(bin_dir=bin_dir, version="b1 (fake)", backend="cpu")

    def set(self, mode: str) -> None:
        self.mode.write_text(mode)

    def n_calls(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0


def test_stats_line_up_with_the_shards_layers_past_leading_dense_layers(tmp_path: Path) -> None:
    model = write_leading_dense(tmp_path / "ds.gguf")
    fake = Fake(tmp_path / "fake")
    write_imatrix(
        fake.result,
        {
            "blk.0.ffn_down.weight": [9.0],
            "blk.1.ffn_down_exps.weight": [0, 6, 2, 0],
            "blk.2.ffn_down_exps.weight": [3, 0, 0, 5],
        },
    )
    s = anyio.run(lambda: ensure_stats(fake.llama, model, cache_dir=tmp_path / "cache", threads=1))
    layout = moe_layout(read_facts(model))
    assert layout.moe_layers == s.moe_layers == (1, 2) and len(s.counts) == layout.n_layers == 3
    assert s.counts[0] == () and s.mass().tolist() == [[0, 6, 2, 0], [3, 0, 0, 5]]
    assert s.tokens == 128 and s.source == "llama-imatrix b1, 1 chunks of 128 tokens"
    assert s.model_key == model_hash(read_facts(model)) and s.n_expert == 4 and s.n_expert_used == 2
    # what the serving side does: assign over the MoE rows, then put the rows back at their blk.N layers
    a = assign(4, 2, s.mass(), 2, capacity=3)
    experts = [[] for _ in range(layout.n_layers)]
    for row, layer in enumerate(s.moe_layers):
        experts[layer] = list(a.shards[0][row])
    shard = ensure_shard(model, experts, cache_dir=tmp_path / "shards", model_key=s.model_key)
    assert shard.experts[0] == () and {1, 2} <= set(shard.experts[1]) and {0, 3} <= set(shard.experts[2])


def test_stats_are_cached_and_a_corrupt_cache_is_measured_again(tmp_path: Path) -> None:
    model = tiny(tmp_path / "q.gguf").path
    fake = Fake(tmp_path / "fake")
    write_imatrix(fake.result, {f"blk.{i}.ffn_down_exps.weight": [float(i + e) for e in range(16)] for i in range(3)})
    cache = tmp_path / "cache"

    def run() -> ExpertStats:
        return anyio.run(lambda: ensure_stats(fake.llama, model, cache_dir=cache, model_key=KEY, chunks=4, ctx=64))

    first = run()
    assert fake.n_calls() == 1 and stats_path(cache, KEY).is_file()
    assert "--chunks 4" in fake.calls.read_text() and "--ctx-size 64" in fake.calls.read_text()
    assert run() == first and fake.n_calls() == 1  # cached: llama-imatrix does not run again
    stats_path(cache, KEY).write_bytes(b'{"format": 1, "counts": [[')
    assert run() == first and fake.n_calls() == 2
    assert ExpertStats.from_json(stats_path(cache, KEY).read_bytes()) == first  # rewritten
    # statistics of another layout under this key (another model) are not used either
    stats_path(cache, KEY).write_bytes(stats(counts=((1.0, 2.0, 3.0, 4.0),)).to_json())
    assert run() == first and fake.n_calls() == 3
    assert {p.name for p in cache.iterdir()} == {f"{KEY}.json", f"{KEY}.imatrix.log"}  # no temporary files left


def test_a_failing_llama_imatrix_raises_with_its_log(tmp_path: Path) -> None:
    fake = Fake(tmp_path / "fake")
    fake.set("fail")
    model = tiny(tmp_path / "q.gguf").path
    with pytest.raises(BackendError, match=r"(?s)llama-imatrix failed on q.gguf \(exit 3\).*told to fail"):
        anyio.run(lambda: ensure_stats(fake.llama, model, cache_dir=tmp_path / "c", model_key=KEY))
    assert not stats_path(tmp_path / "c", KEY).exists()


def test_cancelling_kills_llama_imatrix(tmp_path: Path) -> None:
    fake = Fake(tmp_path / "fake")
    fake.set("hang")
    model = tiny(tmp_path / "q.gguf").path

    async def main() -> None:
        with anyio.move_on_after(20) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: ensure_stats(fake.llama, model, cache_dir=tmp_path / "c", model_key=KEY))
                while not fake.pid.exists() or not fake.pid.read_text():
                    await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught, "llama-imatrix never started"

    anyio.run(main)
    pid = int(fake.pid.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not [p for p in (tmp_path / "c").iterdir() if p.suffix in (".gguf", ".txt")]


# --- the real llama-imatrix ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_llama_imatrix_over_the_calibration_text_finds_the_hot_experts_once(llama: LlamaCpp, tmp_path: Path) -> None:
    """On the skewed qwen3moe model every selection lands on the hot experts, every hot expert is chosen (the
    calibration text is varied enough), and the second call is served from the cache."""
    m = tiny(tmp_path / "q.gguf")
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    s = anyio.run(lambda: ensure_stats(llama, m.path, cache_dir=cache, threads=1))
    elapsed = time.monotonic() - t0
    assert s.source.startswith("llama-imatrix b") and s.tokens == 8 * 128 and s.n_expert_used == 2
    mass = s.mass()
    assert mass.shape == (3, 16) and s.moe_layers == (0, 1, 2)
    for layer, row in enumerate(mass):
        hot = list(m.hot[layer])
        assert row.sum() == s.tokens * 2  # every token picks 2 experts
        assert row[hot].sum() == row.sum() and row[hot].all(), f"layer {layer}: {row.tolist()}"
    log = next(cache.glob("*.imatrix.log"))
    assert log.read_text().count("==== ") == 1
    again = anyio.run(lambda: ensure_stats(llama, m.path, cache_dir=cache, threads=1))
    assert again == s and log.read_text().count("==== ") == 1  # from the cache: llama-imatrix did not run
    assert elapsed < 30

"""Expert shards: the writer against gguf-py's reader (byte-identical trunk, experts cut on the expert axis, header
keys, split sources, biases, groups), clear errors, bounded memory, the cache — and (slow) the real llama-server:
a shard with every expert answers like the full model, a renormalising (qwen3moe) shard holding each token's top-k
does too, an olmoe shard holding them does not (softmax without renormalisation inflates the kept weights), and
shards cut from routing counts measured by llama-imatrix and dealt by `moe_assign` match the full model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest

from inference.gguf_facts import read_facts
from inference.llamacpp import LlamaCpp
from inference.moe_assign import assign
from inference.moe_layout import ShardError, moe_layout, normalize_experts
from inference.moe_shard import SHARD_KEY, ensure_shard, model_hash, verify_shard, write_shard
from mesh_mcp.errors import CorruptModel
from tests.ggufgen import SkewedMoe, write_dense, write_moe, write_skewed_moe
from tests.harness import free_port

EXPERT_TENSOR = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_inp.")


def tiny(path: Path, arch: str = "qwen3moe", **kw: object) -> SkewedMoe:
    args: dict[str, object] = {"n_ff": 64} | kw
    return write_skewed_moe(path, arch, 3, 64, 16, **args)  # type: ignore[arg-type]


def fields(path: Path) -> dict[str, object]:
    """Every key's value; the raw bytes where gguf-py cannot decode a string (not UTF-8)."""
    out: dict[str, object] = {}
    for k, f in gguf.GGUFReader(path).fields.items():
        if not k.startswith("GGUF."):
            try:
                out[k] = f.contents()
            except UnicodeDecodeError:
                out[k] = [bytes(f.parts[i]) for i in f.data]
    return out


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def layer_of(name: str) -> int:
    return int(name.split(".")[1])


# --- the writer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wtype", ["f32", "f16", "q8_0"])
def test_a_shard_with_every_expert_copies_every_tensor_byte_for_byte(tmp_path: Path, wtype: str) -> None:
    m = tiny(tmp_path / "m.gguf", wtype=wtype)
    shard = write_shard(m.path, [range(16)] * 3, tmp_path / "all.gguf")
    src, out = tensors(m.path), tensors(shard.path)
    assert list(src) == list(out)
    for name, t in src.items():
        assert out[name].tensor_type == t.tensor_type and list(out[name].shape) == list(t.shape)
        assert out[name].data.tobytes() == t.data.tobytes(), name
    assert {k: v for k, v in fields(shard.path).items() if k != SHARD_KEY} == fields(m.path)


@pytest.mark.parametrize("wtype", ["f16", "q8_0"])
def test_kept_experts_are_cut_on_the_expert_axis_and_the_rest_is_unchanged(tmp_path: Path, wtype: str) -> None:
    m = tiny(tmp_path / "m.gguf", wtype=wtype)
    keep = [(1, 2, 3, 9), (0, 15, 7, 8), (4, 5, 6, 10)]  # unsorted on purpose: kept in the original order
    shard = write_shard(m.path, keep, tmp_path / "s.gguf")
    assert shard.experts == tuple(tuple(sorted(k)) for k in keep) and shard.expert_count == 4
    src, out = tensors(m.path), tensors(shard.path)
    for name, t in src.items():
        if any(p in name for p in EXPERT_TENSOR):
            ids = list(shard.experts[layer_of(name)])
            assert int(out[name].shape[-1]) == 4 and list(out[name].shape[:-1]) == list(t.shape[:-1])
            assert out[name].data.tobytes() == t.data[ids].tobytes(), name  # q8_0: a byte slice on numpy axis 0
        else:
            assert out[name].data.tobytes() == t.data.tobytes(), name
    meta = fields(shard.path)
    assert meta["qwen3moe.expert_count"] == 4 and meta["qwen3moe.expert_used_count"] == 2
    assert json.loads(str(meta[SHARD_KEY])) == {
        "format": 1,
        "source": "",
        "n_expert": 16,
        "experts": {str(i): list(e) for i, e in enumerate(shard.experts)},
    }
    assert verify_shard(shard.path, shard.experts).expert_count == 4


def test_expert_used_count_is_clamped_to_the_kept_experts(tmp_path: Path) -> None:
    m = tiny(tmp_path / "m.gguf", n_expert_used=4, n_hot=4)
    shard = write_shard(m.path, [(0, 1, 2)] * 3, tmp_path / "s.gguf")
    assert fields(shard.path)["qwen3moe.expert_used_count"] == 3


def test_a_split_source_gives_the_same_file_as_the_unsplit_model(tmp_path: Path) -> None:
    one = tiny(tmp_path / "one.gguf")
    split = tiny(tmp_path / "split.gguf", split_max_tensors=10)
    parts = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(parts) == 4 and split.path == parts[0]
    a = write_shard(one.path, one.hot, tmp_path / "a.gguf")
    b = write_shard(parts[2], split.hot, tmp_path / "b.gguf")  # any part names the set
    assert a.path.read_bytes() == b.path.read_bytes()
    assert not any(k.startswith("split.") for k in fields(b.path))


def write_synthetic(
    path: Path,
    *,
    arch: str = "gpt-oss",
    n_expert: int = 8,
    used: int | list[int] = 2,
    groups: tuple[int, int] | None = None,
    count_key: int | None = None,
    alignment: int = 32,
    extra: str = "",
) -> Path:
    """A 2-layer MoE with per-expert biases, a router bias, exp_probs_b and a shared expert (not for llama.cpp)."""
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_custom_alignment(alignment)
    w.add_block_count(2)
    w.add_expert_count(n_expert if count_key is None else count_key)
    if isinstance(used, list):
        w.add_array(f"{arch}.expert_used_count", used)
    else:
        w.add_expert_used_count(used)
    if groups:
        w.add_uint32(f"{arch}.expert_group_count", groups[0])
        w.add_uint32(f"{arch}.expert_group_used_count", groups[1])
    w.add_token_list([b"a", b"b\xff"])  # not valid UTF-8: must be copied as raw bytes
    w.add_tensor("token_embd.weight", rng.random((4, 32), dtype=np.float32))
    for i in range(2):
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", rng.random((n_expert, 32), dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate_inp.bias", rng.random(n_expert, dtype=np.float32))
        w.add_tensor(f"blk.{i}.exp_probs_b.bias", rng.random(n_expert, dtype=np.float32))
        for p in ("gate", "up", "down"):
            w.add_tensor(f"blk.{i}.ffn_{p}_exps.weight", rng.random((n_expert, 16, 32), dtype=np.float32))
            w.add_tensor(f"blk.{i}.ffn_{p}_exps.bias", rng.random((n_expert, 16), dtype=np.float32))
            w.add_tensor(f"blk.{i}.ffn_{p}_shexp.weight", rng.random((16, 32), dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate_inp_shexp.weight", rng.random(32, dtype=np.float32))
    if extra:
        w.add_tensor(extra, rng.random((n_expert, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_biases_router_bias_and_probs_bias_are_cut_shared_experts_are_not(tmp_path: Path) -> None:
    src = write_synthetic(tmp_path / "m.gguf", alignment=64)
    shard = write_shard(src, [(1, 6), (0, 7)], tmp_path / "s.gguf")
    a, b = tensors(src), tensors(shard.path)
    for name, t in a.items():
        if "shexp" in name or name == "token_embd.weight":
            assert b[name].data.tobytes() == t.data.tobytes() and list(b[name].shape) == list(t.shape)
        else:
            ids = list(shard.experts[layer_of(name)])
            assert b[name].data.tobytes() == t.data[ids].tobytes() and int(b[name].shape[-1]) == 2, name
    assert gguf.GGUFReader(shard.path).alignment == 64
    raw = gguf.GGUFReader(shard.path).fields["tokenizer.ggml.tokens"]
    assert bytes(raw.parts[raw.data[1]]) == b"b\xff"


def test_expert_groups_are_kept_whole_and_their_counts_follow(tmp_path: Path) -> None:
    src = write_synthetic(tmp_path / "m.gguf", arch="deepseek2", groups=(4, 3))  # 4 groups of 2
    shard = write_shard(src, [(2, 3, 6, 7), (0, 1, 2, 3)], tmp_path / "s.gguf")
    meta = fields(shard.path)
    assert (meta["deepseek2.expert_count"], meta["deepseek2.expert_group_count"]) == (4, 2)
    assert meta["deepseek2.expert_group_used_count"] == 2  # clamped from 3
    with pytest.raises(ShardError, match=r"layer 0 splits expert groups \(4 groups of 2\)"):
        write_shard(src, [(1, 2, 3, 4), (0, 1, 2, 3)], tmp_path / "bad.gguf")


def test_per_layer_expert_used_counts_are_clamped(tmp_path: Path) -> None:
    src = write_synthetic(tmp_path / "m.gguf", used=[3, 1])
    shard = write_shard(src, [(0, 1), (2, 3)], tmp_path / "s.gguf")
    assert fields(shard.path)["gpt-oss.expert_used_count"] == [2, 1]
    assert verify_shard(shard.path).expert_used == (2, 1)


# --- errors ----------------------------------------------------------------------------------------------------


def test_a_dense_model_cannot_be_cut_by_experts(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"not a mixture-of-experts model .* use a pipeline split"):
        write_shard(write_dense(tmp_path / "d.gguf", 2, 64), [(0,), (0,)], tmp_path / "s.gguf")


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b"GGML" + b[4:], "not a GGUF model file"),
        (lambda b: b[:200], "truncated"),
        (lambda b: b[: len(b) - 1000], "truncated: tensor 'output.weight' ends at byte"),
    ],
)
def test_corrupt_sources_give_clear_errors(tmp_path: Path, mangle: Callable[[bytes], bytes], message: str) -> None:
    m = tiny(tmp_path / "m.gguf")
    m.path.write_bytes(mangle(m.path.read_bytes()))
    with pytest.raises(CorruptModel, match=message):
        write_shard(m.path, m.hot, tmp_path / "s.gguf")
    assert not list(tmp_path.glob("s.gguf*"))


def test_a_missing_split_part_is_named(tmp_path: Path) -> None:
    m = tiny(tmp_path / "m.gguf", split_max_tensors=10)
    (tmp_path / "m-00003-of-00004.gguf").unlink()
    with pytest.raises(CorruptModel, match=r"m-00003-of-00004\.gguf is missing"):
        write_shard(m.path, m.hot, tmp_path / "s.gguf")


def test_expert_tensors_that_disagree_with_expert_count_are_corrupt(tmp_path: Path) -> None:
    src = write_synthetic(tmp_path / "m.gguf", count_key=6)
    with pytest.raises(CorruptModel, match=r"has shape \[32, 8\] but expert_count is 6"):
        moe_layout(read_facts(src))


@pytest.mark.parametrize(
    ("experts", "message"),
    [
        ([(0, 1)] * 2, "covers 2 layers, m.gguf has 3: it was made for another model"),
        ([(0, 1)] * 4, "covers 4 layers"),
        ([(0, 1), (0, 16), (0, 1)], r"layer 1 .* must name distinct experts in 0..15"),
        ([(0, 1), (3, 3), (0, 1)], "must name distinct experts"),
        ([(0, 1), (), (0, 1)], "must name distinct experts"),
        ([(0, 1), (0, 1, 2), (0, 1)], "layer 1 keeps 3 experts, earlier layers 2: llama.cpp needs the same"),
    ],
)
def test_an_assignment_that_does_not_match_the_file_is_refused(
    tmp_path: Path, experts: Sequence[Sequence[int]], message: str
) -> None:
    m = tiny(tmp_path / "m.gguf")
    with pytest.raises(ShardError, match=message):
        write_shard(m.path, experts, tmp_path / "s.gguf")


def test_without_copy_file_range_the_bytes_are_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = tiny(tmp_path / "m.gguf", wtype="q8_0")
    kernel = write_shard(m.path, m.hot, tmp_path / "a.gguf").path.read_bytes()

    def unsupported(*args: object) -> int:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    assert write_shard(m.path, m.hot, tmp_path / "b.gguf").path.read_bytes() == kernel
    monkeypatch.delattr(os, "copy_file_range")
    assert write_shard(m.path, m.hot, tmp_path / "c.gguf").path.read_bytes() == kernel


def test_an_expert_tensor_the_writer_does_not_know_is_refused(tmp_path: Path) -> None:
    src = write_synthetic(tmp_path / "m.gguf", extra="blk.1.ffn_new_exps.weight")
    with pytest.raises(ShardError, match=r"blk\.1\.ffn_new_exps\.weight looks like an expert tensor"):
        write_shard(src, [(0, 1), (0, 1)], tmp_path / "s.gguf")


def test_a_failed_write_leaves_no_file(tmp_path: Path) -> None:
    m = tiny(tmp_path / "m.gguf")

    def boom(done: int, total: int) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_shard(m.path, m.hot, tmp_path / "s.gguf", on_progress=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_verify_catches_a_shard_that_is_not_what_was_asked(tmp_path: Path) -> None:
    m = tiny(tmp_path / "m.gguf")
    shard = write_shard(m.path, m.hot, tmp_path / "s.gguf")
    with pytest.raises(CorruptModel, match="holds other experts than asked for"):
        verify_shard(shard.path, tuple(tuple(range(4)) for _ in range(3)))
    bad = write_synthetic(tmp_path / "bad.gguf", count_key=6)
    with pytest.raises(CorruptModel, match="holds 8 experts, expert_count is 6"):
        verify_shard(bad)
    shard.path.write_bytes(shard.path.read_bytes()[:-5000])
    with pytest.raises(CorruptModel, match="does not read back as GGUF"):
        verify_shard(shard.path)


# --- memory, speed, cache --------------------------------------------------------------------------------------


def test_writing_never_holds_the_model_in_memory(tmp_path: Path) -> None:
    m = write_skewed_moe(tmp_path / "big.gguf", "qwen3moe", 3, 256, 32, n_ff=256, wtype="f16")
    size = m.path.stat().st_size
    assert size > 30 << 20
    keep = [tuple(range(0, 32, 2))] * 3  # every other expert: 16 byte ranges per expert tensor
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        shard = write_shard(m.path, keep, tmp_path / "s.gguf")
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"source {size / 2**20:.1f} MiB, shard {shard.n_bytes / 2**20:.1f} MiB in {seconds:.3f} s, peak {peak} B")
    assert peak < 2 << 20 and peak < size / 20


def test_ensure_shard_writes_once_and_rewrites_a_bad_cached_shard(tmp_path: Path) -> None:
    m = tiny(tmp_path / "m.gguf")
    cache = tmp_path / "cache"
    first = ensure_shard(m.path, m.hot, cache_dir=cache)
    digest = hashlib.sha256(m.path.read_bytes()).hexdigest()
    assert not first.reused and first.path.parent == cache / digest[:16]
    assert first.path.name.startswith("m.4of16-")
    assert json.loads(str(fields(first.path)[SHARD_KEY]))["source"] == digest
    again = ensure_shard(m.path, [list(reversed(h)) for h in m.hot], cache_dir=cache)  # same set, other order
    assert again.reused and again.path == first.path
    other = ensure_shard(m.path, [m.hot[0], m.hot[0], m.hot[0]], cache_dir=cache)
    assert other.path != first.path and other.path.parent == first.path.parent
    first.path.write_bytes(first.path.read_bytes()[:1000])  # damaged in the cache
    fixed = ensure_shard(m.path, m.hot, cache_dir=cache)
    assert not fixed.reused and fixed.path == first.path
    verify_shard(fixed.path, fixed.experts)
    known = ensure_shard(m.path, m.hot, cache_dir=tmp_path / "c2", model_key="ab" * 32)
    assert known.path.parent.name == "ab" * 8 and not (tmp_path / "c2" / "hashes").exists()


def test_model_hash_is_computed_once_per_file_version(tmp_path: Path) -> None:
    m = tiny(tmp_path / "m.gguf", split_max_tensors=10)
    facts = read_facts(m.path)
    whole = hashlib.sha256(b"".join(p.read_bytes() for p in facts.shard_paths)).hexdigest()
    assert model_hash(facts, tmp_path / "memo") == whole
    memo = next((tmp_path / "memo").iterdir())
    saved = json.loads(memo.read_text())
    memo.write_text(json.dumps(saved | {"sha256": "remembered"}))
    assert model_hash(facts, tmp_path / "memo") == "remembered"
    os.utime(facts.shard_paths[1], ns=(1, 1))  # a part changed: hashed again
    assert model_hash(read_facts(m.path), tmp_path / "memo") == whole


def test_normalize_ignores_layers_without_experts(tmp_path: Path) -> None:
    layout = moe_layout(read_facts(write_moe(tmp_path / "m.gguf", 2, 64, 4)))
    assert layout.moe_layers == (0, 1) and layout.architecture == "llama"
    assert normalize_experts(layout, [(3, 1), (2, 0)]) == ((1, 3), (0, 2))


# --- llama.cpp -------------------------------------------------------------------------------------------------

PROMPTS = ("the thin", "in the house", "hello world, ", "tin the he thin", "abcdefg")


@contextmanager
def serving(llama: LlamaCpp, model: Path, log: Path) -> Iterator[str]:
    port = free_port()
    args = ["-m", str(model), "--port", str(port), "-c", "512", "-np", "1", "--fit", "off", "-t", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen([str(llama.server), *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"llama-server did not load {model.name}:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def completions(llama: LlamaCpp, model: Path) -> list[tuple[str, list[int]]]:
    """Greedy /v1/completions of PROMPTS: (text, token ids). The generated models only emit printable tokens,
    so `logprobs` lists every token."""
    out = []
    with serving(llama, model, model.with_suffix(".log")) as url:
        for prompt in PROMPTS:
            body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": 1}
            req = urllib.request.Request(
                f"{url}/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                choice = json.load(r)["choices"][0]
            ids = [t["id"] for t in choice["logprobs"]["content"]]
            assert len(ids) == 24
            out.append((choice["text"], ids))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SkewedMoe]:
    d = tmp_path_factory.mktemp("moe")
    return {
        "qwen3moe": tiny(d / "qwen.gguf", "qwen3moe", split_max_tensors=12),  # a split source
        "olmoe": tiny(d / "olmoe.gguf", "olmoe"),
    }


@pytest.fixture(scope="module")
def full(llama: LlamaCpp, models: dict[str, SkewedMoe]) -> dict[str, list[tuple[str, list[int]]]]:
    return {arch: completions(llama, m.path) for arch, m in models.items()}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3moe", "olmoe"])
def test_the_generated_routing_is_skewed_onto_the_hot_experts(
    llama: LlamaCpp, models: dict[str, SkewedMoe], arch: str, tmp_path: Path
) -> None:
    """llama-imatrix counts each expert's selections: only hot experts are chosen, unevenly."""
    counts = imatrix_counts(llama, models[arch], tmp_path)
    for layer, row in enumerate(counts):
        hot = list(models[arch].hot[layer])
        assert row[hot].all() and row[hot].sum() == row.sum(), f"layer {layer}: {row.tolist()}"
        assert np.count_nonzero(row) >= 2 and row.max() > 1.5 * row[row > 0].min()


def imatrix_counts(llama: LlamaCpp, m: SkewedMoe, tmp_path: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    text = tmp_path / "calibration.txt"  # varied text: every hot expert gets chosen somewhere
    text.write_text("".join(chr(c) for c in rng.integers(32, 127, 6000)))
    out = tmp_path / "imatrix.gguf"
    binary = llama.bin_dir / "llama-imatrix"
    args = ["-m", str(m.path), "-f", str(text), "-o", str(out), "-c", "128", "-b", "128", "--chunks", "6", "-t", "1"]
    subprocess.run([str(binary), *args], check=True, capture_output=True, timeout=120)
    found = tensors(out)
    return np.array([np.asarray(found[f"blk.{i}.ffn_down_exps.weight.counts"].data).ravel() for i in range(m.n_layers)])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3moe", "olmoe"])
def test_a_shard_with_every_expert_answers_like_the_full_model(
    llama: LlamaCpp,
    models: dict[str, SkewedMoe],
    full: dict[str, list[tuple[str, list[int]]]],
    arch: str,
    tmp_path: Path,
) -> None:
    shard = write_shard(models[arch].path, [range(16)] * 3, tmp_path / "all.gguf")
    assert completions(llama, shard.path) == full[arch]


@pytest.mark.slow
def test_a_renormalising_shard_holding_each_tokens_top_k_answers_like_the_full_model(
    llama: LlamaCpp, models: dict[str, SkewedMoe], full: dict[str, list[tuple[str, list[int]]]], tmp_path: Path
) -> None:
    """qwen3moe renormalises the chosen experts' weights: keeping every expert a token picks (the hot ones) gives
    the same weights, so the same tokens — from a shard holding 4 of 16 experts per layer."""
    m = models["qwen3moe"]
    shard = write_shard(m.path, m.hot, tmp_path / "hot.gguf")
    assert shard.expert_count == 4 and shard.n_bytes < 0.5 * read_facts(m.path).file_size
    assert completions(llama, shard.path) == full["qwen3moe"]
    # control: the same arch without the experts it uses answers differently, so the comparison can fail
    cold = write_shard(m.path, [m.cold(i)[:4] for i in range(3)], tmp_path / "cold.gguf")
    assert all(a != b for a, b in zip(completions(llama, cold.path), full["qwen3moe"], strict=True))


@pytest.mark.slow
def test_an_olmoe_shard_holding_each_tokens_top_k_does_not_answer_like_the_full_model(
    llama: LlamaCpp, models: dict[str, SkewedMoe], full: dict[str, list[tuple[str, list[int]]]], tmp_path: Path
) -> None:
    """olmoe takes softmax over the experts present and does not renormalise the top-k: with the cold experts gone
    the same chosen experts get larger weights (here about 1/(1 − the cold experts' share)), and the text drifts."""
    m = models["olmoe"]
    shard = write_shard(m.path, m.hot, tmp_path / "hot.gguf")
    got = completions(llama, shard.path)
    differ = [a != b for a, b in zip(got, full["olmoe"], strict=True)]
    assert sum(differ) >= 3, f"expected the inflated weights to change most completions: {differ}"


@pytest.mark.slow
def test_shards_dealt_from_measured_routing_answer_like_the_full_model(
    llama: LlamaCpp, models: dict[str, SkewedMoe], full: dict[str, list[tuple[str, list[int]]]], tmp_path: Path
) -> None:
    """The pipeline in miniature: llama-imatrix counts → `assign` (2 shards of 10: the 4 most-used experts of each
    layer on both: the hot ones) → `ensure_shard` → each shard, alone, answers like the full
    model."""
    m = models["qwen3moe"]
    counts = imatrix_counts(llama, m, tmp_path)
    a = assign(16, 2, counts, 2, capacity=10)
    assert [tuple(np.nonzero(row)[0]) for row in counts] == list(m.hot)
    assert a.core == 4 and all(set(m.hot[i]) <= set(s[i]) for s in a.shards for i in range(3))
    assert all(f == 1.0 for row in a.kept_mass for f in row)
    for shard_experts in a.shards:
        shard = ensure_shard(m.path, shard_experts, cache_dir=tmp_path / "cache")
        assert shard.expert_count == 10
        assert completions(llama, shard.path) == full["qwen3moe"]


@pytest.mark.parametrize(("arch", "renormalises"), [("qwen3moe", True), ("olmoe", False)])
def test_the_header_says_how_experts_are_gated(tmp_path: Path, arch: str, renormalises: bool) -> None:
    layout = moe_layout(read_facts(tiny(tmp_path / "m.gguf", arch).path))
    assert (layout.n_expert, layout.expert_used, layout.leading_dense, layout.shared_experts) == (16, 2, 0, 0)
    assert layout.gating == "softmax" and layout.renormalises is renormalises
    assert layout.exact_with_top_k is renormalises
    text = layout.describe()
    assert f"{arch}: 16 experts per layer in 3 MoE layers; 2 used per token; softmax gating" in text
    assert ("computes exactly" in text) is renormalises and ("weigh more" in text) is not renormalises


def test_gating_that_ignores_the_experts_left_out_is_exact_whatever_the_renormalisation(tmp_path: Path) -> None:
    """gpt-oss takes the softmax over the chosen experts only; sigmoid gating weighs each expert alone."""
    layout = moe_layout(read_facts(write_synthetic(tmp_path / "g.gguf")))
    assert layout.gating == "softmax over the chosen" and layout.exact_with_top_k is True
    sig = dataclasses.replace(layout, gating="sigmoid", renormalises=False, shared_experts=1)
    assert sig.exact_with_top_k is True and "1 shared expert(s) kept whole" in sig.describe()
    soft = dataclasses.replace(layout, gating="softmax", renormalises=None)
    assert soft.exact_with_top_k is None and "unknown" in soft.describe()

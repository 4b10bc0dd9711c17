"""Pre-seeding the ggml-rpc tensor cache: FNV-1a, the tensor directory, the selection of layers, atomic
writes, and (slow) agreement with what llama.cpp itself writes, measured as bytes on the wire."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio
import gguf
import numpy as np
import pytest

from bench.p4_load import LoadResult, load_through_relay, write_test_model
from inference import fnv1a, rpc_cache
from inference.fnv1a import FNV_OFFSET, fnv1a64, hasher_kind
from inference.llamacpp import LlamaCpp
from inference.llamacpp_build import build_root
from inference.rpc_cache import (
    HASH_THRESHOLD,
    cache_file_name,
    hashed_tensors,
    read_directory,
    read_tensor_infos,
    seed,
)
from mesh_llamacpp import load_pin
from mesh_mcp.errors import CorruptModel

T = TypeVar("T")
VECTORS = [(b"", 0xCBF29CE484222325), (b"a", 0xAF63DC4C8601EC8C), (b"foobar", 0x85944171F73967E8)]


def run(fn: Callable[[], Awaitable[T]], timeout: float = 300.0) -> T:
    async def bounded() -> T:
        with anyio.fail_after(timeout):
            return await fn()

    return anyio.run(bounded)


def test_fnv1a64_vectors_native_and_python() -> None:
    assert hasher_kind() == "native"
    assert any(build_root().joinpath("fnv1a").glob("fnv1a-*.so"))
    for data, expected in VECTORS:
        assert fnv1a64(data) == expected
        assert fnv1a._fnv_python(memoryview(data), FNV_OFFSET) == expected
    blob = np.random.default_rng(1).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    whole = fnv1a64(blob)
    assert fnv1a64(blob[40_000:], fnv1a64(blob[:40_000])) == whole  # chaining over chunks
    assert fnv1a._fnv_python(memoryview(blob), FNV_OFFSET) == whole
    assert cache_file_name(0xAB) == "00000000000000ab"


def test_python_fallback_when_no_compiler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MESH_LLM_CACHE", str(tmp_path / "cache"))  # nothing compiled there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="mesh_llm.rpc_cache"):
        assert fnv1a._load_native() is None
    assert "pure Python" in caplog.text
    monkeypatch.setattr(fnv1a, "_native", [None])
    assert hasher_kind() == "python"
    assert [fnv1a64(d) for d, _ in VECTORS] == [h for _, h in VECTORS]


# --- tensor directory and layer selection ------------------------------------------------------------


def _gguf(path: Path, *, n_layer: int = 2, tied: bool = False, nextn: bool = False) -> Path:
    """Small GGUF, mixed types and an odd alignment; sizes in bytes are what the selection tests use."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_custom_alignment(64)
    w.add_token_list([f"t{i}".encode() for i in range(1000)])  # a long array the header walk must skip
    rng = np.random.default_rng(3)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 64), dtype=np.float32))  # 4096 B
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))  # 256 B
    if not tied:
        w.add_tensor("output.weight", rng.standard_normal((16, 64), dtype=np.float32))
    for i in range(n_layer + (1 if nextn else 0)):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(64, dtype=np.float32))  # 256 B
        w.add_tensor(
            f"blk.{i}.ffn_up.weight", rng.standard_normal((32, 64), dtype=np.float32).astype(np.float16)
        )  # 4096 B
        q8 = gguf.quants.quantize(rng.standard_normal((8, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_down.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # 544 B
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_header_walk_matches_gguf_reader(tmp_path: Path) -> None:
    path = _gguf(tmp_path / "m.gguf", nextn=True)
    keys, raw = read_tensor_infos(path)
    reader = gguf.GGUFReader(path)
    assert [(t.name, t.offset, t.size) for t in raw] == [(t.name, t.data_offset, t.n_bytes) for t in reader.tensors]
    assert keys == {"llama.block_count": 2, "general.alignment": 64, "general.architecture": "llama"}


def test_layer_selection(tmp_path: Path) -> None:
    untied = _gguf(tmp_path / "untied.gguf")
    d = read_directory(untied)
    assert d.n_layer == 2 and "token_embd.weight" not in {t.name for t in d.tensors}  # input layer: never sent

    def names(path: Path, layers: range | None, output: bool | None = None) -> list[str]:
        return [t.name for t in hashed_tensors(path, layers, output=output, threshold=300)]

    assert names(untied, range(0, 1)) == ["blk.0.ffn_up.weight", "blk.0.ffn_down.weight"]
    assert names(untied, range(1, 3)) == ["output.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight"]
    assert names(untied, range(1, 2), output=True)[0] == "output.weight"
    assert "output.weight" not in names(untied, None, output=False)
    assert len(names(untied, None)) == 5
    tied = _gguf(tmp_path / "tied.gguf", tied=True, nextn=True)
    # the tied output projection is token_embd, duplicated into the output layer; blk.2 (>= n_layer) is a head
    assert names(tied, range(2, 3)) == ["token_embd.weight", "blk.2.ffn_up.weight", "blk.2.ffn_down.weight"]
    assert names(tied, range(0, 2)) == [f"blk.{i}.{n}.weight" for i in (0, 1) for n in ("ffn_up", "ffn_down")]


def test_threshold_is_strict(tmp_path: Path) -> None:
    path = _gguf(tmp_path / "m.gguf")
    assert [t.name for t in hashed_tensors(path, None, threshold=4095)] == [
        "output.weight", "blk.0.ffn_up.weight", "blk.1.ffn_up.weight",
    ]  # fmt: skip
    assert hashed_tensors(path, None, threshold=4096) == []
    assert HASH_THRESHOLD == load_pin().rpc_hash_threshold == 64 * 1024  # our build's edit (llama.cpp/pin.toml)


def test_seed_writes_atomically_skips_and_repairs(tmp_path: Path) -> None:
    path = _gguf(tmp_path / "m.gguf")
    cache = tmp_path / "cache"
    progress: list[tuple[int, int]] = []
    first = seed(path, cache, None, lambda done, total: progress.append((done, total)), threshold=300)
    files = cache / "rpc"
    data = path.read_bytes()
    expected = {t.name: t for t in hashed_tensors(path, None, threshold=300)}
    assert set(first.files) == set(expected) and len(first.written) == 5 and first.bytes_hashed == first.bytes_written
    for name, file in first.files.items():
        t = expected[name]
        blob = data[t.offset : t.offset + t.size]
        assert file == f"{fnv1a64(blob):016x}" and (files / file).read_bytes() == blob
    assert progress[-1] == (first.bytes_written, first.bytes_written)
    assert sorted(p.name for p in files.iterdir()) == sorted(first.written)  # no temporary files left

    again = seed(path, cache, None, threshold=300)
    assert again.written == [] and len(again.skipped) == 5 and again.bytes_hashed == 0  # hashes remembered

    victim = files / first.files["blk.1.ffn_up.weight"]
    victim.write_bytes(victim.read_bytes()[:100])  # a truncated file would load a partial tensor
    repaired = seed(path, cache, None, threshold=300)
    assert repaired.written == [victim.name] and victim.stat().st_size == 4096

    rehashed = seed(path, cache, range(0, 1), threshold=300, rehash=True, workers=1)
    assert rehashed.bytes_hashed == 4096 + 544 and len(rehashed.skipped) == 2


def test_seed_python_fallback_agrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _gguf(tmp_path / "m.gguf")
    native = seed(path, tmp_path / "a", None, threshold=300)
    monkeypatch.setattr(fnv1a, "_native", [None])
    monkeypatch.setattr(rpc_cache, "CHUNK", 1000)  # chunked hashing and the write() copy path
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    slow = seed(path, tmp_path / "b", None, threshold=300)
    assert slow.hasher == "python" and slow.files == native.files
    for file in native.written:
        assert (tmp_path / "a" / "rpc" / file).read_bytes() == (tmp_path / "b" / "rpc" / file).read_bytes()


def test_seed_rejects_a_truncated_gguf(tmp_path: Path) -> None:
    path = _gguf(tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CorruptModel):
        seed(path, tmp_path / "cache", None, threshold=300)
    (tmp_path / "junk.gguf").write_bytes(b"nope" * 10)
    with pytest.raises(CorruptModel):
        read_tensor_infos(tmp_path / "junk.gguf")


# --- against llama.cpp ---------------------------------------------------------------------------------


def _llama_files(home: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (home / "rpc-cache" / "rpc").iterdir()}


def _check_against_llama(
    llama: LlamaCpp, model: Path, tmp_path: Path, *, gpu_layers: int, layers: range | None
) -> tuple[LoadResult, LoadResult, int]:
    """Load once with an empty cache; seed() must reproduce exactly the files llama.cpp wrote; a fresh
    rpc-server with the seeded cache must then receive no large tensor."""
    cold = run(lambda: load_through_relay(llama, model, tmp_path / "cold", tmp_path, gpu_layers=gpu_layers))
    assert cold.ok, cold.detail
    written_by_llama = _llama_files(tmp_path / "cold")
    big = hashed_tensors(model, layers)
    assert written_by_llama and len(written_by_llama) == len(big)
    assert cold.traffic.hash_misses == len(big) and cold.traffic.miss_bytes == sum(t.size for t in big)

    result = seed(model, tmp_path / "seeded" / "rpc-cache", layers)
    assert sorted(result.written) == sorted(written_by_llama)
    assert _llama_files(tmp_path / "seeded") == written_by_llama  # same names, same bytes

    warm = run(lambda: load_through_relay(llama, model, tmp_path / "seeded", tmp_path, gpu_layers=gpu_layers))
    assert warm.ok, warm.detail
    big_bytes = sum(t.size for t in big)
    assert warm.traffic.hash_offers == len(big) and warm.traffic.hash_misses == 0 and warm.traffic.miss_bytes == 0
    # what crossed the wire for the large tensors: the saving is all but 1 % of their bytes
    assert cold.traffic.to_server - warm.traffic.to_server > 0.99 * big_bytes
    assert _llama_files(tmp_path / "seeded") == written_by_llama  # the server wrote nothing new
    return cold, warm, big_bytes


@pytest.mark.slow
def test_seed_matches_llama_cpp_smollm(llama: LlamaCpp, smollm: Path, tmp_path: Path) -> None:
    """SmolLM2 with every layer on the rpc-server: cold, the whole model crosses; seeded, under 1 % of it
    (every weight matrix is over our build's 64 KiB threshold; only norms and the protocol cross)."""
    cold, warm, _ = _check_against_llama(llama, smollm, tmp_path, gpu_layers=999, layers=None)
    names = [t.name for t in hashed_tensors(smollm)]
    assert "token_embd.weight" in names and "blk.0.ffn_down.weight" in names and len(names) > 200
    assert cold.traffic.to_server > 0.95 * smollm.stat().st_size
    size = smollm.stat().st_size
    assert warm.traffic.summary()["set_tensor_bytes"] < 0.01 * size, warm.traffic  # tensor data: norms only
    assert warm.traffic.to_server < 0.015 * size, warm.traffic  # everything, protocol (graphs, hashes) included


@pytest.mark.slow
def test_seed_matches_llama_cpp_per_layer(llama: LlamaCpp, tmp_path: Path) -> None:
    """A 3-block model whose FFN matrices exceed the threshold, loaded with -ngl 2: llama.cpp offloads block 2
    and the output layer (layers n_layer + 1 - 2 ..= n_layer); seeding exactly range(2, 4) covers it."""
    model = write_test_model(tmp_path / "p4.gguf", n_layer=3)
    _, warm, big_bytes = _check_against_llama(llama, model, tmp_path, gpu_layers=2, layers=range(2, 4))
    assert big_bytes >= 2 * 512 * 5200 * 4  # at least block 2's FFN and the output
    # what still crosses: the offloaded layers' tensors under the threshold (attention, norms, output), and
    # well under 1 MB of protocol (graphs, buffers, inputs)
    small = sum(t.size for t in read_directory(model).tensors if t.layer >= 2 and t.size <= HASH_THRESHOLD)
    assert small < warm.traffic.to_server < small + 1_000_000
    other = seed(model, tmp_path / "other", range(0, 2))
    assert len(other.written) == len(hashed_tensors(model, range(0, 2))) and not set(other.written) & set(
        _llama_files(tmp_path / "cold")
    )

"""The header-only GGUF reader on files written by the real `gguf` package (checked against gguf-py's own
reader), on corrupt ones, and the memory model built on it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from inference.gguf_facts import GGML_BLOCKS, GGUFFacts, read_facts
from inference.llamacpp import LlamaCpp
from inference.memory_model import MiB, kv_cache_bytes, memory_need, model_need_bytes
from mesh_mcp.errors import CorruptModel
from tests.ggufgen import write_dense, write_moe


def write_gguf(path: Path, arch: str = "llama", experts: int = 0) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(8)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(2)
    w.add_token_list([f"t{i}".encode() for i in range(300)])  # long array: skipped, not kept
    w.add_chat_template("{{ messages }}")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_facts(tmp_path: Path) -> None:
    f = read_facts(write_gguf(tmp_path / "m.gguf"))
    assert (f.architecture, f.name, f.block_count, f.context_length, f.embedding_length) == ("llama", "tiny", 2, 128, 8)
    assert f.n_tensors == 1 and f.has_chat_template and not f.is_moe
    assert f.metadata["tokenizer.ggml.tokens"] == "<array of 300>"


def test_reads_moe_facts(tmp_path: Path) -> None:
    f = read_facts(write_gguf(tmp_path / "moe.gguf", arch="qwen3moe", experts=8))
    assert f.is_moe and f.expert_count == 8 and f.expert_used_count == 2


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b"GGML" + b[4:], "not a GGUF"),
        (lambda b: b[:40], "truncated"),
        (lambda b: b[:4] + (99).to_bytes(4, "little") + b[8:], "unsupported GGUF version"),
        (lambda b: b[:24] + (1 << 40).to_bytes(8, "little") + b[32:], "corrupt"),
        (lambda b: b"", "not a GGUF"),
    ],
)
def test_corrupt_files_give_clear_errors(tmp_path: Path, mangle, message: str) -> None:  # type: ignore[no-untyped-def]
    good = write_gguf(tmp_path / "m.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(mangle(good))
    with pytest.raises(CorruptModel, match=message):
        read_facts(bad)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CorruptModel, match="cannot read"):
        read_facts(tmp_path / "absent.gguf")


# --- the tensor directory ---------------------------------------------------------------------------------------


def reference(path: Path) -> dict[str, tuple[tuple[int, ...], int, int, int]]:
    """The tensor directory as gguf-py's full reader (numpy, memory-mapped) sees it."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return {
        t.name: (tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.n_bytes), int(t.data_offset))
        for t in r.tensors
    }


def directory(f: GGUFFacts) -> dict[str, tuple[tuple[int, ...], int, int, int]]:
    return {t.name: (t.shape, t.ggml_type, t.n_bytes, t.offset) for t in f.tensors}


@pytest.mark.parametrize(
    "write",
    [
        lambda p: write_dense(p, 3, 64, wtype="f32"),
        lambda p: write_dense(p, 3, 64, 300, wtype="f16", n_head_kv=2),
        lambda p: write_dense(p, 2, 64, wtype="q8_0", tied=True),
        lambda p: write_dense(p, 2, 64, alignment=64),
        lambda p: write_moe(p, 2, 64, n_expert=4),
    ],
    ids=["f32", "f16-gqa", "q8_0-tied", "align64", "moe"],
)
def test_tensor_directory_matches_gguf_py(tmp_path: Path, write: Callable[[Path], Path]) -> None:
    path = write(tmp_path / "m.gguf")
    f = read_facts(path)
    assert directory(f) == reference(path)
    assert f.n_tensors == len(f.tensors)
    assert f.weight_bytes == sum(t.n_bytes for t in f.tensors)
    # Every byte of tensor data is accounted for: the last tensor ends at the end of the file.
    assert max(t.offset + t.n_bytes for t in f.tensors) == f.file_size


def test_derived_facts_of_a_dense_model(tmp_path: Path) -> None:
    f = read_facts(write_dense(tmp_path / "d.gguf", 4, 64, 300, n_head=4, n_head_kv=2, n_ff=96, ctx=4096))
    per_layer = 2 * 64 + (64 * 64) * 2 + (32 * 64) * 2 + (96 * 64) * 3  # norms + q,o + k,v + ffn, floats
    assert f.layer_bytes == (per_layer * 4,) * 4
    assert f.non_layer_bytes == (300 * 64 * 2 + 64) * 4  # token_embd + output + output_norm
    assert f.output_bytes == 300 * 64 * 4 and not f.output_tied
    assert (f.n_layers, f.n_embd, f.vocab_size, f.context_length) == (4, 64, 300, 4096)
    assert (f.n_head, f.n_head_kv, f.key_length, f.value_length) == (4, (2,) * 4, 16, 16)
    assert f.kv_elements_per_token == (2 * 32,) * 4
    assert not f.is_moe and f.expert_count == 0
    assert f.tensor["blk.3.ffn_down.weight"].shape == (96, 64)  # GGML order: ne[0] (the row) first
    assert f.tensor["blk.3.ffn_down.weight"].layer == 3 and f.tensor["output.weight"].layer is None


def test_tied_output_is_the_token_embedding(tmp_path: Path) -> None:
    f = read_facts(write_dense(tmp_path / "t.gguf", 2, 64, wtype="q8_0", tied=True))
    assert f.output_tied and "output.weight" not in f.tensor
    assert f.output_bytes == f.tensor["token_embd.weight"].n_bytes == 264 * 64 // 32 * 34


def test_moe_facts(tmp_path: Path) -> None:
    f = read_facts(write_moe(tmp_path / "moe.gguf", 2, 64, n_expert=4, n_ff=32))
    assert f.is_moe and (f.expert_count, f.expert_used_count) == (4, 2)
    assert f.tensor["blk.1.ffn_up_exps.weight"].shape == (64, 32, 4)  # the expert axis last in GGML order
    assert f.layer_bytes[0] == f.layer_bytes[1] > 4 * 3 * 64 * 32 * 4


def test_vocab_falls_back_to_the_embedding_shape(tmp_path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((77, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_facts(tmp_path / "v.gguf")
    assert (f.vocab_size, f.n_embd, f.output_tied, f.n_layers) == (77, 8, True, 1)
    assert f.kv_elements_per_token == (0,)  # no attention keys: no KV cache counted


def test_per_layer_head_counts(tmp_path: Path) -> None:
    """Hybrid models list head_count_kv per layer; 0 marks a layer without attention (no KV cache)."""
    import gguf

    n = 80  # more than the 64 items ordinary arrays keep
    w = gguf.GGUFWriter(str(tmp_path / "h.gguf"), "llama")
    w.add_block_count(n)
    w.add_embedding_length(64)
    w.add_head_count(8)
    w.add_head_count_kv([0 if i % 4 else 2 for i in range(n)])
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_facts(tmp_path / "h.gguf")
    assert f.n_head_kv == tuple(0 if i % 4 else 2 for i in range(n))
    assert kv_cache_bytes(f, 256) == (n // 4) * 2 * (8 + 8) * 256 * 2


def test_split_model_reads_every_shard(tmp_path: Path) -> None:
    whole = read_facts(write_dense(tmp_path / "whole.gguf", 3, 64))
    first = write_dense(tmp_path / "m.gguf", 3, 64, split_max_tensors=10)  # 30 tensors
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert first == tmp_path / "m-00001-of-00003.gguf" and len(shards) == 3
    for start in (shards[0], shards[2]):  # any shard names the model
        f = read_facts(start)
        assert f.split_count == 3 and f.shard_paths == tuple(shards)
        assert [(t.name, t.n_bytes) for t in f.tensors] == [(t.name, t.n_bytes) for t in whole.tensors]
        assert f.file_size == sum(p.stat().st_size for p in shards)
        assert (f.n_layers, f.vocab_size, f.layer_bytes) == (whole.n_layers, whole.vocab_size, whole.layer_bytes)
        for t in f.tensors:  # offsets are within each tensor's own shard
            assert t.offset + t.n_bytes <= shards[t.shard].stat().st_size
    shards[2].unlink()
    with pytest.raises(CorruptModel, match=r"m-00003-of-00003\.gguf is missing"):
        read_facts(shards[0])


def test_split_shard_renamed(tmp_path: Path) -> None:
    first = write_dense(tmp_path / "m.gguf", 2, 64, split_max_tensors=10)
    renamed = first.rename(tmp_path / "model.gguf")
    with pytest.raises(CorruptModel, match="does not end in"):
        read_facts(renamed)


def _patch(data: bytes, old: bytes, new: bytes, count: int = 1) -> bytes:
    assert len(old) == len(new) and old in data
    return data.replace(old, new, count)


def _dir_entry(data: bytes, name: bytes) -> int:
    """Offset just past `name` in the tensor directory (after the metadata, which holds no tensor names)."""
    return data.rindex(name) + len(name)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[: len(b) - 100], "truncated: tensor 'output.weight' ends at byte"),
        (lambda b: b[: _dir_entry(b, b"blk.1.ffn_up.weight") + 4], "truncated"),
        (  # n_dims of a tensor
            lambda b: (lambda i: b[:i] + (9).to_bytes(4, "little") + b[i + 4 :])(_dir_entry(b, b"output.weight")),
            "claims 9 dimensions",
        ),
        (  # ggml type of output.weight (after n_dims u32 and 2 dims u64)
            lambda b: (lambda i: b[:i] + (99).to_bytes(4, "little") + b[i + 4 :])(
                _dir_entry(b, b"output.weight") + 4 + 16
            ),
            "unknown ggml type 99",
        ),
        (  # relative data offset of output.weight moved far past the end
            lambda b: (lambda i: b[:i] + (1 << 40).to_bytes(8, "little") + b[i + 8 :])(
                _dir_entry(b, b"output.weight") + 4 + 16 + 4
            ),
            "past the end of the file",
        ),
        (  # misaligned relative offset
            lambda b: (lambda i: b[:i] + (3).to_bytes(8, "little") + b[i + 8 :])(
                _dir_entry(b, b"output.weight") + 4 + 16 + 4
            ),
            "alignment 32",
        ),
        (lambda b: _patch(b, b"blk.0.attn_k.weight", b"blk.0.attn_q.weight"), "appears twice"),
    ],
    ids=["data-cut", "directory-cut", "n-dims", "ggml-type", "offset", "misaligned", "duplicate"],
)
def test_corrupt_tensor_directory(tmp_path: Path, mangle: Callable[[bytes], bytes], message: str) -> None:
    good = write_dense(tmp_path / "m.gguf", 2, 64).read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(mangle(good))
    with pytest.raises(CorruptModel, match=message):
        read_facts(bad)


def test_bad_alignment_value(tmp_path: Path) -> None:
    good = write_dense(tmp_path / "m.gguf", 2, 64, alignment=64).read_bytes()
    i = _dir_entry(good, b"general.alignment") + 4  # after the value type: the u32 value
    assert int.from_bytes(good[i : i + 4], "little") == 64
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good[:i] + (48).to_bytes(4, "little") + good[i + 4 :])
    with pytest.raises(CorruptModel, match="not a power of two"):
        read_facts(bad)


def test_ggml_block_table_matches_gguf_py() -> None:
    from gguf.constants import GGML_QUANT_SIZES

    assert {int(t): v for t, v in GGML_QUANT_SIZES.items()} == GGML_BLOCKS


def test_reading_does_not_import_numpy(tmp_path: Path) -> None:
    path = write_dense(tmp_path / "m.gguf", 2, 64, 5000)
    code = (
        "import sys; from pathlib import Path; from inference.gguf_facts import read_facts; "
        f"f = read_facts(Path({str(path)!r})); assert f.vocab_size == 5000; "
        "assert 'numpy' not in sys.modules and 'gguf' not in sys.modules, 'numpy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# --- the memory model -------------------------------------------------------------------------------------------


def test_kv_cache_bytes_matches_llama_cpp(tmp_path: Path) -> None:
    """llama-server -c 512 on this 48-layer model reports `KV buffer size = 6.00 MiB` (K and V f16)."""
    f = read_facts(write_dense(tmp_path / "d48.gguf", 48, 64))
    assert kv_cache_bytes(f, 512) == 6 * MiB
    assert kv_cache_bytes(f, 500) == 6 * MiB  # llama.cpp pads the context to 256 cells
    assert kv_cache_bytes(f, 512, type_bytes=1) == 3 * MiB  # q8_0-ish cache
    assert kv_cache_bytes(f, 512, layers=range(10)) == 6 * MiB * 10 // 48


def test_model_need_bytes(tmp_path: Path) -> None:
    f = read_facts(write_dense(tmp_path / "m.gguf", 4, 64, 1000, tied=True))
    need = memory_need(f, 1024, 4)
    assert need.weights == f.weight_bytes + f.output_bytes  # the tied output is duplicated onto the last device
    assert need.kv == kv_cache_bytes(f, 4096)
    compute = 64 * MiB + 4 * 512 * 16 * 64 + 2 * 512 * 4096 + 4 * 1000 * 4 + int(need.weights * 0.05)
    assert need.compute == compute
    assert model_need_bytes(f, 1024, 4) == need.total == need.weights + need.kv + need.compute
    # A worker stage has no embeddings, no output and no logits buffer.
    worker = memory_need(f, 1024, 4, layers=range(2), host=False)
    assert worker.weights == sum(f.layer_bytes[:2]) and worker.kv == need.kv // 2


def test_blocks_beyond_block_count_go_with_the_output(tmp_path: Path) -> None:
    """Next-token-prediction layers (blk.N, N ≥ block_count) sit with the output layer in llama.cpp."""
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "mtp.gguf"), "llama")
    w.add_block_count(2)
    for i in range(3):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_facts(tmp_path / "mtp.gguf")
    assert (f.n_layers, f.layer_bytes, f.non_layer_bytes) == (2, (32, 32), 32)


@pytest.mark.slow
@pytest.mark.parametrize(
    "write",
    [lambda p: write_dense(p, 2, 64, wtype="q8_0", tied=True, n_head_kv=2), lambda p: write_moe(p, 2, 64, 4)],
    ids=["dense-q8_0-tied", "moe"],
)
def test_generated_models_load_in_llama_cpp(llama: LlamaCpp, tmp_path: Path, write: Callable[[Path], Path]) -> None:
    """ggufgen's models are real: llama-server loads them and completes (gibberish) text."""
    import json
    import time
    import urllib.error
    import urllib.request

    from tests.harness import free_port

    port = free_port()
    args = ["-m", str(write(tmp_path / "m.gguf")), "--port", str(port), "-c", "256", "-np", "1", "--fit", "off"]
    server = subprocess.Popen([str(llama.server), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert server.poll() is None and time.monotonic() < deadline, "llama-server did not load the model"
            time.sleep(0.1)
        body = json.dumps({"prompt": "the thin", "n_predict": 4, "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", body, {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.load(r)["tokens_predicted"] == 4
    finally:
        server.terminate()
        server.wait(timeout=10)

"""The header-only GGUF reader on files written by the real `gguf` package, and on corrupt ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.errors import CorruptModel
from inference.gguf_facts import read_facts


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

"""GGUF facts from the header alone: architecture, layers, context, experts, chat template.

A header-only reader (no tensor data, no numpy) so scanning a models directory is fast, and so a
corrupt or truncated file gives a clear `CorruptModel` instead of a llama-server exit code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import CorruptModel

MAGIC = b"GGUF"
# Value types from the GGUF spec.
_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 64 << 20  # a chat template is a few KB; 64 MiB means a corrupt length
# Arrays longer than this are skipped rather than kept (tokenizer vocabularies).
_KEEP_ARRAY = 64


@dataclass(frozen=True)
class GGUFFacts:
    path: Path
    file_size: int
    version: int
    n_tensors: int
    architecture: str
    name: str | None
    block_count: int | None
    context_length: int | None
    embedding_length: int | None
    expert_count: int
    expert_used_count: int
    has_chat_template: bool
    metadata: dict[str, object]

    @property
    def is_moe(self) -> bool:
        return self.expert_count > 1


class _Reader:
    def __init__(self, fh: BinaryIO, path: Path, size: int) -> None:
        self.fh, self.path, self.size = fh, path, size

    def take(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise CorruptModel(f"{self.path} is truncated: its GGUF header ends early ({self.size} bytes)")
        return data

    def scalar(self, fmt: str) -> int | float | bool:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        return int(self.scalar("<I"))

    def u64(self) -> int:
        return int(self.scalar("<Q"))

    def string(self) -> str:
        n = self.u64()
        if n > min(_MAX_STRING, self.size):
            raise CorruptModel(f"{self.path}: corrupt GGUF header (a string claims {n} bytes)")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.u32(), self.u64()
            if count > self.size:
                raise CorruptModel(f"{self.path}: corrupt GGUF header (an array claims {count} items)")
            if item_type in _SCALARS and count > _KEEP_ARRAY:
                self.fh.seek(struct.calcsize(_SCALARS[item_type]) * count, 1)
                return f"<array of {count}>"
            items = [self.value(item_type) for _ in range(count)]
            return items if count <= _KEEP_ARRAY else f"<array of {count}>"
        raise CorruptModel(f"{self.path}: corrupt GGUF header (unknown value type {vtype})")


def read_facts(path: Path) -> GGUFFacts:
    """Parse the GGUF header of `path`; raise `CorruptModel` saying what is wrong."""
    try:
        size = path.stat().st_size
        fh = open(path, "rb")
    except OSError as exc:
        raise CorruptModel(f"cannot read model file {path}: {exc.strerror}") from exc
    with fh:
        r = _Reader(fh, path, size)
        if size < 24 or r.take(4) != MAGIC:
            raise CorruptModel(f"{path} is not a GGUF model file (wrong magic bytes); re-download it")
        version = r.u32()
        if version not in (2, 3):
            raise CorruptModel(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = r.u64(), r.u64()
        if n_kv > 100_000 or n_tensors > 1_000_000:
            raise CorruptModel(f"{path}: corrupt GGUF header ({n_kv} keys, {n_tensors} tensors)")
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.u32())
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise CorruptModel(f"{path}: GGUF header has no general.architecture")

    def num(key: str) -> int | None:
        v = meta.get(f"{arch}.{key}")
        return int(v) if isinstance(v, int | float) else None

    name = meta.get("general.name")
    return GGUFFacts(
        path=path,
        file_size=size,
        version=version,
        n_tensors=n_tensors,
        architecture=arch,
        name=name if isinstance(name, str) else None,
        block_count=num("block_count"),
        context_length=num("context_length"),
        embedding_length=num("embedding_length"),
        expert_count=num("expert_count") or 0,
        expert_used_count=num("expert_used_count") or 0,
        has_chat_template="tokenizer.chat_template" in meta,
        metadata=meta,
    )

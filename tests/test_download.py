"""Real downloads against a local HTTP server: resume, retries, faults, verification, spec resolution."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from inference.catalog import by_name
from inference.download import auth_headers, download, lock_path, part_path
from inference.models import ensure_model, ensure_with_draft
from mesh_mcp.errors import CorruptModel, DownloadError, ModelNotFound

try:
    from tests.httpserver import Fault, FileServer, closed_port
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from httpserver import Fault, FileServer, closed_port  # type: ignore[no-redef]

T = TypeVar("T")
MiB = 1024 * 1024
BODY = b"GGUF" + random.Random(7).randbytes(6 * MiB + 123)  # crosses the 4 MiB write chunk
BODY_SHA = hashlib.sha256(BODY).hexdigest()


def run(fn: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """Run an async test body on anyio with a bound on how long it may take."""

    async def bounded() -> T:
        with anyio.fail_after(timeout):
            return await fn()

    return anyio.run(bounded)


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MESH_LLM_CACHE", str(tmp_path / "cache"))


# --- download() -------------------------------------------------------------------------------------


def test_full_download_verifies_and_reports_progress(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/m.gguf", BODY)
    dest = tmp_path / "m.gguf"
    seen: list[tuple[str, int, int | None]] = []

    path = run(
        lambda: download(
            url,
            dest,
            expected_size=len(BODY),
            sha256=BODY_SHA,
            on_progress=lambda *a: seen.append(a),
            label="m",
        )
    )

    assert path == dest and dest.read_bytes() == BODY
    assert not part_path(dest).exists()
    assert seen[-1] == ("m", len(BODY), len(BODY))
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)


def test_resume_after_interruption_sends_range(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/m.gguf", BODY)
    server.fault("/m.gguf", Fault(cut_after=5 * MiB))
    dest = tmp_path / "m.gguf"

    run(lambda: download(url, dest, sha256=BODY_SHA, retry_delay_s=0))

    reqs = server.requests("/m.gguf")
    assert len(reqs) == 2
    assert reqs[0].range is None
    assert reqs[1].range == f"bytes={5 * MiB}-"
    assert dest.read_bytes() == BODY


def test_resume_across_runs_rehashes_the_part(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/m.gguf", BODY)
    server.fault("/m.gguf", Fault(cut_after=1_000_000))
    dest = tmp_path / "m.gguf"

    with pytest.raises(DownloadError, match="run again to resume"):
        run(lambda: download(url, dest, sha256=BODY_SHA, retries=0))
    assert not dest.exists()
    assert part_path(dest).stat().st_size == 1_000_000

    run(lambda: download(url, dest, sha256=BODY_SHA, retries=0))
    assert server.requests("/m.gguf")[-1].range == "bytes=1000000-"
    assert dest.read_bytes() == BODY and not part_path(dest).exists()


def test_server_ignoring_range_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/m.gguf", BODY)
    server.fault("/m.gguf", Fault(ignore_range=True))
    dest = tmp_path / "m.gguf"
    part_path(dest).write_bytes(b"GGUF" + b"stale bytes that must not survive")

    run(lambda: download(url, dest, sha256=BODY_SHA))

    assert server.requests("/m.gguf")[0].range is not None
    assert dest.read_bytes() == BODY


def test_complete_part_is_verified_not_refetched(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/m.gguf", BODY)
    dest = tmp_path / "m.gguf"
    part_path(dest).write_bytes(BODY)

    run(lambda: download(url, dest, expected_size=len(BODY), sha256=BODY_SHA))

    assert server.requests("/m.gguf")[0].range == f"bytes={len(BODY)}-"  # answered 416
    assert dest.read_bytes() == BODY and not part_path(dest).exists()


def test_404_says_the_file_does_not_exist(server: FileServer, tmp_path: Path) -> None:
    url = server.url + "/org/repo/resolve/main/missing.gguf"
    with pytest.raises(DownloadError, match="does not exist") as info:
        run(lambda: download(url, tmp_path / "x.gguf"))
    assert url in str(info.value)
    assert not (tmp_path / "x.gguf").exists() and not part_path(tmp_path / "x.gguf").exists()


def test_gated_repo_suggests_hf_token(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/gated.gguf", BODY)
    server.fault("/gated.gguf", Fault(status=403))
    with pytest.raises(DownloadError, match="HF_TOKEN"):
        run(lambda: download(url, tmp_path / "g.gguf"))


def test_hf_token_is_sent_to_the_hf_endpoint_only(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    url = server.add("/m.gguf", BODY)

    run(lambda: download(url, tmp_path / "m.gguf"))

    assert server.requests("/m.gguf")[0].headers.get("authorization") == "Bearer hf_secret"
    assert auth_headers("https://huggingface.co/a/b/resolve/main/c.gguf") == {"Authorization": "Bearer hf_secret"}
    assert auth_headers("https://example.com/c.gguf") == {}


def test_html_instead_of_gguf_is_rejected(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/m.gguf", BODY)
    server.fault("/m.gguf", Fault(html=True))
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match=r"is not a GGUF file \(got HTML\?\)"):
        run(lambda: download(url, dest))
    assert not dest.exists() and not part_path(dest).exists()


def test_hash_mismatch_leaves_no_file(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/m.gguf", BODY)
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        run(lambda: download(url, dest, sha256="0" * 64))
    assert not dest.exists() and not part_path(dest).exists()


def test_wrong_size_is_rejected(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/m.gguf", BODY)
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match=f"{len(BODY) + 1} were expected"):
        run(lambda: download(url, dest, expected_size=len(BODY) + 1))
    assert not dest.exists()


def test_unreachable_host_fails_fast(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/m.gguf"
    with pytest.raises(DownloadError, match="Cannot reach"):
        run(lambda: download(url, tmp_path / "m.gguf", retry_delay_s=10), timeout=5)


def test_redirects_are_followed(server: FileServer, tmp_path: Path) -> None:
    server.add("/cdn/blob", BODY)
    url = server.redirect("/org/repo/resolve/main/m.gguf", server.url + "/cdn/blob")
    run(lambda: download(url, tmp_path / "m.gguf", sha256=BODY_SHA))
    assert (tmp_path / "m.gguf").read_bytes() == BODY


def test_server_errors_are_retried_then_reported(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/m.gguf", BODY)
    server.fault("/m.gguf", *[Fault(status=503)] * 5)
    with pytest.raises(DownloadError, match=r"failed after 2 retries.*503"):
        run(lambda: download(url, tmp_path / "m.gguf", retries=2, retry_delay_s=0))
    assert len(server.requests("/m.gguf")) == 3


def test_concurrent_downloads_of_one_file_do_not_collide(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/m.gguf", BODY)
    dest = tmp_path / "m.gguf"

    async def both() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(lambda: download(url, dest, sha256=BODY_SHA))

    run(both)
    assert dest.read_bytes() == BODY
    assert len(server.requests("/m.gguf")) == 1  # the second waited on the lock, then found the file
    assert lock_path(dest).exists()


# --- ensure_model(): specs resolved through HF_ENDPOINT -----------------------------------------------


def test_hf_shorthand_downloads_through_hf_endpoint(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.add("/org/tiny-GGUF/resolve/main/tiny-Q4_K_M.gguf", BODY)

    model = run(lambda: ensure_model("org/tiny-GGUF/tiny-Q4_K_M.gguf", models_dir=tmp_path))

    assert model.name == "tiny-Q4_K_M" and model.entry is None
    assert model.path == tmp_path / "tiny-Q4_K_M.gguf" and model.path.read_bytes() == BODY


def test_hf_url_is_fetched_from_hf_endpoint(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.add("/org/tiny-GGUF/resolve/v1.0/sub/tiny.gguf", BODY)

    model = run(
        lambda: ensure_model(
            "https://huggingface.co/org/tiny-GGUF/blob/v1.0/sub/tiny.gguf?download=true", models_dir=tmp_path
        )
    )

    assert model.name == "tiny" and model.path == tmp_path / "tiny.gguf"
    assert [r.path for r in server.requests()] == ["/org/tiny-GGUF/resolve/v1.0/sub/tiny.gguf"]


def test_existing_file_is_reused_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    (tmp_path / "tiny.gguf").write_bytes(BODY)
    model = run(lambda: ensure_model("org/tiny-GGUF/tiny.gguf", models_dir=tmp_path))
    assert model.path == tmp_path / "tiny.gguf"


def test_part_file_is_never_mistaken_for_a_finished_file(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part_path(tmp_path / "tiny.gguf").write_bytes(BODY)  # complete bytes, but still a .part

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(DownloadError, match="Cannot reach"):
        run(lambda: ensure_model("org/tiny-GGUF/tiny.gguf", models_dir=tmp_path))
    assert not (tmp_path / "tiny.gguf").exists()

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.add("/org/tiny-GGUF/resolve/main/tiny.gguf", BODY)
    model = run(lambda: ensure_model("org/tiny-GGUF/tiny.gguf", models_dir=tmp_path))
    assert server.requests()[0].range == f"bytes={len(BODY)}-"
    assert model.path.read_bytes() == BODY


def test_catalog_model_and_its_draft(server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.add("/Qwen/Qwen2.5-3B-Instruct-GGUF/resolve/main/qwen2.5-3b-instruct-q4_k_m.gguf", BODY)
    server.add("/Qwen/Qwen2.5-0.5B-Instruct-GGUF/resolve/main/qwen2.5-0.5b-instruct-q4_k_m.gguf", BODY[:1000])

    model, draft = run(lambda: ensure_with_draft("qwen2.5-3b", models_dir=tmp_path))

    assert model.name == "Qwen2.5-3B-Instruct-Q4_K_M" and model.entry is by_name(model.name)
    assert model.path == tmp_path / "Qwen2.5-3B-Instruct-Q4_K_M.gguf"
    assert draft is not None and draft.name == "Qwen2.5-0.5B-Instruct-Q4_K_M"
    assert draft.path.read_bytes() == BODY[:1000]


def test_split_gguf_fetches_every_shard(server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    for i in (1, 2, 3):
        server.add(f"/org/big-GGUF/resolve/main/Q4/big-0000{i}-of-00003.gguf", b"GGUF" + bytes([i]) * 100)

    model = run(lambda: ensure_model("org/big-GGUF/Q4/big-00001-of-00003.gguf", models_dir=tmp_path))

    assert model.name == "big" and model.path == tmp_path / "big-00001-of-00003.gguf"
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == [f"big-0000{i}-of-00003.gguf" for i in (1, 2, 3)]


def test_local_paths(tmp_path: Path) -> None:
    good = tmp_path / "mine.gguf"
    good.write_bytes(BODY[:100])
    bad = tmp_path / "page.gguf"
    bad.write_bytes(b"<html>")

    assert run(lambda: ensure_model(str(good), models_dir=tmp_path / "m")).name == "mine"
    with pytest.raises(CorruptModel):
        run(lambda: ensure_model(str(bad), models_dir=tmp_path / "m"))
    with pytest.raises(ModelNotFound, match="does not exist"):
        run(lambda: ensure_model(str(tmp_path / "nope.gguf"), models_dir=tmp_path / "m"))


def test_bare_file_name_is_found_in_models_dir(tmp_path: Path) -> None:
    (tmp_path / "custom-model.gguf").write_bytes(BODY[:100])
    model = run(lambda: ensure_model("custom-model.gguf", models_dir=tmp_path))
    assert model.name == "custom-model" and model.path == tmp_path / "custom-model.gguf"

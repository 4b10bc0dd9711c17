"""Resumable, verified downloads of GGUF files over HTTP.

`download(url, dest)` streams into `dest.part`, resumes it with a Range request when it already exists
(also across runs), retries transient failures from where it stopped, checks the size, the sha256 and
the GGUF magic, and only then renames the `.part` to `dest`: a file at `dest` is always complete. A
lock file next to `dest` keeps two processes from writing the same `.part`. Free space is checked
before the first byte whenever the size is known; a full disk (before or during) is a `DiskFull`, and the
`.part` is kept for resuming only when the server honours Range. Every failure is a `DownloadError` that
says what happened and what to do; nothing here knows about catalogs or specs.

One responsibility, getting one verified file over HTTP, with the Hugging Face endpoint and token it needs; the
transfer's states (resume, retry, disk full, verification) belong together, so it runs past ~400 lines.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx2

from inference.diskspace import MODELS_HINT, free_bytes, is_disk_full, mb, require_space
from mesh_mcp.errors import DiskFull, DownloadError

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = [
    "GGUF_MAGIC",
    "ProgressFn",
    "auth_headers",
    "download",
    "file_lock",
    "hash_file",
    "hf_endpoint",
    "is_hf_host",
    "lock_path",
    "part_path",
]

ProgressFn = Callable[[str, int, int | None], None]
"""Progress callback: (label, bytes done, bytes total or None when unknown)."""

GGUF_MAGIC = b"GGUF"
_WRITE_CHUNK = 4 * 1024 * 1024
_HASH_CHUNK = 8 * 1024 * 1024
_DEFAULT_HF_ENDPOINT = "https://huggingface.co"
_HF_HOSTS = ("huggingface.co", "hf.co")


def hf_endpoint() -> str:
    """The Hugging Face endpoint: `HF_ENDPOINT` (tests point it at a local server) or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or _DEFAULT_HF_ENDPOINT).rstrip("/")


def _hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def is_hf_host(host: str) -> bool:
    """Whether `host` is Hugging Face's (huggingface.co, hf.co, subdomains) or `HF_ENDPOINT`'s."""
    host = host.lower()
    endpoint_host = (urlsplit(hf_endpoint()).hostname or "").lower()
    return host == endpoint_host or any(host == h or host.endswith("." + h) for h in _HF_HOSTS)


def _is_hf_host(url: str) -> bool:
    return is_hf_host(urlsplit(url).hostname or "")


def auth_headers(url: str) -> dict[str, str]:
    """`Authorization: Bearer $HF_TOKEN` for Hugging Face URLs when a token is set; nothing otherwise.

    The token is never sent to other hosts; redirects to another origin drop it (httpx2 does that).
    """
    token = _hf_token()
    if token and _is_hf_host(url):
        return {"Authorization": f"Bearer {token}"}
    return {}


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def lock_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".lock")


@asynccontextmanager
async def file_lock(dest: Path, *, poll_s: float = 0.2) -> AsyncIterator[None]:
    """Hold an exclusive `flock` on `dest`'s lock file; waits (cancellably) while another holder has it."""
    path = lock_path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await anyio.sleep(poll_s)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def hash_file(path: Path, hasher: _Hash | None = None) -> _Hash:
    """sha256 of a file, read in chunks (blocking: run it in a worker thread)."""
    h = hasher if hasher is not None else hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_CHUNK):
            h.update(block)
    return h


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(len(GGUF_MAGIC))


def _not_gguf(url: str, head: bytes, content_type: str | None = None) -> DownloadError:
    kind = f" (Content-Type {content_type})" if content_type else ""
    return DownloadError(
        f"{url} is not a GGUF file (got HTML?){kind}: it starts with {head[:16]!r}. "
        "Check that the URL points at the file itself (a /resolve/ URL on Hugging Face, not a web page)."
    )


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) from `bytes START-END/TOTAL` or `bytes */TOTAL`; None for what is missing."""
    if not value or not value.strip().lower().startswith("bytes"):
        return None, None
    spec = value.strip()[5:].strip()
    span, _, total_text = spec.partition("/")
    total = int(total_text) if total_text.strip().isdigit() else None
    start_text = span.split("-", 1)[0].strip()
    start = int(start_text) if start_text.isdigit() else None
    return start, total


def _int_header(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _status_error(status: int, url: str) -> DownloadError:
    if status == 404:
        return DownloadError(
            f"{url} does not exist (HTTP 404): the file is not there. "
            "Check the repository, the file name and the revision."
        )
    if status in (401, 403):
        refused = " HF_TOKEN is set but was refused." if _hf_token() else ""
        return DownloadError(
            f"Access to {url} was denied (HTTP {status}): the repository is gated or private.{refused} "
            "Accept the model's license on its Hugging Face page, then set HF_TOKEN to an access token "
            "with read permission."
        )
    return DownloadError(f"HTTP {status} from {url}.")


class _Retryable(Exception):
    """A transient failure; the next attempt resumes from whatever the .part file holds."""


class _Transfer:
    """One download's state across attempts: the .part file and a hash of exactly its bytes."""

    def __init__(
        self,
        url: str,
        part: Path,
        *,
        label: str,
        expected_size: int | None,
        want_hash: bool,
        on_progress: ProgressFn | None,
        magic: bytes | None = GGUF_MAGIC,
        space_hint: str = MODELS_HINT,
    ) -> None:
        self.magic = magic
        self.space_hint = space_hint
        self.total: int | None = expected_size  # the file's size, once known
        self.resumable = False  # whether the server was seen to honour Range (206, or Accept-Ranges: bytes)
        self.url = url
        self.part = part
        self.label = label
        self.expected_size = expected_size
        self.want_hash = want_hash
        self.on_progress = on_progress
        self.hasher: _Hash | None = None
        self.hashed = 0  # how many bytes of the .part the hasher has seen

    def progress(self, done: int, total: int | None) -> None:
        if self.on_progress is not None:
            self.on_progress(self.label, done, total)

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.hasher, self.hashed = None, 0

    def require_room(self, total: int) -> None:
        """`DiskFull` before a byte is written when the rest of a `total`-byte file cannot fit; a .part is kept."""
        have = _size(self.part)
        try:
            require_space(self.label, [(self.part.parent, total - have)], hint=self.space_hint)
        except DiskFull as exc:
            if not have:
                raise
            raise DiskFull(
                f"{exc} {mb(have)} already downloaded are kept in {self.part}; the download resumes from there."
            ) from None

    def write_failed(self, exc: OSError) -> DownloadError:
        """What a failed write of the .part means to the user. On a full disk the .part is kept only when the
        server honours Range (so freeing space and running again resumes it); otherwise it is deleted, since
        it would only keep the disk full."""
        if not is_disk_full(exc):
            return DownloadError(
                f"Cannot write {self.part} while downloading {self.label}: {exc.strerror or exc}. Check that "
                f"{self.part.parent} is a directory this user can write to."
            )
        have = _size(self.part)
        free = free_bytes(self.part.parent)  # before a .part is deleted: how full the disk was
        if have and self.resumable:
            kept = f"kept {mb(have)} in {self.part}; the download resumes from there"
        elif have:
            self.discard()
            host = urlsplit(self.url).netloc or self.url
            kept = f"deleted the partial {self.part.name} ({mb(have)}) because {host} cannot resume a download"
        else:
            kept = "nothing was kept"
        full = "is over its disk quota" if exc.errno == errno.EDQUOT else "is full"
        of = f" of {mb(self.total, up=True)}" if self.total is not None else ""
        left = f" ({mb(free)} free)" if free is not None else ""
        hint = self.space_hint[:1].upper() + self.space_hint[1:]
        return DiskFull(
            f"The disk holding {self.part.parent} {full}{left}: downloading {self.label} stopped after {mb(have)}"
            f"{of}; {kept}. {hint}, then run again."
        )

    async def sync_hash(self) -> None:
        """Bring the hasher in line with the .part file (re-hashing it after a restart or on resume)."""
        if not self.want_hash:
            return
        size = _size(self.part)
        if self.hasher is not None and self.hashed == size:
            return
        if size == 0:
            self.hasher, self.hashed = hashlib.sha256(), 0
            return
        self.hasher = await anyio.to_thread.run_sync(hash_file, self.part)
        self.hashed = size

    def _write(self, f: IO[bytes], data: bytes | bytearray) -> None:
        f.write(data)
        if self.hasher is not None:
            self.hasher.update(data)
            self.hashed += len(data)

    async def attempt(self, client: httpx2.AsyncClient, headers: Mapping[str, str]) -> None:
        """One GET; returns when the .part holds the whole file, raises `_Retryable` or `DownloadError`."""
        have = _size(self.part)
        await self.sync_hash()
        request_headers = {"Accept-Encoding": "identity", **headers}
        if have:
            request_headers["Range"] = f"bytes={have}-"
        async with client.stream("GET", self.url, headers=request_headers, follow_redirects=True) as resp:
            status = resp.status_code
            if status == 416 and have:
                _, total = _content_range(resp.headers.get("content-range"))
                if total is None or total == have:
                    self.progress(have, have)
                    return  # the .part is already complete; the caller verifies it
                self.discard()
                raise _Retryable(f"the server refused to resume at byte {have} (file is {total} bytes)")
            if status == 429 or status >= 500:
                raise _Retryable(f"HTTP {status} from {self.url}")
            if status == 206:
                self.resumable = True
                start, total = _content_range(resp.headers.get("content-range"))
                if start != have:
                    self.discard()
                    raise _Retryable(f"the server resumed at byte {start}, not {have}; restarting")
                offset = have
            elif status == 200:
                self.resumable = "bytes" in resp.headers.get("accept-ranges", "").lower()
                total = _int_header(resp.headers.get("content-length"))
                if have:  # the server ignored Range: start again from byte 0
                    self.discard()
                    await self.sync_hash()
                offset = 0
            else:
                raise _status_error(status, self.url)

            if self.expected_size is not None and total is not None and total != self.expected_size:
                self.discard()
                raise DownloadError(
                    f"{self.url} is {total} bytes but {self.expected_size} were expected: the file on "
                    "the server is not the one the catalog describes."
                )
            if total is not None:
                self.total = total
                self.require_room(total)
            self.progress(offset, total)
            await self._receive(resp, offset, total)

    async def _receive(self, resp: httpx2.Response, offset: int, total: int | None) -> None:
        buf = bytearray()
        magic = self.magic or b""
        head_ok = offset >= len(magic)
        bad_head: bytes | None = None
        with self.part.open("ab" if offset else "wb") as f:
            try:
                async for chunk in resp.aiter_bytes():
                    buf += chunk
                    if not head_ok and len(buf) >= len(magic):
                        if bytes(buf[: len(magic)]) != magic:
                            bad_head = bytes(buf[:16])
                            buf.clear()
                            break
                        head_ok = True
                    if len(buf) >= _WRITE_CHUNK:
                        data, buf = bytes(buf), bytearray()
                        await anyio.to_thread.run_sync(self._write, f, data)
                        offset += len(data)
                        self.progress(offset, total)
            finally:
                # Keep what arrived before a failure or cancellation, so the next attempt resumes after it.
                if buf:
                    self._write(f, buf)
                    offset += len(buf)
                    self.progress(offset, total)
        if not head_ok:  # a body that is not GGUF, or shorter than the 4-byte magic
            self.discard()
            raise _not_gguf(
                self.url, bad_head if bad_head is not None else bytes(buf), resp.headers.get("content-type")
            )
        if total is not None and offset < total:
            raise _Retryable(f"the connection closed after {offset} of {total} bytes")

    async def verify(self, sha256: str | None) -> None:
        """Size, magic and hash of the finished .part; a bad .part is deleted so a retry starts clean."""
        size = _size(self.part)
        if self.expected_size is not None and size != self.expected_size:
            self.discard()
            raise DownloadError(
                f"{self.url} gave {size} bytes but {self.expected_size} were expected; "
                "the partial file was deleted, run again to start over."
            )
        head = _read_head(self.part)
        if self.magic is not None and head != self.magic:
            self.discard()
            raise _not_gguf(self.url, head)
        if sha256 is not None:
            await self.sync_hash()
            assert self.hasher is not None
            got = self.hasher.hexdigest()
            if got != sha256.lower():
                self.discard()
                raise DownloadError(
                    f"sha256 mismatch for {self.url}: expected {sha256}, got {got}. "
                    "The corrupt download was deleted; run again to fetch it afresh."
                )


def _fsync_and_rename(part: Path, dest: Path) -> None:
    with part.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)


def _unreachable(url: str, exc: Exception) -> DownloadError:
    host = urlsplit(url).netloc or url
    hint = " (HF_ENDPOINT is set)" if os.environ.get("HF_ENDPOINT") and _is_hf_host(url) else ""
    return DownloadError(
        f"Cannot reach {host}{hint} to download {url}: {exc or type(exc).__name__}. "
        "Check the network connection and any proxy settings."
    )


async def download(
    url: str,
    dest: Path,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    client: httpx2.AsyncClient | None = None,
    on_progress: ProgressFn | None = None,
    retries: int = 3,
    label: str | None = None,
    headers: Mapping[str, str] | None = None,
    retry_delay_s: float = 1.0,
    magic: bytes | None = GGUF_MAGIC,
    space_hint: str = MODELS_HINT,
) -> Path:
    """Download `url` to `dest` (resuming `dest.part`), verify it, and return `dest`.

    `magic` is what the file must start with (GGUF by default; None for other files, e.g. an sdist).

    If `dest` already exists (for example another process finished it while this one waited for the
    lock) and matches `expected_size`, it is returned untouched. `retries` is how many failed attempts
    in a row are retried; an attempt that received new bytes restarts the count. `headers` defaults to
    `auth_headers(url)`.

    Free space is checked before the first byte whenever the size is known (`expected_size`, then the
    response's length): `DiskFull` with the numbers, ending in `space_hint` (what the user can do). A full
    disk mid-download is a `DiskFull` too (see `_Transfer.write_failed` for what happens to the .part); any
    other failed write a `DownloadError`. Neither is retried.
    """
    try:
        return await _download(
            url,
            dest,
            expected_size=expected_size,
            sha256=sha256,
            client=client,
            on_progress=on_progress,
            retries=retries,
            label=label or dest.name,
            headers=headers,
            retry_delay_s=retry_delay_s,
            magic=magic,
            space_hint=space_hint,
        )
    except OSError as exc:  # creating the directory or the lock file; the transfer's own writes are explained
        full = " (the disk is full)" if is_disk_full(exc) else ""
        error = DiskFull if full else DownloadError
        raise error(
            f"Cannot write in {dest.parent} to download {label or dest.name}: {exc.strerror or exc}{full}. "
            f"{space_hint[:1].upper() + space_hint[1:] if full else 'Check that the directory is writable'}."
        ) from exc


async def _download(
    url: str,
    dest: Path,
    *,
    expected_size: int | None,
    sha256: str | None,
    client: httpx2.AsyncClient | None,
    on_progress: ProgressFn | None,
    retries: int,
    label: str,
    headers: Mapping[str, str] | None,
    retry_delay_s: float,
    magic: bytes | None,
    space_hint: str,
) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    async with file_lock(dest):
        if dest.exists() and (expected_size is None or _size(dest) == expected_size):
            size = _size(dest)
            if on_progress is not None:
                on_progress(label, size, size)
            return dest
        transfer = _Transfer(
            url,
            part_path(dest),
            label=label,
            expected_size=expected_size,
            want_hash=sha256 is not None,
            on_progress=on_progress,
            magic=magic,
            space_hint=space_hint,
        )
        if expected_size is not None:
            transfer.require_room(expected_size)
        request_headers = dict(auth_headers(url) if headers is None else headers)
        owned = client is None
        http = client or httpx2.AsyncClient(follow_redirects=True, timeout=httpx2.Timeout(30.0, read=120.0))
        try:
            await _transfer(transfer, http, request_headers, retries=retries, retry_delay_s=retry_delay_s)
            await transfer.verify(sha256)
            await anyio.to_thread.run_sync(_fsync_and_rename, transfer.part, dest)
        except OSError as exc:
            raise transfer.write_failed(exc) from exc
        finally:
            if owned:
                await http.aclose()
    return dest


async def _transfer(
    transfer: _Transfer,
    http: httpx2.AsyncClient,
    request_headers: Mapping[str, str],
    *,
    retries: int,
    retry_delay_s: float,
) -> None:
    """Attempts until the .part holds the whole file; transient failures are retried with backoff."""
    url = transfer.url
    failures = 0
    first = True
    while True:
        before = _size(transfer.part)
        try:
            await transfer.attempt(http, request_headers)
            return
        except (httpx2.ConnectError, httpx2.ConnectTimeout) as exc:
            if first:
                raise _unreachable(url, exc) from exc
            error: Exception = exc
        except (httpx2.TransportError, _Retryable) as exc:
            error = exc
        finally:
            first = False
        failures = 1 if _size(transfer.part) > before else failures + 1
        if failures > retries:
            have = _size(transfer.part)
            kept = f" {have} bytes are kept; run again to resume." if have else ""
            raise DownloadError(
                f"Downloading {url} failed after {retries} retries: {error or type(error).__name__}." + kept
            ) from error
        await anyio.sleep(min(retry_delay_s * 2 ** (failures - 1), 30.0))

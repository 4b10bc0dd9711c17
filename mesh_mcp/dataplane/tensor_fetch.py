"""The tensors of a layer range from a mesh peer that has the GGUF, into this node's rpc-server cache.

A worker asked to hold layers of a model it does not have on disk gets exactly the tensors llama-server
will offer its rpc-server by hash (`rpc_cache.hashed_tensors` for its range) from a node that has the
file — the host that asked, normally — instead of the whole model from the internet. Once they are in
its cache the load sends (almost) no weights, as when the worker seeds its cache from its own copy.

The bytes go over the RPC data plane (`dataplane/`: TLS 1.3 over TCP after the mesh handshake, so
only an authenticated member of the mesh is served; ~0.6 GB/s on loopback, where an aioquic stream
manages 15 MB/s) as a request/answer service, `TensorService`, on the data plane server of every node
that lends or serves. Frames are `u32 big-endian length | JSON`; tensor bytes follow their frame raw:

    worker → {"type": "tensors", "file": NAME, "size": BYTES, "layers": [FIRST, LAST] | null}
    peer   → {"type": "refused", "reason": TEXT}, and closes
           | {"type": "tensors", "tensors": [[TENSOR, BYTES, HASH], ...]}    HASH: FNV-1a-64, 16 hex digits
    worker → {"type": "want", "tensors": [INDEX, ...]}                       the ones its cache lacks
    peer   → per index asked, in that order: {"tensor": TENSOR, "size": BYTES, "hash": HASH}, BYTES bytes
    worker closes when it has them all; the peer, having waited for that, closes too.

The peer serves only a plain `*.gguf` name directly in its models directory (no path, no `..`), only
when the size matches (the same file as the host's), and only whole tensors of that file's layers —
never an offset or a path the asker chooses. It hashes the tensors it lists (on all cores) unless its
seed manifest (`rpc_cache.tensor_hashes`, shared with `seed`) already knows them.

The worker skips tensors its cache already holds (a re-plan, an earlier interrupted fetch), and writes
each one as it arrives through `rpc_cache.IncomingTensor`: a temporary file, hashed on the way, renamed
to its hash only when size and hash match the listing — a wrong byte is an error, never a cache entry
rpc-server would trust. Entries completed before a failure stay (they are verified).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from inference.diskspace import HOME_HINT, disk_full_is_an_error, require_space
from mesh_mcp.dataplane.services import Stream, connect
from mesh_mcp.dataplane.tls import CredentialsProvider
from mesh_mcp.errors import BackendError, ModelError, ProtocolError
from mesh_mcp.mesh import handshake as hs
from mesh_mcp.mesh.identity import Identity
from mesh_mcp.mesh.wire import field as msg_field

if TYPE_CHECKING:
    from inference.rpc_cache import HashedTensor, IncomingTensor

log = logging.getLogger("mesh_llm.split")

REQUEST = "tensors"  # the data-plane service name (request "type")
LISTING_LIMIT = 16 << 20  # the listing frame: ~70 bytes a tensor
CHUNK = 1 << 20
MAX_LAYER = 1 << 20

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class FetchError(BackendError):
    """No tensors from that peer: it refused, could not be reached, or the transfer broke."""


# --- the serving side -----------------------------------------------------------------------------------


class TensorService:
    """Serves the tensors of the GGUFs in `models_dir` (a `services.Service` of the data plane under `REQUEST`).
    `cache_dir` holds the seed manifest that remembers their hashes."""

    def __init__(self, models_dir: Path, cache_dir: Path, *, threshold: int | None = None) -> None:
        self.models_dir, self.cache_dir, self.threshold = models_dir, cache_dir, threshold  # None: the build's
        self.served_bytes = 0  # tensor bytes sent, all requests
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any], stream: Stream) -> None:
        from inference.rpc_cache import tensor_hashes  # numpy: loaded when first asked, not at start-up

        who = stream.peer.node_id
        try:
            path, tensors = self._resolve(request)
            hashes = tensor_hashes(path, self.cache_dir, tensors)
        except (ProtocolError, ModelError, OSError, ValueError) as exc:
            log.warning("tensors of %r for %s: refused: %s", request.get("file"), who, exc)
            stream.send_json(hs.refused(str(exc)))
            return
        stream.send_json({"type": "tensors", "tensors": [[t.name, t.size, hashes[t.name]] for t in tensors]})
        want = stream.read_json()
        indices = want.get("tensors")
        if (
            want.get("type") != "want"
            or not isinstance(indices, list)
            or not all(type(i) is int and 0 <= i < len(tensors) for i in indices)
            or len(set(indices)) != len(indices)
        ):
            raise ProtocolError("expected want: distinct indices into the listing")
        started, sent = time.perf_counter(), 0
        buf = memoryview(bytearray(CHUNK))
        with open(path, "rb") as fh:
            for i in indices:
                t = tensors[i]
                stream.send_json({"tensor": t.name, "size": t.size, "hash": hashes[t.name]})
                done = 0
                while done < t.size:
                    n = os.preadv(fh.fileno(), [buf[: min(CHUNK, t.size - done)]], t.offset + done)
                    if n <= 0:
                        raise OSError(f"{path} ended inside {t.name}")
                    stream.send(buf[:n])
                    done += n
                sent += t.size
                with self._lock:
                    self.served_bytes += t.size
        stream.wait_closed()
        seconds = time.perf_counter() - started
        log.info(
            "sent %d tensor(s) of %s (%.1f MB) to %s in %.1f s (%.0f MB/s)",
            len(indices),
            path.name,
            sent / 1e6,
            who,
            seconds,
            sent / 1e6 / max(seconds, 1e-9),
        )

    def _resolve(self, request: dict[str, Any]) -> tuple[Path, list[HashedTensor]]:
        from inference.rpc_cache import HASH_THRESHOLD, hashed_tensors

        name = msg_field(request, "file", str, 255)
        size = msg_field(request, "size", int)
        if Path(name).name != name or name.startswith(".") or "\\" in name or "\0" in name:
            raise ProtocolError(f"{name!r} is not a plain file name")
        if not name.endswith(".gguf"):
            raise ProtocolError(f"{name!r} is not a GGUF")
        path = self.models_dir / name
        if not path.is_file() or path.stat().st_size != size:
            raise ModelError(f"this node does not have {name} ({size} bytes)")
        threshold = HASH_THRESHOLD if self.threshold is None else self.threshold
        return path, hashed_tensors(path, _layers(request.get("layers")), threshold=threshold)


def _layers(value: object) -> range | None:
    if value is None:
        return None
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(type(x) is int and 0 <= x <= MAX_LAYER for x in value)
        and value[0] <= value[1]
    ):
        raise ProtocolError("layers is [first, last] or null")
    return range(value[0], value[1] + 1)


# --- the fetching side ----------------------------------------------------------------------------------


@dataclass
class FetchResult:
    peer: str
    files: dict[str, str] = field(default_factory=dict)  # tensor name -> cache file name, the whole range
    fetched: int = 0  # cache entries written now
    fetched_bytes: int = 0
    present: int = 0  # already in the cache
    present_bytes: int = 0
    seconds: float = 0.0

    @property
    def mb_s(self) -> float:
        return self.fetched_bytes / 1e6 / max(self.seconds, 1e-9)


class TensorFetch:
    """One fetch of `file`'s tensors of `layers` from the data plane at `remote` into the rpc cache
    `cache_dir` (`RpcServer.cache_dir`). `run()` blocks (call it from a thread); `abort()` ends it
    from any thread. `on_progress(done, total)` counts bytes received."""

    def __init__(
        self,
        identity: Identity,
        credentials: CredentialsProvider,
        remote: str,
        *,
        file: str,
        size: int,
        layers: tuple[int, int] | None,
        cache_dir: Path,
        expect_node_id: str | None = None,
        bind_host: str | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        self.identity, self.credentials, self.remote = identity, credentials, remote
        self.file, self.size, self.layers, self.cache_dir = file, size, layers, cache_dir
        self.expect_node_id, self.bind_host, self.on_progress = expect_node_id, bind_host, on_progress
        self._stream: Stream | None = None
        self._aborted = threading.Event()

    def abort(self) -> None:
        self._aborted.set()
        if self._stream is not None:
            self._stream.abort()

    def run(self) -> FetchResult:
        """FetchError when the peer refuses, cannot be reached or the transfer breaks; CorruptTransfer
        when bytes are not the tensor announced; DiskFull when the missing tensors do not fit the cache's disk
        (checked before asking for them) or it fills up meanwhile. Verified entries written before a failure stay."""
        what = f"{self.file} from {self.expect_node_id or 'the peer'} at {self.remote}"
        request = {"type": REQUEST, "file": self.file, "size": self.size, "layers": self.layers and list(self.layers)}
        started = time.perf_counter()
        try:
            stream = connect(
                self.identity,
                self.credentials,
                self.remote,
                request,
                expect_node_id=self.expect_node_id,
                bind_host=self.bind_host,
            )
        except (OSError, ProtocolError) as exc:
            raise FetchError(f"cannot fetch tensors of {what}: {exc or type(exc).__name__}") from exc
        self._stream = stream
        if self._aborted.is_set():
            stream.abort()
        try:
            with stream, disk_full_is_an_error(f"fetching the tensors of {what}", self.cache_dir):
                result = self._receive(stream)
        except OSError as exc:
            raise FetchError(f"the transfer of {what} broke: {exc or type(exc).__name__}") from exc
        except ProtocolError as exc:
            raise FetchError(f"the peer sending {what} broke the protocol: {exc}") from exc
        result.seconds = time.perf_counter() - started
        return result

    def _receive(self, stream: Stream) -> FetchResult:
        from inference.rpc_cache import IncomingTensor, cache_files_dir, fsync_dir

        answer = stream.read_json(LISTING_LIMIT)
        if answer.get("type") == "refused":
            raise FetchError(f"{stream.peer.node_id} does not send {self.file}: {answer.get('reason', '')}")
        if answer.get("type") != "tensors":
            raise ProtocolError("expected the tensor listing")
        listing = _listing(answer.get("tensors"))
        files_dir = cache_files_dir(self.cache_dir)
        files_dir.mkdir(parents=True, exist_ok=True)
        result = FetchResult(peer=stream.peer.node_id, files={name: h for name, _, h in listing})
        want: list[int] = []
        claimed: set[str] = set()  # identical tensors share one file
        for i, (_, size, h) in enumerate(listing):
            if h in claimed:
                continue
            claimed.add(h)
            if _present(files_dir / h, size):
                result.present += 1
                result.present_bytes += size
            else:
                want.append(i)
        total, done = sum(listing[i][1] for i in want), 0
        require_space(f"the tensors of {self.file}", [(files_dir, total)], hint=HOME_HINT)
        stream.send_json({"type": "want", "tensors": want})
        with _Sink() as sink:
            for i in want:
                name, size, h = listing[i]
                header = stream.read_json()
                if (header.get("tensor"), header.get("size"), header.get("hash")) != (name, size, h):
                    raise ProtocolError(f"expected {name} next, got {header.get('tensor')!r}")
                sink.check()  # a hash mismatch ends the fetch at the next tensor
                entry, got = IncomingTensor(files_dir, h, size), 0
                try:
                    while got < size:
                        buf = sink.buffer()
                        n = stream.read_into(buf[: min(len(buf), size - got)])
                        if not n:
                            sink.give_back(buf)
                            raise FetchError(f"the peer stopped sending during {name} ({got} of {size} bytes)")
                        sink.write(entry, buf, n)
                        got += n
                        done += n
                        if self.on_progress is not None:
                            self.on_progress(done, total)
                except BaseException:
                    sink.drop(entry)
                    raise
                sink.end(entry)
                result.fetched += 1
                result.fetched_bytes += size
        if want:
            fsync_dir(files_dir)
        return result


class _Sink:
    """Received chunks into cache entries on two threads, so that the FNV-1a chain (~0.6 GB/s a core)
    and the disk's flushes overlap the TLS reads: one thread hashes and writes every entry's chunks in
    order and verifies it; the other fsyncs and renames verified entries. At most `BUFFERS` chunks are
    in flight. `close()` waits for both and raises the first error (a hash mismatch, a full disk)."""

    BUFFERS = 8

    def __init__(self) -> None:
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensor-fetch-write")
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensor-fetch-commit")
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(self.BUFFERS):
            self._free.put(memoryview(bytearray(CHUNK)))
        self._futures: list[Future[None]] = []
        self._lock = threading.Lock()

    def buffer(self) -> memoryview:
        return self._free.get()

    def give_back(self, buf: memoryview) -> None:
        self._free.put(buf)

    def write(self, entry: IncomingTensor, buf: memoryview, n: int) -> None:
        self._submit(self._writer, self._write, entry, buf, n)

    def end(self, entry: IncomingTensor) -> None:
        self._submit(self._writer, self._end, entry)

    def drop(self, entry: IncomingTensor) -> None:
        self._submit(self._writer, entry.discard)

    def check(self) -> None:
        with self._lock:
            failed = next((f for f in self._futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            failed.result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._committer.shutdown(wait=True)
        for future in self._futures:
            future.result()

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            with contextlib.suppress(Exception):
                self.close()  # the error on its way out says more than a later one

    def _submit(self, pool: ThreadPoolExecutor, fn: Callable[..., None], *args: Any) -> None:
        future = pool.submit(fn, *args)
        with self._lock:
            self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
            self._futures.append(future)

    def _write(self, entry: IncomingTensor, buf: memoryview, n: int) -> None:
        try:
            entry.write(buf[:n])
        finally:
            self._free.put(buf)

    def _end(self, entry: IncomingTensor) -> None:
        entry.verify()
        self._submit(self._committer, entry.finish)


def _listing(value: object) -> list[tuple[str, int, str]]:
    from inference.rpc_cache import is_cache_file_name

    if not isinstance(value, list) or not all(
        isinstance(x, list)
        and len(x) == 3
        and isinstance(x[0], str)
        and type(x[1]) is int
        and x[1] >= 0
        and is_cache_file_name(x[2])
        for x in value
    ):
        raise ProtocolError("the listing is [[tensor, bytes, 16 hex digits], ...]")
    return [(x[0], x[1], x[2]) for x in value]


def _present(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size  # rpc-server trusts an entry's size too
    except FileNotFoundError:
        return False


async def fetch(job: TensorFetch) -> FetchResult:
    """Run `job` on a worker thread; cancelling aborts the transfer (the thread ends at once)."""
    try:
        return await anyio.to_thread.run_sync(job.run, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        job.abort()
        raise


__all__ = [
    "REQUEST",
    "FetchError",
    "FetchResult",
    "TensorFetch",
    "TensorService",
    "fetch",
]

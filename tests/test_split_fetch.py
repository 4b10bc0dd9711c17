"""A worker without the GGUF fetches the tensors of its layers from a mesh peer (mesh/tensor_fetch.py).

Against real sockets (a real DataPlaneServer, TLS and the mesh handshake): what a fetch writes into the
rpc cache is exactly what `seed()` writes for that range; a wrong byte is a hash mismatch and leaves no
entry; a broken transfer leaves no temporary file; the peer refuses paths, files it lacks and strangers.
End to end (slow): `--split 2` with a worker whose models directory is empty serves like solo, and the
load sends no weights."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from inference.rpc_cache import CorruptTransfer, cache_files_dir, hashed_tensors, seed
from mesh_mcp.dataplane.listener import DataPlaneServer
from mesh_mcp.dataplane.services import Stream
from mesh_mcp.dataplane.tensor_fetch import REQUEST, FetchError, FetchResult, TensorFetch, TensorService
from mesh_mcp.mesh.identity import Identity, load_or_create
from tests.conftest import SMOLLM
from tests.ggufgen import write_dense
from tests.harness import NodeProcess
from tests.test_dataplane import SECRET, creds, run
from tests.test_split import complete

LAYERS = (1, 2)
Spawn = Callable[..., NodeProcess]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    (models / "notes.txt").write_text("not a model")
    return write_dense(models / "tiny.gguf", n_layers=4, n_embd=256, n_ff=512)


@pytest.fixture
def peer(tmp_path: Path) -> Identity:
    return load_or_create(tmp_path / "peer")


def files(cache: Path) -> dict[str, bytes]:
    d = cache_files_dir(cache)
    return {p.name: p.read_bytes() for p in d.iterdir()} if d.is_dir() else {}


def fetch_from(
    service: Callable[[dict[str, Any], Stream], None],
    peer: Identity,
    worker: Identity,
    cache: Path,
    *,
    file: str = "tiny.gguf",
    size: int,
    layers: tuple[int, int] | None = LAYERS,
    worker_secret: bytes = SECRET,
    progress: list[tuple[int, int]] | None = None,
) -> FetchResult:
    """Serve `service` on a real data plane and fetch from it with a real client."""

    async def main() -> FetchResult:
        async with DataPlaneServer(peer, creds(peer), "127.0.0.1") as server:
            server.services[REQUEST] = service
            job = TensorFetch(
                worker,
                creds(worker, worker_secret),
                f"127.0.0.1:{server.port}",
                file=file,
                size=size,
                layers=layers,
                cache_dir=cache,
                expect_node_id=peer.node_id,
                on_progress=None if progress is None else lambda *a: progress.append(a),
            )
            return await anyio.to_thread.run_sync(job.run)

    result: FetchResult = run(main, 30)
    return result


def test_a_fetch_fills_the_cache_exactly_as_seeding_from_the_file_does(
    model: Path, peer: Identity, worker: Identity, tmp_path: Path
) -> None:
    seeded = seed(model, tmp_path / "seeded", range(LAYERS[0], LAYERS[1] + 1))
    assert len(seeded.files) >= 8, "every attention/FFN matrix of the tiny model is above the threshold"
    service = TensorService(model.parent, tmp_path / "peer-cache")
    progress: list[tuple[int, int]] = []
    size = model.stat().st_size
    got = fetch_from(service, peer, worker, tmp_path / "fetched", size=size, progress=progress)
    assert got.peer == peer.node_id and got.files == seeded.files
    assert files(tmp_path / "fetched") == files(tmp_path / "seeded")  # same names, same bytes, nothing else
    assert got.fetched == len(seeded.written) and got.fetched_bytes == seeded.bytes_written == service.served_bytes
    assert progress[-1] == (got.fetched_bytes, got.fetched_bytes)
    # the peer remembered the hashes (the manifest `seed` also uses); a second fetch sends nothing
    assert list((tmp_path / "peer-cache" / "rpc-seed").glob("*.json"))
    again = fetch_from(service, peer, worker, tmp_path / "fetched", size=size)
    assert again.fetched == 0 and again.present == len(seeded.files) and service.served_bytes == got.fetched_bytes
    # a wider range fetches only what is missing
    wider = fetch_from(service, peer, worker, tmp_path / "fetched", size=size, layers=(0, 4))
    assert wider.present == len(seeded.files) and wider.fetched == len(hashed_tensors(model)) - len(seeded.files)
    seed(model, tmp_path / "all", None)
    assert files(tmp_path / "fetched") == files(tmp_path / "all")


class Liar:
    """The real service, but the peer flips one byte of the `nth` tensor it sends (or stops inside it)."""

    def __init__(self, service: TensorService, nth: int, *, stop: bool = False) -> None:
        self.service, self.nth, self.stop = service, nth, stop

    def __call__(self, request: dict[str, Any], stream: Stream) -> None:
        real_send, counted = stream.send, [0, 0]  # tensor data chunks seen, bytes into the nth tensor

        def send(data: bytes | memoryview) -> None:
            counted[0] += 1
            if counted[0] == self.nth:
                if self.stop:
                    real_send(bytes(data)[: len(data) // 2])
                    stream.abort()
                    raise OSError("the peer died")
                wrong = bytearray(data)
                wrong[len(wrong) // 3] ^= 0x01
                data = memoryview(wrong)
            real_send(data)

        stream.send = send  # type: ignore[method-assign]
        self.service(request, stream)


@pytest.mark.parametrize("stop", [False, True], ids=["wrong byte", "peer dies mid-tensor"])
def test_a_bad_transfer_leaves_no_entry_for_that_tensor(
    model: Path, peer: Identity, worker: Identity, tmp_path: Path, stop: bool
) -> None:
    seeded = seed(model, tmp_path / "seeded", range(LAYERS[0], LAYERS[1] + 1))
    assert all(t.size <= 1 << 20 for t in hashed_tensors(model)), "one data chunk per tensor"
    liar = Liar(TensorService(model.parent, tmp_path / "peer-cache"), nth=2, stop=stop)
    error = FetchError if stop else CorruptTransfer
    match = "transfer of tiny.gguf .* broke|stopped sending" if stop else "hash mismatch"
    with pytest.raises(error, match=match):
        fetch_from(liar, peer, worker, tmp_path / "fetched", size=model.stat().st_size)
    left = files(tmp_path / "fetched")
    bad = seeded.files[hashed_tensors(model, range(LAYERS[0], LAYERS[1] + 1))[1].name]
    assert bad not in left, "the tensor that arrived wrong (or half) left no entry"
    assert seeded.files[hashed_tensors(model, range(LAYERS[0], LAYERS[1] + 1))[0].name] in left
    assert left.items() <= files(tmp_path / "seeded").items(), "what is there was verified"
    assert not [p for p in cache_files_dir(tmp_path / "fetched").iterdir() if p.name.startswith(".")]
    # the next fetch from an honest peer completes the cache
    honest = TensorService(model.parent, tmp_path / "peer-cache")
    ok = fetch_from(honest, peer, worker, tmp_path / "fetched", size=model.stat().st_size)
    assert ok.present == len(left) and ok.files == seeded.files
    assert files(tmp_path / "fetched") == files(tmp_path / "seeded")


@pytest.mark.parametrize(
    ("file", "size_delta", "reason"),
    [
        ("../models/tiny.gguf", 0, "not a plain file name"),
        ("sub/tiny.gguf", 0, "not a plain file name"),
        (".tiny.gguf", 0, "not a plain file name"),
        ("notes.txt", 0, "not a GGUF"),
        ("other.gguf", 0, "does not have other.gguf"),
        ("tiny.gguf", 1, "does not have tiny.gguf"),
    ],
)
def test_the_peer_refuses_what_it_does_not_serve(
    model: Path, peer: Identity, worker: Identity, tmp_path: Path, file: str, size_delta: int, reason: str
) -> None:
    with pytest.raises(FetchError, match=f"does not send .*{re.escape(reason)}"):
        fetch_from(
            TensorService(model.parent, tmp_path / "pc"),
            peer,
            worker,
            tmp_path / "c",
            file=file,
            size=model.stat().st_size + size_delta,
        )
    assert files(tmp_path / "c") == {}


def test_a_stranger_gets_nothing(model: Path, peer: Identity, worker: Identity, tmp_path: Path) -> None:
    service = TensorService(model.parent, tmp_path / "pc")
    with pytest.raises(FetchError, match="cannot fetch tensors"):
        fetch_from(service, peer, worker, tmp_path / "c", size=model.stat().st_size, worker_secret=b"z" * 32)
    assert service.served_bytes == 0 and files(tmp_path / "c") == {}


def test_abort_ends_a_transfer_at_once(model: Path, peer: Identity, worker: Identity, tmp_path: Path) -> None:
    entered = threading.Event()

    def slow(request: dict[str, Any], stream: Stream) -> None:
        stream.send_json({"type": "tensors", "tensors": [["blk.0.attn_q.weight", 1 << 20, "0" * 16]]})
        entered.set()
        stream.read_json()
        stream.wait_closed()  # sends nothing: the fetch must not wait for it

    async def main() -> None:
        async with DataPlaneServer(peer, creds(peer), "127.0.0.1") as server:
            server.services[REQUEST] = slow
            job = TensorFetch(
                worker,
                creds(worker),
                f"127.0.0.1:{server.port}",
                file="tiny.gguf",
                size=1,
                layers=LAYERS,
                cache_dir=tmp_path / "c",
            )
            async with anyio.create_task_group() as tg:

                async def abort() -> None:
                    await anyio.to_thread.run_sync(entered.wait)
                    await anyio.sleep(0.1)
                    t0 = time.monotonic()
                    job.abort()
                    await anyio.to_thread.run_sync(done.wait, 2)
                    assert time.monotonic() - t0 < 1

                done = threading.Event()
                tg.start_soon(abort)
                with pytest.raises(FetchError):
                    try:
                        await anyio.to_thread.run_sync(job.run)
                    finally:
                        done.set()

    run(main, 30)
    assert not list(cache_files_dir(tmp_path / "c").iterdir())


# --- end to end ---------------------------------------------------------------------------------------


@pytest.fixture
def empty_models(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "no-models"
    d.mkdir()
    yield d
    assert not any(d.iterdir()), "the worker never holds the GGUF"


@pytest.mark.slow
def test_a_split_worker_without_the_file_fetches_its_layers_and_serves_like_solo(
    spawn: Spawn, smollm: Path, empty_models: Path
) -> None:
    prompt = "The capital of France is"
    # without repacking: an AMX build runs Q4_1 through AMX tiles solo, rpc-servers never do (test_split.py)
    solo = spawn(
        "--mesh-host", "127.0.0.12", "--model", SMOLLM, "--llama-arg=--no-repack", "--name", "solo", name="solo"
    )
    solo.wait_model_state(SMOLLM, "serving", timeout=240)
    expected = complete(solo, prompt)
    solo.stop()

    host = spawn("--mesh-host", "127.0.0.10", "--model", SMOLLM, "--split", "2", "--name", "host", name="host")
    token = host.wait_for("token", lambda s: bool(s.get("invite_token")), timeout=60)["invite_token"]
    fresh = {"MESH_LLM_MODELS": str(empty_models)}
    w1 = spawn("--mesh-host", "127.0.0.11", "--join", token, "--name", "w1", name="w1", env=fresh)
    model = host.wait_model_state(SMOLLM, "serving", timeout=240)
    stage = model["placement"]["stages"][0]
    assert stage["node_id"] == w1.status()["node_id"]
    first, last = stage["layers"]
    assert complete(w1, prompt) == expected  # through the worker's API, the same 32 tokens as solo

    fetched = w1.wait_log(
        r"fetched (\d+) tensor\(s\) of layers (\d+)-(\d+) \(([\d.]+) MB\) from (\w+) in ([\d.]+) s \((\d+) MB/s\)"
    )
    assert (int(fetched.group(2)), int(fetched.group(3))) == (first, last)
    assert fetched.group(5) == host.status()["node_id"], "from the host that asked"
    # the worker's cache holds exactly its layers' tensors, byte for byte what seeding from the file writes
    reference = seed(smollm, w1.home / "reference", range(first, last + 1))
    assert files(w1.home / "rpc-cache") == files(w1.home / "reference")
    assert int(fetched.group(1)) == len(reference.written)
    assert float(fetched.group(4)) == pytest.approx(reference.bytes_written / 1e6, abs=0.1)
    # and the load sent (almost) no weights: llama.cpp RPC bytes to the worker over the data plane
    sent_mb = float(host.wait_log(r"loaded; ([\d.]+) MB sent to worker").group(1))
    size_mb = smollm.stat().st_size / 1e6
    assert sent_mb < 0.01 * size_mb, f"{sent_mb} MB of a {size_mb:.0f} MB model crossed at load"
    print(
        f"\nfetch: {fetched.group(4)} MB in {fetched.group(6)} s ({fetched.group(7)} MB/s); "
        f"RPC at load {sent_mb} MB of {size_mb:.0f} MB"
    )

"""The RPC data plane: real TCP + TLS on loopback, a stand-in rpc-server, a request/answer service,
and one real llama.cpp run.

Every test checks that nothing is left behind: no tunnel thread, no file descriptor."""

from __future__ import annotations

import gc
import logging
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from inference.llamacpp import LlamaCpp
from mesh_mcp.dataplane import limits as dataplane
from mesh_mcp.dataplane import native
from mesh_mcp.dataplane.listener import DataPlaneServer
from mesh_mcp.dataplane.relay import Relay, host_bytes, open_relay
from mesh_mcp.dataplane.services import Stream, connect
from mesh_mcp.errors import AuthError
from mesh_mcp.mesh.credentials import Credentials
from mesh_mcp.mesh.identity import Identity, load_or_create
from mesh_mcp.mesh.wire import encode
from tests.harness import free_port

MESH = b"m" * 16
SECRET = b"s" * 32


def creds(
    ident: Identity, secret: bytes = SECRET, mesh: bytes = MESH, accepted: tuple[bytes, ...] = ()
) -> Callable[[], Credentials]:
    c = Credentials(identity=ident, mesh_id=mesh, secret=secret, accepted=lambda node_id: accepted or (secret,))
    return lambda: c


async def refused(server: DataPlaneServer, n: int) -> None:
    """Wait (bounded) until the server has counted `n` refusals: its thread counts after answering."""
    with anyio.fail_after(5):
        while server.refused != n:
            await anyio.sleep(0.01)


def run(fn: Callable[[], Awaitable[Any]], limit: float = 20) -> Any:
    async def main() -> Any:
        with anyio.fail_after(limit):
            return await fn()

    return anyio.run(main)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _tunnel_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dataplane-")]


@pytest.fixture(autouse=True)
def nothing_leaks() -> Iterator[None]:
    gc.collect()
    before = _fds()
    yield
    gc.collect()
    deadline = time.monotonic() + 2
    while (_tunnel_threads() or _fds() - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _tunnel_threads()
    assert not {fd for fd in _fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}


class Echo:
    """Stands in for ggml-rpc-server on 127.0.0.1: echoes bytes back, records what reached it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.received = 0
        self.ended = threading.Event()  # a client went away
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(1 << 16):
                self.received += len(data)
                conn.sendall(data)
        except OSError:
            pass
        self.ended.set()

    def kick(self) -> None:
        """The rpc-server dies: every connection closes."""
        for c in self._conns:
            c.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)
        for c in self._conns:
            c.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.close()


async def recv_exactly(stream: anyio.abc.ByteStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        buf += await stream.receive(n - len(buf))
    return bytes(buf)


async def eof(stream: anyio.abc.ByteStream) -> bool:
    """True when the other end closes without sending anything."""
    try:
        data = await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return True
    raise AssertionError(f"expected the connection to close, got {data!r}")


# --- the tunnel ---------------------------------------------------------------------------------------


def test_tunnel_carries_rpc_bytes_both_ways_and_counts_them(worker: Identity, host: Identity, echo: Echo) -> None:
    payload = os.urandom(3 << 20)  # many TLS records, many recv chunks

    async def main() -> None:
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"rpc0": echo.port}) as server:
            async with open_relay(host, creds(host), f"127.0.0.1:{server.port}", "rpc0") as relay:
                async with await anyio.connect_tcp("127.0.0.1", relay.port) as s:
                    for size in (40, 2304, 8192):  # GET_TENSOR-sized ping-pongs
                        msg = os.urandom(size)
                        await s.send(msg)
                        assert await recv_exactly(s, size) == msg

                    async def send() -> None:
                        await s.send(payload)

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(send)
                        assert await recv_exactly(s, len(payload)) == payload
                total = 40 + 2304 + 8192 + len(payload)
                assert relay.peer is not None and relay.peer.node_id == worker.node_id
                with anyio.fail_after(5):
                    while server.counter("rpc0").tunnels != 1 or echo.received < total or server._tunnels:
                        await anyio.sleep(0.01)
                for counters in (relay.counters, server.counters["rpc0"]):
                    assert counters.to_rpc_server == total
                    assert counters.from_rpc_server == total
                    assert counters.tunnels == 1
                assert echo.accepted == 1

    run(main)


def test_each_local_connection_gets_its_own_tunnel(worker: Identity, host: Identity, echo: Echo) -> None:
    async def main() -> None:
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"rpc0": echo.port}) as server:
            async with Relay(host, creds(host), f"127.0.0.1:{server.port}", "rpc0") as relay:
                async with (
                    await anyio.connect_tcp("127.0.0.1", relay.port) as a,
                    await anyio.connect_tcp("127.0.0.1", relay.port) as b,
                ):
                    await a.send(b"from a")
                    await b.send(b"from b")
                    assert await recv_exactly(b, 6) == b"from b"
                    assert await recv_exactly(a, 6) == b"from a"
                assert relay.counters.tunnels == 2 and echo.accepted == 2

    run(main)


def test_a_peer_link_opens_only_for_the_stage_it_names(
    worker: Identity, host: Identity, echo: Echo, tmp_path: Path
) -> None:
    """A split worker's peer link (its rpc-server pushing to the next stage): each connection first names the stage,
    `u16 little-endian length | name`; only the name it was made for is spliced, anything else is closed unspliced.
    A second node reaching the same target is counted apart from the first (`NAME<-NODE`)."""

    def named(name: bytes) -> bytes:
        return len(name).to_bytes(2, "little") + name

    async def main() -> None:
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"stage2": echo.port}) as server:
            remote = f"127.0.0.1:{server.port}"
            async with Relay(host, creds(host), remote, "stage2") as first:  # the split's host reaches it first
                async with await anyio.connect_tcp("127.0.0.1", first.port) as s:
                    await s.send(b"hello")
                    assert await recv_exactly(s, 5) == b"hello"
            peer = load_or_create(tmp_path / "previous-stage")
            async with Relay(peer, creds(peer), remote, "stage2", peer_name="stage2") as link:
                for wrong in (named(b"stage3"), named(b""), b"\x05\x00ab", named(b"x" * 200)):
                    async with await anyio.connect_tcp("127.0.0.1", link.port) as s:
                        await s.send(wrong)
                        if wrong[:2] == b"\x05\x00":
                            await s.send_eof()  # a name cut short: the link gives up when the sender stops
                        assert await eof(s)
                assert link.failures == 4 and echo.accepted == 1
                async with await anyio.connect_tcp("127.0.0.1", link.port) as s:
                    await s.send(named(b"stage2") + b"pushed")
                    assert await recv_exactly(s, 6) == b"pushed"  # the name itself is not forwarded
                assert echo.accepted == 2
            assert server.peer_bytes() == {host.node_id: (5, 5), peer.node_id: (6, 6)}

    run(main)


def test_old_secret_is_accepted_when_the_worker_accepts_it(worker: Identity, host: Identity, echo: Echo) -> None:
    new, old = b"n" * 32, SECRET

    async def main() -> None:
        worker_creds = creds(worker, secret=new, accepted=(new, old))
        async with DataPlaneServer(worker, worker_creds, "127.0.0.1", targets={"rpc0": echo.port}) as server:
            async with Relay(
                host, creds(host, secret=old, accepted=(old, new)), f"127.0.0.1:{server.port}", "rpc0"
            ) as r:
                async with await anyio.connect_tcp("127.0.0.1", r.port) as s:
                    await s.send(b"ping")
                    assert await recv_exactly(s, 4) == b"ping"

    run(main)


# --- refusals: nothing reaches rpc-server ----------------------------------------------------------------


@pytest.mark.parametrize("bad", ["secret", "mesh"])
def test_a_peer_without_the_secret_is_refused_and_logged(
    worker: Identity, host: Identity, echo: Echo, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    intruder = creds(host, secret=b"z" * 32) if bad == "secret" else creds(host, mesh=b"o" * 16)

    async def main() -> None:
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"rpc0": echo.port}) as server:
            async with Relay(host, intruder, f"127.0.0.1:{server.port}", "rpc0") as relay:
                async with await anyio.connect_tcp("127.0.0.1", relay.port) as s:
                    await s.send(b"\x0e" + bytes(32))  # what llama-server sends first (HELLO)
                    assert await eof(s)
                assert relay.failures == 1 and relay.counters.tunnels == 0
            await refused(server, 1)  # counted after the refusal is sent: the relay may see it first

    with caplog.at_level(logging.WARNING, "mesh_llm.dataplane"):
        run(main)
    assert echo.accepted == 0 and echo.received == 0
    reason = "mesh secret" if bad == "secret" else "another mesh"
    assert any("refused" in r.message and reason in r.message for r in caplog.records), caplog.text


@pytest.mark.parametrize("junk", ["plain bytes", "tls then junk", "silence"])
def test_a_garbage_peer_is_refused(
    worker: Identity, echo: Echo, junk: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataplane, "HANDSHAKE_TIMEOUT_S", 0.5)

    def attack(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            if junk == "plain bytes":
                raw.sendall(b"\x0e" + bytes(32) + b"GET / HTTP/1.1\r\n\r\n")
                return raw.recv(100)
            if junk == "silence":
                return raw.recv(100)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            ctx.set_alpn_protocols([dataplane.ALPN])
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(encode(b"{not json") + encode(b'{"type":"hello"}'))
                try:
                    return tls.recv(100)
                except (ssl.SSLError, OSError):
                    return b""

    async def main() -> None:
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"rpc0": echo.port}) as server:
            t0 = time.monotonic()
            answer = await anyio.to_thread.run_sync(attack, server.port)
            assert b"rpc" not in answer and len(answer) < 100
            assert time.monotonic() - t0 < 3
            with anyio.fail_after(3):
                while server.refused != 1:
                    await anyio.sleep(0.01)

    with caplog.at_level(logging.WARNING, "mesh_llm.dataplane"):
        run(main)
    assert echo.accepted == 0
    assert any("refused" in r.message for r in caplog.records), caplog.text


def test_regression_a_peer_hanging_up_in_the_tls_handshake_is_refused_at_once(worker: Identity, echo: Echo) -> None:
    """EOF during the TLS handshake used to spin until the handshake deadline (5 s) instead of ending."""

    async def main() -> None:
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"rpc0": echo.port}) as server:
            t0 = time.monotonic()
            s = await anyio.connect_tcp("127.0.0.1", server.port)
            await s.aclose()
            with anyio.fail_after(3):
                while server.refused != 1:
                    await anyio.sleep(0.01)
            assert time.monotonic() - t0 < 1

    run(main)


def test_an_unknown_target_is_refused(
    worker: Identity, host: Identity, echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"rpc0": echo.port}) as server:
            async with Relay(host, creds(host), f"127.0.0.1:{server.port}", "rpc9") as relay:
                async with await anyio.connect_tcp("127.0.0.1", relay.port) as s:
                    assert await eof(s)
                assert relay.failures == 1
            await refused(server, 1)

    with caplog.at_level(logging.WARNING, "mesh_llm.dataplane"):
        run(main)
    assert echo.accepted == 0
    assert any("unknown target 'rpc9'" in r.message for r in caplog.records), caplog.text


def test_a_registered_target_that_is_down_is_refused(worker: Identity, host: Identity) -> None:
    async def main() -> None:
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"rpc0": free_port()}) as server:
            async with Relay(host, creds(host), f"127.0.0.1:{server.port}", "rpc0") as relay:
                async with await anyio.connect_tcp("127.0.0.1", relay.port) as s:
                    assert await eof(s)
                assert relay.failures == 1

    run(main)


def test_the_host_refuses_a_worker_that_is_not_the_expected_node(
    worker: Identity, host: Identity, echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"rpc0": echo.port}) as server:
            relay = Relay(host, creds(host), f"127.0.0.1:{server.port}", "rpc0", expect_node_id="0" * 16)
            async with relay, await anyio.connect_tcp("127.0.0.1", relay.port) as s:
                assert await eof(s)

    with caplog.at_level(logging.WARNING, "mesh_llm.dataplane"):
        run(main)
    assert echo.accepted == 0
    assert any("not 0000000000000000" in r.message for r in caplog.records), caplog.text


def test_an_unreachable_worker_closes_the_local_connection(host: Identity) -> None:
    async def main() -> None:
        async with Relay(host, creds(host), f"127.0.0.1:{free_port()}", "rpc0") as relay:
            async with await anyio.connect_tcp("127.0.0.1", relay.port) as s:
                assert await eof(s)
            assert relay.failures == 1

    run(main)


def test_close_does_not_wait_for_a_worker_that_never_answers(host: Identity) -> None:
    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as mute:  # connects (backlog), never speaks
            relay = Relay(host, creds(host), f"127.0.0.1:{mute.getsockname()[1]}", "rpc0")
            async with await anyio.connect_tcp("127.0.0.1", await relay.start()):
                with anyio.fail_after(3):
                    while not relay._tunnels:
                        await anyio.sleep(0.01)
                await anyio.sleep(0.1)  # the tunnel thread is waiting for the TLS handshake
                t0 = time.monotonic()
                await relay.close()
                assert time.monotonic() - t0 < 1

    run(main)


# --- request/answer services (the tensor fetch) -------------------------------------------------------


def test_a_service_answers_an_authenticated_peer_and_no_one_else(worker: Identity, host: Identity) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def upper(request: dict[str, Any], stream: Stream) -> None:
        seen.append((stream.peer.node_id, request))
        stream.send_json({"type": "answer", "n": len(request["text"])})
        stream.send(request["text"].upper().encode())
        stream.wait_closed()

    def ask(
        port: int, ident: Identity, secret: bytes = SECRET, expect: str | None = None
    ) -> tuple[dict[str, Any], bytes]:
        req = {"type": "upper", "text": "tensor bytes"}
        with connect(ident, creds(ident, secret), f"127.0.0.1:{port}", req, expect_node_id=expect) as stream:
            head = stream.read_json()
            return head, stream.read_exactly(head["n"])

    def unknown(port: int) -> dict[str, Any]:
        with connect(host, creds(host), f"127.0.0.1:{port}", {"type": "nope"}) as stream:
            return stream.read_json()

    async def main() -> None:
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1") as server:
            server.services["upper"] = upper
            head, body = await anyio.to_thread.run_sync(ask, server.port, host)
            assert head == {"type": "answer", "n": 12} and body == b"TENSOR BYTES"
            assert seen == [(host.node_id, {"type": "upper", "text": "tensor bytes"})]
            with pytest.raises(AuthError, match=r"mesh secret|refused"):
                await anyio.to_thread.run_sync(lambda: ask(server.port, host, b"z" * 32))
            with pytest.raises(AuthError, match="not 0000000000000000"):
                await anyio.to_thread.run_sync(lambda: ask(server.port, host, SECRET, "0" * 16))
            assert await anyio.to_thread.run_sync(unknown, server.port) == {
                "type": "refused",
                "reason": "no service 'nope' on this node",
            }
            assert len(seen) == 1 and server.refused == 3  # the secret, the node id (we hung up), the service

    run(main)


# --- either end dying closes the tunnel ---------------------------------------------------------------


@pytest.mark.parametrize("who", ["rpc-server", "llama-server", "relay", "data plane server"])
def test_the_tunnel_closes_when_either_end_goes(worker: Identity, host: Identity, echo: Echo, who: str) -> None:
    async def main() -> None:
        server = DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"rpc0": echo.port})
        relay = Relay(host, creds(host), f"127.0.0.1:{(await server.start())}", "rpc0")
        try:
            s = await anyio.connect_tcp("127.0.0.1", await relay.start())
            async with s:
                await s.send(b"hello")
                assert await recv_exactly(s, 5) == b"hello"
                if who == "rpc-server":
                    echo.kick()
                elif who == "relay":
                    await relay.close()
                elif who == "data plane server":
                    await server.close()
                else:
                    await s.aclose()
                    with anyio.fail_after(5):
                        while not echo.ended.is_set():  # rpc-server sees its client go
                            await anyio.sleep(0.01)
                    return
                assert await eof(s)
            with anyio.fail_after(5):
                while relay._tunnels or server._tunnels:
                    await anyio.sleep(0.01)
            assert echo.ended.wait(5)
        finally:
            await relay.close()
            await server.close()

    run(main)


# --- real llama.cpp -----------------------------------------------------------------------------------


def _hello(port: int) -> bytes:
    """ggml RPC HELLO (protocol 7): the version the server answers, or an OSError."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(struct.pack("<BQ", 14, 24) + bytes(24))
        buf = b""
        while len(buf) < 8 + 28:
            chunk = s.recv(64)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
    return buf[8:11]


def _llama_server(llama: LlamaCpp, model: Path, rpc_port: int, http_port: int, log: Path) -> subprocess.Popen[bytes]:
    """llama-server with every layer on the one RPC device (`-ngl 99`; a CPU build has no other)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                str(llama.server), "-m", str(model), "--rpc", f"127.0.0.1:{rpc_port}", "-ngl", "99",
                "--host", "127.0.0.1", "--port", str(http_port), "-c", "512", "-np", "1", "--fit", "off", "--no-webui",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_llama_server_loads_and_generates_through_the_data_plane(
    llama: LlamaCpp, smollm: Path, worker: Identity, host: Identity, tmp_path: Path
) -> None:
    """ggml-rpc-server ← DataPlaneServer ⇐ TLS ⇐ Relay ← llama-server: the weights and every
    token's tensors cross the relays; afterwards rpc-server is free for the next client."""
    rpc_port, http_port = free_port(), free_port()
    rpc = subprocess.Popen(
        [str(llama.rpc_server), "-H", "127.0.0.1", "-p", str(rpc_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs = [rpc]

    async def main() -> None:
        with anyio.fail_after(10):
            while True:
                try:
                    assert await anyio.to_thread.run_sync(_hello, rpc_port) == bytes([7, 0, 0])
                    break
                except OSError:
                    await anyio.sleep(0.05)
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"rpc0": rpc_port}) as server:
            async with open_relay(host, creds(host), f"127.0.0.1:{server.port}", "rpc0") as relay:
                ls = _llama_server(llama, smollm, relay.port, http_port, tmp_path / "llama-server.log")
                procs.append(ls)
                url = f"http://127.0.0.1:{http_port}"
                async with httpx2.AsyncClient(timeout=30) as http:
                    with anyio.fail_after(30):
                        while True:
                            assert ls.poll() is None, (tmp_path / "llama-server.log").read_text()
                            try:
                                if (await http.get(url + "/health")).status_code == 200:
                                    break
                            except httpx2.TransportError:
                                pass
                            await anyio.sleep(0.1)
                    loaded = relay.counters.to_rpc_server
                    assert loaded > 0.9 * smollm.stat().st_size  # the weights went over the relays
                    body = {"prompt": "The capital of France is", "n_predict": 8, "temperature": 0}
                    out = (await http.post(url + "/completion", json=body)).json()
                assert out["tokens_predicted"] == 8 and out["content"].strip()
                assert relay.counters.to_rpc_server > loaded  # each token's inputs
                assert relay.counters.from_rpc_server > 0  # and its outputs
                assert server.counters["rpc0"].to_rpc_server == relay.counters.to_rpc_server

                _stop(ls)  # llama-server goes: every tunnel closes, rpc-server serves the next client
                with anyio.fail_after(5):
                    while relay._tunnels or server._tunnels:
                        await anyio.sleep(0.01)
                assert rpc.poll() is None
                assert await anyio.to_thread.run_sync(_hello, relay.port) == bytes([7, 0, 0])

    try:
        run(main, limit=50)
    finally:
        for p in reversed(procs):
            _stop(p)


def test_a_hosts_relays_count_its_bytes_by_worker_and_keep_them_once_closed(
    worker: Identity, host: Identity, echo: Echo
) -> None:
    """Issue 18: the host's side of a split's data plane counts too (`host_bytes`: in = the worker's answers,
    out = requests to it), by the worker the relay reached, live while the relay runs and kept once it closed."""

    async def until(expected: tuple[int, int]) -> None:
        with anyio.fail_after(10):  # the relay's threads count just after they pass the bytes on
            while host_bytes(host.node_id).get(worker.node_id) != expected:
                await anyio.sleep(0.01)

    async def through(relay: Relay, data: bytes) -> None:
        async with await anyio.connect_tcp("127.0.0.1", relay.port) as conn:
            await conn.send(data)
            assert await recv_exactly(conn, len(data)) == data

    async def main() -> None:
        before = host_bytes(host.node_id).get(worker.node_id, (0, 0))
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"rpc0": echo.port}) as server:
            async with Relay(host, creds(host), f"127.0.0.1:{server.port}", "rpc0") as relay:
                await through(relay, b"x" * 5000)  # no expected node: counted under the one that authenticated
                await until((before[0] + 5000, before[1] + 5000))
            assert host_bytes(host.node_id)[worker.node_id] == (before[0] + 5000, before[1] + 5000)  # kept
            expect = worker.node_id
            async with Relay(host, creds(host), f"127.0.0.1:{server.port}", "rpc0", expect_node_id=expect) as relay:
                await through(relay, b"y" * 300)
                await until((before[0] + 5300, before[1] + 5300))  # running and closed relays together
            assert host_bytes(host.node_id)[worker.node_id] == (before[0] + 5300, before[1] + 5300)
            assert host_bytes(worker.node_id).get(host.node_id) is None  # the worker's side is its server's
            assert server.peer_bytes()[host.node_id][0] >= 5300

    run(main)


# --- the native splice (native.py, native_relay.c) -----------------------------------------------------


def test_tunnels_splice_in_c_when_both_ends_can_and_in_tls_when_either_cannot(
    worker: Identity, host: Identity, echo: Echo, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not native.available():
        pytest.skip("no C compiler or OpenSSL headers here: the native splice cannot be built")
    payload = os.urandom(1 << 20)

    async def round_trip(relay: Relay) -> None:
        async with await anyio.connect_tcp("127.0.0.1", relay.port) as s:
            await s.send(b"ping")
            assert await recv_exactly(s, 4) == b"ping"

            async def send() -> None:
                await s.send(payload)

            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                assert await recv_exactly(s, len(payload)) == payload

    async def main() -> None:
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"rpc0": echo.port}) as server:
            async with Relay(host, creds(host), f"127.0.0.1:{server.port}", "rpc0") as relay:
                await round_trip(relay)
                total = 4 + len(payload)
                with anyio.fail_after(30):  # the counts move as the C threads write (bounded, generous under load)
                    while server.counter("rpc0").tunnels != 1 or relay.counters.from_rpc_server < total:
                        await anyio.sleep(0.01)
                assert relay.counters.native == 1 and server.counter("rpc0").native == 1
                assert relay.counters.to_rpc_server == total == server.counter("rpc0").to_rpc_server
                monkeypatch.setattr(native, "offer", lambda: None)  # an end that cannot: TLS, as before
                await round_trip(relay)
                assert relay.counters.tunnels == 2 and relay.counters.native == 1

    run(main)


@pytest.mark.parametrize("offer", ["not base64!", "AAAA", "A" * 4000, ""])
def test_a_malformed_native_offer_gets_a_tls_tunnel_not_a_crash(
    worker: Identity, host: Identity, echo: Echo, monkeypatch: pytest.MonkeyPatch, offer: str
) -> None:
    """A hostile member's target request whose `native` is not 32 random bytes in base64 (or far too long): the
    worker answers a plain ok and the tunnel stays inside TLS; the host end, holding no valid key pair, does too."""
    monkeypatch.setattr(native, "offer", lambda: offer)

    async def main() -> None:
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", targets={"rpc0": echo.port}) as server:
            async with Relay(host, creds(host), f"127.0.0.1:{server.port}", "rpc0") as relay:
                async with await anyio.connect_tcp("127.0.0.1", relay.port) as s:
                    await s.send(b"still spliced")
                    assert await recv_exactly(s, 13) == b"still spliced"
                assert relay.counters.native == 0 and server.counter("rpc0").native == 0

    run(main)


def _records(key: bytes, chunks: list[bytes], first: int = 0) -> bytes:
    out = b""
    for i, chunk in enumerate(chunks, start=first):
        head = len(chunk).to_bytes(4, "little")
        out += head + AESGCM(key).encrypt(bytes(4) + (i).to_bytes(8, "little"), chunk, head)
    return out


def _native_pair() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """(llama side, the splice's local end, the splice's net end, the far node's side)"""
    llama, local = socket.socketpair()
    net, far = socket.socketpair()
    for s in (llama, far):
        s.settimeout(10)
    return llama, local, net, far


def _splicing(
    local: socket.socket, net: socket.socket, send: bytes, recv: bytes, meter: native.NativeMeter, ended: list[str]
) -> threading.Thread:
    """The C splice on a thread of its own; how it ended is appended to `ended`."""
    t = threading.Thread(target=lambda: ended.append(native.splice(local.fileno(), net.fileno(), send, recv, meter)))
    t.start()
    return t


def test_the_native_record_layer_is_what_its_docstring_says_and_a_forged_record_delivers_nothing() -> None:
    """The C splice's records are AES-256-GCM with the length as associated data and a per-direction counter nonce,
    checked here against `cryptography`'s AESGCM; a record altered on the wire ends the tunnel and none of its bytes,
    nor anything after it, reaches the local side."""
    if not native.available():
        pytest.skip("no C compiler or OpenSSL headers here: the native splice cannot be built")
    send_key, recv_key = os.urandom(32), os.urandom(32)
    llama, local, net, far = _native_pair()
    meter = native.NativeMeter(host_side=True)
    ended: list[str] = []
    t = _splicing(local, net, send_key, recv_key, meter, ended)
    try:
        llama.sendall(b"hello worker")
        head = far.recv(4)
        size = int.from_bytes(head, "little")
        body = b""
        while len(body) < size + 16:
            body += far.recv(size + 16 - len(body))
        assert AESGCM(send_key).decrypt(bytes(12), body, head) == b"hello worker"
        far.sendall(_records(recv_key, [b"answer one", b"answer two"]))
        got = b""
        while len(got) < 20:
            got += llama.recv(64)
        assert got == b"answer oneanswer two"
        forged = bytearray(_records(recv_key, [b"weights!", b"more"], first=2))
        forged[6] ^= 1  # one ciphertext bit of the first record
        far.sendall(bytes(forged))
        t.join(10)
        assert not t.is_alive() and ended == [native.ENDS[2]]
        assert llama.recv(64) == b""  # closed, and nothing of the forged record (or the next) came through
        assert meter.to_rpc_server == 12 and meter.from_rpc_server == 20
    finally:
        for s in (llama, local, net, far):
            s.close()
        t.join(10)


def test_a_record_length_out_of_range_ends_the_native_tunnel() -> None:
    if not native.available():
        pytest.skip("no C compiler or OpenSSL headers here: the native splice cannot be built")
    for head in ((0).to_bytes(4, "little"), (16385).to_bytes(4, "little"), (2**32 - 1).to_bytes(4, "little")):
        llama, local, net, far = _native_pair()
        ended: list[str] = []
        key = os.urandom(32)
        t = _splicing(local, net, key, key, native.NativeMeter(True), ended)
        try:
            far.sendall(head + bytes(64))
            t.join(10)
            assert not t.is_alive() and ended == [native.ENDS[2]]
            assert llama.recv(64) == b""
        finally:
            for s in (llama, local, net, far):
                s.close()
            t.join(10)

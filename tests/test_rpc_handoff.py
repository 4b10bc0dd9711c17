"""The rpc-server side of the stage-to-stage hand-off (the pinned edits in llama.cpp/pin.toml), spoken to directly:
real ggml-rpc-server processes, raw sockets, and a plain splicer standing in for the node's peer link.

- A compute input written as SET_TENSOR_SMALL (run-length coded) on one server, PUSHed to a second through the peer
  link, AWAITed there and read back with the stock GET_TENSOR, is the same bytes.
- What a hostile client or peer sends ends its own connection only: an oversized or duplicate push, a full mailbox,
  a malformed run-length payload, a region outside any buffer, a push with no peer link, an await nobody answers.
  The server answers the next client as before.

Whole splits through the mesh (the same tokens as solo, bytes per token) are in test_split.py."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from inference.llamacpp import LlamaCpp
from inference.rpc_server import probe
from tests.harness import free_port

pytestmark = pytest.mark.slow

ALLOC_BUFFER, BUFFER_GET_BASE, GET_TENSOR, HELLO = 0, 3, 8, 14
SET_TENSOR_SMALL, PUSH_TENSOR, AWAIT_TENSOR, PEER_SET = 18, 19, 20, 21
MAILBOX_MAX_ENTRIES = 64
PEER_NAME_MAX = 119


def request(cmd: int, payload: bytes = b"") -> bytes:
    return struct.pack("<BQ", cmd, len(payload)) + payload


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        if not chunk:
            raise ConnectionError(f"closed {size - len(out)} bytes short")
        out += chunk
    return bytes(out)


def answer(sock: socket.socket) -> bytes:
    (size,) = struct.unpack("<Q", recv_exactly(sock, 8))
    return recv_exactly(sock, size)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server ended this connection (bounded by the socket's timeout)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


class Client:
    """A host's connection: HELLO first, then commands."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(request(HELLO, bytes(24)))
        assert len(answer(self.sock)) == 28

    def alloc(self, size: int) -> tuple[int, int]:
        """(remote buffer, its base address)."""
        self.sock.sendall(request(ALLOC_BUFFER, struct.pack("<IQ", 0, size)))
        remote, _ = struct.unpack("<QQ", answer(self.sock))
        self.sock.sendall(request(BUFFER_GET_BASE, struct.pack("<Q", remote)))
        (base,) = struct.unpack("<Q", answer(self.sock))
        assert remote and base
        return remote, base

    def set_small(self, buffer: int, data: int, size: int, enc: int, body: bytes) -> None:
        self.sock.sendall(request(SET_TENSOR_SMALL, struct.pack("<QQQB", buffer, data, size, enc) + body))

    def push(self, buffer: int, data: int, size: int, seq: int, peer: bytes) -> None:
        name = peer.ljust(PEER_NAME_MAX, b"\0")
        self.sock.sendall(request(PUSH_TENSOR, struct.pack("<QQQQB", buffer, data, size, seq, len(peer)) + name))

    def await_(self, buffer: int, data: int, size: int, seq: int) -> None:
        self.sock.sendall(request(AWAIT_TENSOR, struct.pack("<QQQQ", buffer, data, size, seq)))

    def get(self, buffer: int, data: int, size: int) -> bytes:
        """The stock GET_TENSOR of `size` bytes at `data`, as a 1-D F32 tensor."""
        n = size // 4
        tensor = struct.pack("<QIQ4I4II", 1, 0, buffer, n, 1, 1, 1, 4, size, size, size, 0)
        tensor += bytes(64) + struct.pack("<i", 0) + bytes(80) + struct.pack("<QQQ", 0, 0, data) + bytes(64 + 4)
        assert len(tensor) == 296
        self.sock.sendall(request(GET_TENSOR, tensor + struct.pack("<QQ", 0, size)))
        return answer(self.sock)

    def close(self) -> None:
        self.sock.close()


def peer(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def peer_set(seq: int, data: bytes) -> bytes:
    return struct.pack("<BQQ", PEER_SET, 8 + len(data), seq) + data


def rle_run(count: int, word: bytes) -> bytes:
    return struct.pack("<I", 0x80000000 | count) + word


def rle_literals(words: bytes) -> bytes:
    return struct.pack("<I", len(words) // 4) + words


@contextlib.contextmanager
def rpc_server(llama: LlamaCpp, home: Path, **env: str) -> Iterator[int]:
    port = free_port()
    with (home / f"rpc-{port}.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(llama.rpc_server), "-p", str(port), "-t", "1"],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not alive(port):
            assert proc.poll() is None, (home / f"rpc-{port}.log").read_text()
            assert time.monotonic() < deadline, "the rpc-server did not answer within 60 s"
            time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait()


def alive(port: int) -> bool:
    """The server answers a HELLO (it is up, and no earlier connection broke it)."""
    try:
        anyio.run(lambda: probe("127.0.0.1", port, timeout_s=10))
    except Exception:
        return False
    return True


@contextlib.contextmanager
def peer_link(targets: dict[bytes, int]) -> Iterator[tuple[int, list[bytes]]]:
    """The node's peer link, in plain form: reads `u16 length | name` and splices to the rpc-server of that name.
    Yields its port and the names it was asked for."""
    listener = socket.create_server(("127.0.0.1", 0))
    asked: list[bytes] = []

    def pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := a.recv(65536):
                b.sendall(chunk)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                (size,) = struct.unpack("<H", recv_exactly(conn, 2))
                name = recv_exactly(conn, size)
                asked.append(name)
                up = socket.create_connection(("127.0.0.1", targets[name]))
                threading.Thread(target=pump, args=(conn, up), daemon=True).start()
                threading.Thread(target=pump, args=(up, conn), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1], asked
    finally:
        listener.close()


def test_a_pushed_tensor_arrives_whole_at_the_next_stage(llama: LlamaCpp, tmp_path: Path) -> None:
    plain = struct.pack("<4f", 1.5, -2.0, 3.25, 0.0)
    mask = rle_run(40, struct.pack("<f", 0.0)) + rle_literals(plain) + rle_run(20, struct.pack("<f", float("-inf")))
    expected = bytes(160) + plain + struct.pack("<f", float("-inf")) * 20
    with rpc_server(llama, tmp_path) as second, peer_link({b"next": second}) as (link, asked):
        with rpc_server(llama, tmp_path, MESH_LLM_RPC_PEER_LINK=f"127.0.0.1:{link}") as first:
            source, sink = Client(first), Client(second)
            src_buf, src = source.alloc(4096)
            dst_buf, dst = sink.alloc(4096)
            source.set_small(src_buf, src + 64, len(expected), 1, mask)
            assert source.get(src_buf, src + 64, len(expected)) == expected  # the run-length coding, decoded
            sink.await_(dst_buf, dst + 128, len(expected), 7)  # waits on the sink's side for the push
            source.push(src_buf, src + 64, len(expected), 7, b"next")
            assert sink.get(dst_buf, dst + 128, len(expected)) == expected
            assert asked == [b"next"]
            # a second push reuses the peer connection
            source.set_small(src_buf, src + 64, 16, 0, plain)
            source.push(src_buf, src + 64, 16, 8, b"next")
            sink.await_(dst_buf, dst, 16, 8)
            assert sink.get(dst_buf, dst, 16) == plain
            assert asked == [b"next"]
            source.close()
            sink.close()


def test_what_a_hostile_client_or_peer_sends_ends_only_its_own_connection(llama: LlamaCpp, tmp_path: Path) -> None:
    with rpc_server(llama, tmp_path, MESH_LLM_RPC_AWAIT_S="1") as port:
        # a peer: a message above the bound, then a duplicate sequence number, then a full mailbox
        with peer(port) as p:
            p.sendall(struct.pack("<BQQ", PEER_SET, 2**40, 1))
            assert closed_by_server(p)
        with peer(port) as p:
            p.sendall(peer_set(5, b"x" * 16) + peer_set(5, b"y" * 16))
            assert closed_by_server(p)
        with peer(port) as p:
            p.sendall(b"".join(peer_set(100 + i, b"z" * 8) for i in range(MAILBOX_MAX_ENTRIES + 1)))
            assert closed_by_server(p)
        assert alive(port)
        # the host's connection: bad payloads and regions, a push with no peer link, an await nobody answers
        for bad in (
            lambda c, b, d: c.set_small(b, d, 64, 1, rle_run(17, bytes(4))),  # decodes past the end
            lambda c, b, d: c.set_small(b, d, 64, 1, struct.pack("<I", 5) + bytes(8)),  # literals cut short
            lambda c, b, d: c.set_small(b, d, 64, 7, bytes(64)),  # unknown coding
            lambda c, b, d: c.set_small(b, d, 64, 0, bytes(63)),  # payload shorter than its size
            lambda c, b, d: c.set_small(b, d + 4096, 4, 0, bytes(4)),  # past the buffer's end
            lambda c, b, d: c.set_small(b + 8, d, 4, 0, bytes(4)),  # no such buffer
            lambda c, b, d: c.push(b, d, 16, 9, b"next"),  # no MESH_LLM_RPC_PEER_LINK on this server
            lambda c, b, d: c.push(b, d, 16, 9, b""),  # no name
            lambda c, b, d: c.await_(b, d, 16, 12345),  # never pushed: MESH_LLM_RPC_AWAIT_S
        ):
            client = Client(port)
            buffer, base = client.alloc(4096)
            bad(client, buffer, base)
            assert closed_by_server(client.sock)
            client.close()
            assert alive(port)
        # a push of another size than the stage awaits
        client = Client(port)
        buffer, base = client.alloc(4096)
        with peer(port) as p:
            p.sendall(peer_set(77, b"w" * 16))
            client.await_(buffer, base, 8, 77)
            assert closed_by_server(client.sock)
        client.close()
        assert alive(port)

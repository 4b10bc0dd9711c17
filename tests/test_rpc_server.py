"""ggml-rpc-server supervision: the command line, the wire probe against fakes, the version rule, and (slow)
a real rpc-server: readiness, a lost bind race, restart after a crash, giving up."""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio
import pytest
from anyio.abc import SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from inference.llama_server import FAILED, SERVING
from inference.llamacpp import LlamaCpp
from inference.rpc_server import (
    PROTOCOL_VERSION,
    RpcBusy,
    RpcServer,
    RpcSettings,
    RpcUnreachable,
    RpcVersionMismatch,
    Version,
    compatible,
    listening_pid_owns,
    probe,
    require_compatible,
    rpc_args,
)
from mesh_mcp.errors import ProtocolError

T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        with anyio.fail_after(timeout):
            return await fn()

    return anyio.run(bounded)


def test_rpc_args_loopback_cache_threads_devices() -> None:
    args = rpc_args(Path("/bin/ggml-rpc-server"), 5000, threads=3, devices=("CUDA0", "CUDA1"))
    assert args == [
        "/bin/ggml-rpc-server", "--host", "127.0.0.1", "--port", "5000", "--cache",
        "--threads", "3", "--device", "CUDA0,CUDA1",
    ]  # fmt: skip
    assert rpc_args(Path("x"), 1, cache=False) == ["x", "--host", "127.0.0.1", "--port", "1"]
    with pytest.raises(ValueError):
        rpc_args(Path("x"), 1, threads=0)


def test_version_rule_names_both_versions() -> None:
    client = Version(7, 1, 0)
    assert compatible(client, Version(7, 1, 5)) and compatible(client, Version(7, 0, 9))
    assert not compatible(client, Version(7, 2, 0)) and not compatible(client, Version(6, 0, 0))
    assert not compatible(client, Version(8, 0, 0))
    require_compatible(client, Version(7, 0, 0))
    with pytest.raises(RpcVersionMismatch) as exc:
        require_compatible(client, Version(7, 2, 0), where="worker bob")
    assert "7.2.0" in str(exc.value) and "7.1.0" in str(exc.value) and "worker bob" in str(exc.value)


# --- a fake rpc-server: HELLO, DEVICE_COUNT, GET_DEVICE_MEMORY ---------------------------------------


async def _fake_rpc(
    stream: SocketStream, version: tuple[int, int, int] = (7, 0, 0), memory: tuple[tuple[int, int], ...] = ()
) -> None:
    async with stream:
        reader = BufferedByteReceiveStream(stream)
        while True:
            try:
                cmd, size = struct.unpack("<BQ", await reader.receive_exactly(9))
                payload = await reader.receive_exactly(size)
            except (anyio.IncompleteRead, anyio.EndOfStream):
                return
            if cmd == 14:
                assert payload == bytes(24)
                body = bytes([*version, 0]) + bytes(24)
            elif cmd == 15:
                body = struct.pack("<I", len(memory))
            elif cmd == 11:
                (index,) = struct.unpack("<I", payload)
                body = struct.pack("<QQ", *memory[index])
            else:
                return
            await stream.send(struct.pack("<Q", len(body)) + body)


async def _serve_fake(handler: Callable[[SocketStream], Awaitable[None]], *, task_status: TaskStatus[int]) -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(handler)


def test_probe_reads_version_and_memory() -> None:
    async def body() -> None:
        async with anyio.create_task_group() as tg:
            port = await tg.start(_serve_fake, lambda s: _fake_rpc(s, memory=((1 << 30, 4 << 30), (5, 7))))
            info = await probe("127.0.0.1", port)
            assert info.version == PROTOCOL_VERSION and str(info.version) == "7.0.0"
            assert [(d.index, d.free, d.total) for d in info.devices] == [(0, 1 << 30, 4 << 30), (1, 5, 7)]
            assert (info.free, info.total) == ((1 << 30) + 5, (4 << 30) + 7)
            tg.cancel_scope.cancel()

    run(body)


def test_probe_other_major_returns_version_only() -> None:
    async def body() -> None:
        async with anyio.create_task_group() as tg:
            port = await tg.start(_serve_fake, lambda s: _fake_rpc(s, version=(8, 1, 2), memory=((1, 2),)))
            info = await probe("127.0.0.1", port)
            assert info.version == Version(8, 1, 2) and info.devices == ()
            assert not compatible(PROTOCOL_VERSION, info.version)
            tg.cancel_scope.cancel()

    run(body)


def test_probe_busy_unreachable_and_wrong_peer() -> None:
    async def silent(stream: SocketStream) -> None:
        async with stream:
            await anyio.sleep(30)

    async def closes(stream: SocketStream) -> None:
        await stream.aclose()

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            busy = await tg.start(_serve_fake, silent)
            with pytest.raises(RpcBusy):
                await probe("127.0.0.1", busy, timeout_s=0.3)
            rude = await tg.start(_serve_fake, closes)
            with pytest.raises(ProtocolError):
                await probe("127.0.0.1", rude)
            tg.cancel_scope.cancel()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        with pytest.raises(RpcUnreachable):
            await probe("127.0.0.1", free)

    run(body)


def test_listening_pid_owns() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert listening_pid_owns(os.getpid(), port) is False  # bound, not listening
        s.listen(1)
        assert listening_pid_owns(os.getpid(), port) is True
        assert listening_pid_owns(os.getppid(), port) is False


# --- a real ggml-rpc-server -------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_real_rpc_server_ready_probe_and_stop(llama: LlamaCpp, tmp_path: Path) -> None:
    states: list[tuple[str, str]] = []
    server = RpcServer(llama, tmp_path / "home", RpcSettings(threads=1), on_state=lambda s, d: states.append((s, d)))

    async def body() -> int:
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            assert states[-1][0] == SERVING, states
            assert server.endpoint == f"127.0.0.1:{server.port}" and server.pid is not None
            assert server.info is not None and server.info.version == PROTOCOL_VERSION
            assert server.info.devices and server.info.total > 0
            require_compatible(PROTOCOL_VERSION, server.info.version)
            info = await probe("127.0.0.1", server.port or 0)  # the slot is free again after the readiness probe
            assert info.version == PROTOCOL_VERSION
            pid = server.pid
            tg.cancel_scope.cancel()
        return pid

    pid = run(body)
    assert not _alive(pid) and server.endpoint is None
    log = server.log_path.read_text()
    assert server.log_path == tmp_path / "home" / "logs" / "rpc-server.log"
    assert f"local cache    : {tmp_path / 'home' / 'rpc-cache' / 'rpc'}" in log
    assert (tmp_path / "home" / "rpc-cache" / "rpc").is_dir()


@pytest.mark.slow
def test_lost_bind_race_takes_another_port(llama: LlamaCpp, tmp_path: Path) -> None:
    """Someone else (here: a fake that even answers HELLO) holds the port we picked: rpc-server exits 0 after
    failing to bind; the supervisor must not mistake the fake for it, and must retry on a new port."""
    server = RpcServer(llama, tmp_path / "home", RpcSettings(threads=1))

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            taken = await tg.start(_serve_fake, _fake_rpc)
            server.port = taken
            await tg.start(server.run)
            assert server.endpoint is not None and server.port != taken, server.endpoint
            assert server.restarts == 0 and server.pid is not None
            assert listening_pid_owns(server.pid, server.port or 0)
            tg.cancel_scope.cancel()

    run(body)
    assert b"Failed to create server socket" in server.log_path.read_bytes()


@pytest.mark.slow
def test_restarts_on_the_same_port_after_a_crash(llama: LlamaCpp, tmp_path: Path) -> None:
    states: list[tuple[str, str]] = []
    server = RpcServer(
        llama,
        tmp_path / "home",
        RpcSettings(threads=1, backoff_initial_s=0.1),
        on_state=lambda s, d: states.append((s, d)),
    )

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            first_pid, first_port = server.pid, server.port
            assert first_pid is not None
            os.kill(first_pid, signal.SIGKILL)
            with anyio.fail_after(30):
                while server.restarts < 1 or server.endpoint is None:
                    await anyio.sleep(0.05)
            assert server.pid != first_pid and server.port == first_port
            assert any("died (killed by SIGKILL (signal 9)" in d for _, d in states), states
            tg.cancel_scope.cancel()

    run(body)


@pytest.mark.slow
def test_gives_up_when_it_never_starts(llama: LlamaCpp, tmp_path: Path) -> None:
    states: list[tuple[str, str]] = []
    server = RpcServer(
        llama,
        tmp_path / "home",
        RpcSettings(devices=("NoSuchDevice",), max_start_failures=2, backoff_initial_s=0.05),
        on_state=lambda s, d: states.append((s, d)),
    )

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)  # returns once it has failed
            tg.cancel_scope.cancel()

    run(body)
    assert states[-1][0] == FAILED and "exit 1" in states[-1][1], states
    assert server.restarts == 1 and server.endpoint is None
    assert b"unknown device" in server.log_path.read_bytes()


@pytest.mark.slow
def test_ready_even_when_a_client_got_in_first(
    llama: LlamaCpp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart on the same port the host's llama-server may connect before our readiness probe; the probe
    then times out (one client at a time), but the listening socket is ours: that is ready, without an RpcInfo."""
    import inference.rpc_server as rpc_server

    async def busy(host: str, port: int, timeout_s: float = 5.0) -> rpc_server.RpcInfo:
        await anyio.sleep(0.05)
        raise RpcBusy("held by another client")

    monkeypatch.setattr(rpc_server, "probe", busy)
    server = RpcServer(llama, tmp_path / "home", RpcSettings(threads=1, ready_timeout_s=20))

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            assert server.endpoint is not None and server.info is None and server.restarts == 0
            tg.cancel_scope.cancel()

    run(body)

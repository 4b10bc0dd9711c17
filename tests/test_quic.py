"""The QUIC transport: real aioquic connections on loopback, mutual authentication, refusal."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import pytest

from mesh_mcp.errors import AuthError
from mesh_mcp.mesh.credentials import Credentials
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.mesh.quic import Connection, MeshTransport
from mesh_mcp.mesh.wire import encode, read_frame

MESH = b"m" * 16


def creds(tmp_path: Any, name: str, secret: bytes = b"s" * 32, mesh: bytes = MESH) -> Credentials:
    ident = load_or_create(tmp_path / name)
    return Credentials(identity=ident, mesh_id=mesh, secret=secret, accepted=lambda node_id: (secret,))


async def echo(
    conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    data = await read_frame(reader)
    assert data is not None
    writer.write(encode(header["prefix"].encode() + data))
    writer.write_eof()


def run(fn: Any) -> Any:
    async def main() -> Any:
        with anyio.fail_after(20):
            return await fn()

    return anyio.run(main)


def test_two_nodes_authenticate_and_talk_both_ways(tmp_path: Any) -> None:
    async def main() -> None:
        a = MeshTransport(creds(tmp_path, "a"), {"echo": echo}, host="127.0.0.1")
        b = MeshTransport(creds(tmp_path, "b"), {"echo": echo}, host="127.0.0.1")
        async with anyio.create_task_group() as tg:
            await tg.start(a.run)
            port_b = await tg.start(b.run)
            conn = await a.connect(f"127.0.0.1:{port_b}")
            assert conn.peer is not None and conn.peer.node_id == b.creds.identity.node_id
            reader, writer = await conn.open_stream({"t": "echo", "prefix": "b says "})
            writer.write(encode(b"hi"))
            writer.write_eof()
            assert await read_frame(reader) == b"b says hi"
            # b can use the same connection to reach a
            await anyio.sleep(0.05)
            back = b.connection(a.creds.identity.node_id)
            assert back is not None
            r2, w2 = await back.open_stream({"t": "echo", "prefix": "a says "})
            w2.write(encode(b"yo"))
            w2.write_eof()
            assert await read_frame(r2) == b"a says yo"
            tg.cancel_scope.cancel()

    run(main)


@pytest.mark.parametrize("bad", ["secret", "mesh"])
def test_wrong_secret_or_mesh_is_refused_and_logged(tmp_path: Any, bad: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        good = MeshTransport(creds(tmp_path, "good"), {"echo": echo}, host="127.0.0.1")
        intruder_creds = (
            creds(tmp_path, "x", secret=b"z" * 32) if bad == "secret" else creds(tmp_path, "x", mesh=b"o" * 16)
        )
        intruder = MeshTransport(intruder_creds, {}, host="127.0.0.1")
        async with anyio.create_task_group() as tg:
            port = await tg.start(good.run)
            await tg.start(intruder.run)
            with pytest.raises(AuthError, match="refused"):
                await intruder.connect(f"127.0.0.1:{port}")
            await anyio.sleep(0.1)
            assert good.connections == {}
            tg.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING, logger="mesh_llm.quic"):
        run(main)
    assert any("refused peer" in r.message for r in caplog.records)


def test_unreachable_address_is_a_clear_error(tmp_path: Any) -> None:
    async def main() -> None:
        a = MeshTransport(creds(tmp_path, "a"), {}, host="127.0.0.1")
        async with anyio.create_task_group() as tg:
            await tg.start(a.run)
            with pytest.raises(OSError, match=r"no answer|cannot reach"):
                await a.connect("127.0.0.1:9")
            tg.cancel_scope.cancel()

    run(main)


async def until(check: Any, what: str) -> None:
    """Bounded wait on observable state (the run's 20 s deadline bounds it)."""
    while not check():
        await anyio.sleep(0.01)


def test_a_long_lived_connection_keeps_nothing_of_the_streams_that_ended(tmp_path: Any) -> None:
    """aioquic keeps every stream's reader for the connection's life; members stay connected for days and open a
    stream per gossip round, ping and request — what a connection holds must not grow with the streams it carried:
    answered ones, ones the requester abandoned (reset both ways), ones the server answered without reading."""

    async def main() -> None:
        a = MeshTransport(creds(tmp_path, "a"), {"echo": echo, "drop": drop}, host="127.0.0.1")
        b = MeshTransport(creds(tmp_path, "b"), {"echo": echo, "drop": drop}, host="127.0.0.1")
        async with anyio.create_task_group() as tg:
            await tg.start(a.run)
            port_b = await tg.start(b.run)
            conn = await a.connect(f"127.0.0.1:{port_b}")
            await until(lambda: b.connection(a.creds.identity.node_id) is not None, "b has the connection")
            back = b.connection(a.creds.identity.node_id)
            assert back is not None
            for i in range(60):
                reader, writer = await conn.open_stream({"t": "echo" if i % 3 else "drop", "prefix": ""})
                writer.write(encode(b"x" * 100))
                writer.write_eof()
                if i % 3 == 0:
                    assert await reader.read() == b""  # answered with a bare FIN, the request never read
                elif i % 3 == 1:
                    assert await read_frame(reader) == b"x" * 100
                    assert await reader.read() == b""
                else:
                    conn.reset(writer)  # the requester went away
                del reader, writer
            await until(lambda: conn.streams_held() == 0 and back.streams_held() == 0, "nothing held")
            reader, writer = await conn.open_stream({"t": "echo", "prefix": "still "})  # and the connection works
            writer.write(encode(b"up"))
            writer.write_eof()
            assert await read_frame(reader) == b"still up"
            tg.cancel_scope.cancel()

    run(main)


async def drop(
    conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write_eof()

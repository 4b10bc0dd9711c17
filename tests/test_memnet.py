"""The shipped test seams (`mesh_mcp.testing`): the fake clock, the in-memory network's connections, streams,
handshake refusals, latency, loss and partitions, and a 20-node mesh run in one process on them: membership
converges, a served model is found and a request routed to it through the tunnel, a partition splits membership
and healing joins it again, a killed node is declared dead."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx2
import pytest

from mesh_mcp.api.app import build_api
from mesh_mcp.api.mesh_directory import MeshDirectory
from mesh_mcp.errors import HandshakeRefused
from mesh_mcp.mesh import meshfile, tokens
from mesh_mcp.mesh.credentials import Credentials
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.mesh.runtime import Mesh, MeshSettings
from mesh_mcp.state import NodeState
from mesh_mcp.testing import FakeClock, MemoryNetwork, MemoryTransport, settle

T = TypeVar("T")

# --- the fake clock ---------------------------------------------------------------------------------


def test_fake_time_moves_only_when_advanced_and_wakes_sleepers_in_deadline_order() -> None:
    async def main() -> None:
        clock = FakeClock(start=100.0)
        woke: list[str] = []

        async def sleeper(name: str, seconds: float) -> None:
            await clock.sleep(seconds)
            woke.append(f"{name}@{clock.monotonic():g}")

        async with anyio.create_task_group() as tg:
            for name, seconds in (("c", 3.0), ("a", 1.0), ("b", 2.0), ("a2", 1.0)):
                tg.start_soon(sleeper, name, seconds)
            await clock.run_for(0.5)
            assert woke == [] and clock.time() == 100.5 and clock.sleepers == 4
            clock.advance(2.0)  # one jump past two deadlines: earliest first, ties in sleeping order
            await clock.run_for(0)
            assert woke == ["a@2.5", "a2@2.5", "b@2.5"]
            assert await clock.run_until(lambda: len(woke) == 4, within=5, step=0.25) == 0.5
        assert woke[-1] == "c@3" and clock.time() == 103.0 and clock.sleepers == 0

    anyio.run(main)


def test_run_until_gives_up_after_its_bound_and_a_cancelled_sleeper_never_wakes() -> None:
    async def main() -> None:
        clock = FakeClock()
        with pytest.raises(TimeoutError, match="within 2 s on the fake clock"):
            await clock.run_until(lambda: False, within=2, step=0.5)
        assert clock.monotonic() == 2.0
        woke = []

        async def sleeper() -> None:
            await clock.sleep(1)
            woke.append(1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sleeper)
            await clock.run_for(0)
            tg.cancel_scope.cancel()
        clock.advance(5)
        assert woke == [] and clock.sleepers == 0 and clock.next_deadline() is None
        with pytest.raises(ValueError):
            clock.advance(-1)

    anyio.run(main)


# --- the in-memory network ----------------------------------------------------------------------------


def creds(home: Path, mesh_id: bytes = b"m" * 16, secret: bytes = b"s" * 32) -> Credentials:
    return Credentials(load_or_create(home), mesh_id, secret, lambda node_id: (secret,))


async def echo(conn: Any, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read())
    writer.write_eof()


async def pair(tmp_path: Path, network: MemoryNetwork, **server_creds: Any) -> tuple[MemoryTransport, MemoryTransport]:
    server = network.transport(creds(tmp_path / "server", **server_creds), {"echo": echo})
    client = network.transport(creds(tmp_path / "client"), {})
    await server.start()
    await client.start()
    return client, server


def test_streams_carry_bytes_both_ways_and_count_them(tmp_path: Path) -> None:
    async def main() -> None:
        network = MemoryNetwork()
        client, server = await pair(tmp_path, network)
        conn = await client.connect(server.address)
        assert conn.peer is not None and conn.peer.node_id == server.node_id
        assert server.connection(client.node_id) is not None and client.connection(server.node_id) is conn
        reader, writer = await conn.open_stream({"t": "echo"})
        writer.write(b"hello")
        writer.write_eof()
        with anyio.fail_after(5):
            assert await reader.read() == b"hello"
        assert client.traffic.bytes_out > 5 and server.traffic.bytes_in == client.traffic.bytes_out
        assert await client.connect_any(server.node_id, ()) is conn  # the open connection is reused
        await server.close()
        assert conn.closed_event.is_set() and client.connection(server.node_id) is None
        with pytest.raises(OSError, match="nothing listens"):
            await client.connect(server.address)

    anyio.run(main)


@pytest.mark.parametrize(
    ("server_creds", "code"),
    [({"secret": b"x" * 32}, "bad-secret"), ({"mesh_id": b"o" * 16}, "other-mesh")],
)
def test_a_node_without_the_mesh_secret_is_refused_as_over_quic(
    tmp_path: Path, server_creds: dict[str, bytes], code: str
) -> None:
    async def main() -> None:
        client, server = await pair(tmp_path, MemoryNetwork(), **server_creds)
        with pytest.raises(HandshakeRefused) as refused:
            await client.connect(server.address)
        assert refused.value.code == code and not client.connections and not server.connections

    anyio.run(main)


def test_latency_is_paid_on_the_network_clock_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        clock = FakeClock()
        network = MemoryNetwork(clock, latency_s=0.05)
        client, server = await pair(tmp_path, network)
        async with anyio.create_task_group() as tg:
            got: list[Any] = []

            async def dial() -> None:
                conn = await client.connect(server.address)
                reader, writer = await conn.open_stream({"t": "echo"})
                for i in range(5):
                    writer.write(b"%d" % i)
                writer.write_eof()
                got.append(await reader.read())

            tg.start_soon(dial)
            await clock.run_for(0.19, step=0.01)  # handshake 0.1 s, there 0.05 s, back 0.05 s: not yet
            assert got == []
            await clock.run_until(lambda: bool(got), within=1, step=0.01)
        assert got == [b"01234"] and 0.2 <= clock.monotonic() < 0.25

    anyio.run(main)


def test_a_partition_fails_dials_and_silences_open_connections_until_their_idle_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        clock = FakeClock()
        network = MemoryNetwork(clock, idle_timeout_s=20)
        client, server = await pair(tmp_path, network)
        conn = await client.connect(server.address)
        reader, writer = await conn.open_stream({"t": "echo"})
        network.partition([client.node_id], [server.node_id])
        writer.write(b"into the void")
        writer.write_eof()
        with pytest.raises(OSError, match="no answer"):
            await client.connect(server.address)
        await clock.run_for(19, step=1)
        assert not conn.closed_event.is_set() and not reader.at_eof()
        await clock.run_until(conn.closed_event.is_set, within=2, step=0.5)
        with pytest.raises(ConnectionResetError, match="idle timeout"):
            await reader.read()
        assert client.connection(server.node_id) is None and server.connection(client.node_id) is None
        network.heal()
        assert (await client.connect(server.address)).peer is not None

    anyio.run(main)


def test_a_lost_write_fails_its_stream_both_ways(tmp_path: Path) -> None:
    async def main() -> None:
        network = MemoryNetwork(loss=1.0)
        client, server = await pair(tmp_path, network)
        conn = await client.connect(server.address)  # the handshake is not subject to loss; streams are
        reader, writer = await conn.open_stream({"t": "echo"})
        with anyio.fail_after(5), pytest.raises(ConnectionResetError, match="lost"):
            await reader.read()
        assert conn.stream_closed(writer.get_extra_info("stream_id")).is_set()

    anyio.run(main)


# --- 20 meshes in one process ---------------------------------------------------------------------------

N = 20


async def tiny_upstream(seen: list[bytes]) -> asyncio.Server:
    """A stand-in llama-server: answers every request with one JSON body (and notes the request line)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(
                    (
                        int(v)
                        for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
                        if k.lower() == b"content-length"
                    ),
                    0,
                )
                await reader.readexactly(length)
                seen.append(head.split(b"\r\n", 1)[0])
                body = b'{"choices": [{"message": {"content": "from b"}}]}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
                )
                writer.write(body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def member_ids(mesh: Mesh) -> set[str]:
    return {r.node_id for r in mesh.members()}


def test_twenty_nodes_converge_route_split_heal_and_notice_a_death(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    network = MemoryNetwork(clock, latency_s=0.002)

    def node(i: int, config: meshfile.MeshConfig, joins: tuple[tokens.InviteToken, ...] = ()) -> Mesh:
        home = tmp_path / f"n{i}"
        ident = load_or_create(home)
        state = NodeState(node_id=ident.node_id, name=f"n{i}", version="0", api_url="", console_url="")
        settings = MeshSettings(host="127.0.0.1", joins=joins)
        return Mesh(ident, config, home, state, settings, clock=clock, transport=network.transport)

    async def start(tg: anyio.abc.TaskGroup, mesh: Mesh) -> anyio.CancelScope:
        async def run(*, task_status: anyio.abc.TaskStatus[anyio.CancelScope]) -> None:
            with anyio.CancelScope() as scope:
                await mesh.run(task_status=_started(task_status, scope))

        scope: anyio.CancelScope = await tg.start(run)
        return scope

    async def until(condition: Callable[[], bool], within: float, what: str) -> None:
        try:
            await clock.run_until(condition, within=within, step=0.25)
        except TimeoutError:
            sizes = sorted(len(m.members()) for m in live)
            raise AssertionError(f"{what}: not within {within} fake s (members seen: {sizes})") from None

    async def driven(tg: anyio.abc.TaskGroup, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` run to its end while the fake clock moves on (the network's latency is paid on it) and real
        I/O (the upstream's socket) gets real time; bounded in real time."""
        done: list[T] = []

        async def run() -> None:
            done.append(await call())

        tg.start_soon(run)
        with anyio.fail_after(30):
            while not done:
                clock.advance(0.005)
                await settle()
                await anyio.sleep(0.002)
        return done[0]

    seen: list[bytes] = []

    async def main() -> None:
        nonlocal live
        upstream = await tiny_upstream(seen)
        apps = AsyncExitStack()
        async with anyio.create_task_group() as tg:
            first = node(0, meshfile.create(owner=load_or_create(tmp_path / "n0").public_bytes))
            scopes = [await start(tg, first)]
            token = tokens.decode(first.invite_token())
            meshes = [first] + [node(i, meshfile.from_token(token), (token,)) for i in range(1, N)]
            for mesh in meshes[1:]:
                scopes.append(await start(tg, mesh))
            live = list(meshes)
            everyone = {m.identity.node_id for m in meshes}

            await until(lambda: all(member_ids(m) == everyone for m in meshes), 60, "20 nodes converge")

            # node B serves a model; node A finds it in membership and its API routes a request there
            a, b = meshes[3], meshes[17]
            port = upstream.sockets[0].getsockname()[1]
            b.state.update_model("tiny", state="serving", upstream=f"http://127.0.0.1:{port}")
            for mesh in (a, b):
                app = mesh.api_app = build_api(mesh.state, MeshDirectory(mesh))
                await apps.enter_async_context(app.router.lifespan_context(app))  # closes its upstream pool after
            served = lambda: any(s.name == "tiny" for r in a.members() for s in r.models_served)  # noqa: E731
            await until(served, 30, "A learns that B serves the model")
            async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=a.api_app), base_url="http://a") as c:
                chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
                r = await driven(tg, lambda: c.post("/v1/chat/completions", json=chat))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "from b"
            assert r.headers["x-mesh-node"] == b.identity.node_id and seen == [b"POST /v1/chat/completions HTTP/1.1"]

            # a partition splits membership in two; healing joins it again
            left, right = meshes[:10], meshes[10:]
            left_ids, right_ids = everyone - {m.identity.node_id for m in right}, {m.identity.node_id for m in right}
            network.partition(left_ids, right_ids)
            await until(
                lambda: all(member_ids(m) == left_ids for m in left) and all(member_ids(m) == right_ids for m in right),
                60,
                "the partition splits membership",
            )
            network.heal()
            await until(lambda: all(member_ids(m) == everyone for m in meshes), 120, "membership heals")

            # a node killed (silent at once, then closed) is declared dead, not left
            victim = meshes[11]
            vid = victim.identity.node_id
            network.kill(vid)
            live = [m for m in meshes if m is not victim]
            await until(lambda: all(m.is_gone(vid) and vid not in member_ids(m) for m in live), 60, "death noticed")
            scopes[11].cancel()
            assert f"member {vid} (n11) died" in caplog.text and f"member {vid} (n11) left" not in caplog.text
            tg.cancel_scope.cancel()
        await apps.aclose()
        upstream.close()
        await upstream.wait_closed()

    live: list[Mesh] = []
    with caplog.at_level(logging.INFO, "mesh_llm.mesh"):
        anyio.run(main)


def _started(status: anyio.abc.TaskStatus[Any], value: Any) -> anyio.abc.TaskStatus[None]:
    """A task status that reports `value` when the wrapped call reports it started."""

    class Status:
        def started(self, _: Any = None) -> None:
            status.started(value)

    return Status()  # type: ignore[return-value]

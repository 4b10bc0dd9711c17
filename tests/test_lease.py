"""The one lease helper (`serving/lease.py`), both halves, between two real in-process meshes over QUIC: a lease
is held exactly as long as the holder keeps its context, a refusal reaches the holder as a `BackendError` with the
granter's reason, a holder declared dead ends what was lent, and the shared request parts are validated."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from mesh_mcp.errors import BackendError, ProtocolError
from mesh_mcp.mesh import meshfile, runtime, tokens
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.mesh.quic import Connection
from mesh_mcp.mesh.wire import encode_json
from mesh_mcp.serving.lease import Grant, hold, lease_id, local_copy, requested_file
from mesh_mcp.state import NodeState

Granter = Callable[[Grant, dict[str, Any]], Awaitable[None]]


def _node(tmp_path: Path, name: str, config: Any, settings: runtime.MeshSettings) -> runtime.Mesh:
    ident = load_or_create(tmp_path / name)
    state = NodeState(node_id=ident.node_id, name=name, version="0", api_url="", console_url="")
    return runtime.Mesh(ident, config, tmp_path / name, state, settings)


def _run_pair(tmp_path: Path, granter: Granter, body: Callable[[runtime.Mesh, runtime.Mesh], Awaitable[None]]) -> None:
    """Node A grants `test-lease` streams with `granter`; node B (a client that joined A) runs `body(a, b)`."""

    async def main() -> None:
        a = _node(
            tmp_path,
            "a",
            meshfile.create(owner=load_or_create(tmp_path / "a").public_bytes),
            runtime.MeshSettings(host="127.0.0.1"),
        )

        async def on_lease(
            conn: Connection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await granter(Grant(a, conn, reader, writer), header)

        a.transport.handlers["test-lease"] = on_lease
        async with anyio.create_task_group() as tg:
            await tg.start(a.run)
            token = tokens.decode(a.invite_token())
            b = _node(
                tmp_path,
                "b",
                meshfile.from_token(token),
                runtime.MeshSettings(role="client", host="127.0.0.1", joins=(token,)),
            )
            await tg.start(b.run)
            with anyio.fail_after(30):
                while b.gossip is None or b.gossip.record(a.identity.node_id) is None:
                    await anyio.sleep(0.05)
            with anyio.fail_after(60):
                await body(a, b)
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_a_lease_is_held_until_the_holder_leaves_its_context(tmp_path: Path) -> None:
    lent, got_go, ended = anyio.Event(), anyio.Event(), anyio.Event()
    seen: dict[str, Any] = {}

    async def granter(grant: Grant, header: dict[str, Any]) -> None:
        seen["id"], seen["holder"] = lease_id(header, "id", "test"), grant.holder
        with grant.refusals(), grant.held() as gone:
            grant.ready(thing="lent", n=3)
            lent.set()
            assert await grant.next_message() == {"t": "go"}
            got_go.set()
            await grant.until_closed()
            seen["gone"] = gone.cancel_called
            ended.set()

    async def body(a: runtime.Mesh, b: runtime.Mesh) -> None:
        a_id = a.identity.node_id
        async with hold(b, a_id, "test-lease", {"id": "x-1"}, reply_within_s=30, refused="cannot lend") as held:
            assert held.node_id == a_id and held.reply == {"ok": True, "thing": "lent", "n": 3}
            assert held.addresses == b.gossip.record(a_id).addresses  # type: ignore[union-attr]
            assert lent.is_set() and not ended.is_set()
            held.writer.write(encode_json({"t": "go"}))
            await got_go.wait()
            assert not ended.is_set()  # still held: the granter waits for the stream to close
        await ended.wait()  # leaving the context closed the stream: the lease ended on the granting side
        assert seen == {"id": "x-1", "holder": b.identity.node_id, "gone": False}

    _run_pair(tmp_path, granter, body)


def test_a_refusal_reaches_the_holder_with_the_granters_reason(tmp_path: Path) -> None:
    refused: list[str] = []

    async def granter(grant: Grant, header: dict[str, Any]) -> None:
        with grant.refusals(lambda exc: refused.append(str(exc))):
            raise BackendError("no room for it here")

    async def body(a: runtime.Mesh, b: runtime.Mesh) -> None:
        a_id = a.identity.node_id
        with pytest.raises(BackendError, match=rf"^node {a_id} cannot lend: no room for it here$"):
            async with hold(b, a_id, "test-lease", {"id": "x"}, reply_within_s=30, refused="cannot lend"):
                raise AssertionError("a refused lease is never held")
        assert refused == ["no room for it here"]
        with pytest.raises(BackendError, match=r"^node 0123456789abcdef is not in the mesh$"):
            async with hold(b, "0123456789abcdef", "test-lease", {}, reply_within_s=30, refused="cannot lend"):
                raise AssertionError("unreachable")

    _run_pair(tmp_path, granter, body)


def test_a_holder_declared_dead_ends_what_was_lent(tmp_path: Path) -> None:
    outcome: dict[str, bool] = {}
    ended = anyio.Event()

    async def granter(grant: Grant, header: dict[str, Any]) -> None:
        with grant.refusals(), grant.held() as gone:
            grant.ready()
            await grant.until_closed()  # cancelled: membership says the holder is dead
            outcome["stream closed"] = True
        outcome["gone"] = gone.cancel_called
        ended.set()

    async def body(a: runtime.Mesh, b: runtime.Mesh) -> None:
        b_id = b.identity.node_id
        a.is_gone = lambda node_id: node_id == b_id  # type: ignore[method-assign]  # membership says: dead
        async with hold(b, a.identity.node_id, "test-lease", {}, reply_within_s=30, refused="cannot lend"):
            await ended.wait()  # while B still holds the stream open
        assert outcome == {"gone": True}

    _run_pair(tmp_path, granter, body)


def test_the_shared_request_parts_are_validated(tmp_path: Path) -> None:
    assert lease_id({"split": "m-1.a_b"}, "split", "split") == "m-1.a_b"
    for bad in ("", "a/b", "a b", "..\x00"):
        with pytest.raises(ProtocolError, match="a split id is 1-64 letters"):
            lease_id({"split": bad}, "split", "split")
    with pytest.raises(ProtocolError, match="too long"):
        lease_id({"split": "x" * 65}, "split", "split")
    with pytest.raises(ProtocolError):
        lease_id({"id": 7}, "id", "shard")
    assert requested_file({"file": "../../etc/passwd", "size": 5}) == ("passwd", 5)
    with pytest.raises(ProtocolError):
        requested_file({"file": "m.gguf", "size": "5"})
    (tmp_path / "m.gguf").write_bytes(b"12345")
    assert local_copy(tmp_path, "m.gguf", 5) == tmp_path / "m.gguf"
    assert local_copy(tmp_path, "m.gguf", 6) is None and local_copy(tmp_path, "n.gguf", 5) is None


def test_a_split_lease_names_the_stage_after_the_worker_or_nothing() -> None:
    from mesh_mcp.serving.rpc_worker import NextStage, parse_next_stage

    assert parse_next_stage(None) is None
    assert parse_next_stage({"node": "ab", "target": "m-1-host", "port": 9}) == NextStage("ab", "m-1-host", 9)
    for bad in (
        "ab",
        {"node": "ab", "target": "t"},
        {"node": "", "target": "t", "port": 9},
        {"node": "ab", "target": "", "port": 9},
        {"node": "ab", "target": "t", "port": 0},
        {"node": "ab", "target": "t", "port": 65536},
        {"node": "ab", "target": "t", "port": True},
        {"node": "ab", "target": "x" * 120, "port": 9},  # more than a peer link's name holds
        {"node": "ab", "target": "é" * 60, "port": 9},  # 60 characters, 120 bytes
    ):
        with pytest.raises(ProtocolError):
            parse_next_stage(bad)

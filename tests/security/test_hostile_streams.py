"""An authenticated but hostile member sends hostile input on every stream type a real node serves.

The parsers are fuzzed one by one in test_fuzz_wire.py; this runs the handlers themselves, as registered on a
running node (`gossip`, `record`, `rotate`, `evicted`, `http`, `ping`, `bb`, `bb-sync`, `rpc-lease`,
`moe-shard`, and names nobody registered), over a real authenticated QUIC connection: missing fields, wrong
types, huge numbers, long strings, nesting at and past the frame limit, lying frame lengths, garbage bodies.
Every stream must end (answered, reset or closed: bounded in time), no handler may fail unexpectedly ("stream
handler failed" is what quic.py logs for an exception nobody declared), and the node must go on serving: its
status answers and an honest node joins it afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from mesh_mcp.mesh import tokens
from mesh_mcp.mesh.credentials import Credentials
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.mesh.quic import Connection, MeshTransport
from mesh_mcp.mesh.wire import encode
from tests.harness import NodeProcess

Spawn = Callable[..., NodeProcess]

STREAM_TYPES = (
    "gossip",
    "record",
    "rotate",
    "evicted",
    "http",
    "ping",
    "bb",
    "bb-sync",
    "rpc-lease",
    "moe-shard",
    "tensors",
    "no-such-type",
)
# Field names the handlers read, and values no honest node sends.
FIELDS = (
    "m", "record", "epoch", "chain", "secret", "method", "target", "headers", "post", "posts", "digests",
    "ids", "want", "file", "size", "layers", "experts", "model", "reference", "gate", "ctx", "slots", "reason",
)  # fmt: skip
NESTED_OK: Any = 1
for _ in range(29):  # with the header object and its field: 31 levels, under the frame limit of 32
    NESTED_OK = [NESTED_OK]
HOSTILE_VALUES: tuple[Any, ...] = (
    None,
    -1,
    2**63,
    10**40,
    1.5,
    True,
    "",
    "x" * 60_000,
    "\u202e\x1b[2J",
    [],
    [None] * 2000,
    {"t": "gossip"},
    NESTED_OK,
)
GARBAGE_BODIES = (
    b"",
    encode(b"{not json"),
    encode(b"[" * 10_000),  # far past the frame depth
    b"\xff\xff\xff\xff" + b"x" * 100,  # a length prefix that lies (4 GiB)
    encode(b'{"t": "gossip", "m": {"kind": "syn"}}') * 3,
)
STREAM_WAIT_S = 20  # a handler must end its stream (answer, reset or close) within this; generous for CI


def headers_for(kind: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"t": kind}]
    out += [{"t": kind, name: value} for name, value in itertools.product(FIELDS, HOSTILE_VALUES)]
    return out


async def _attack(identity_dir: Path, token: tokens.InviteToken) -> dict[str, int]:
    """Open every hostile stream against the node; returns counts of how the streams ended."""
    identity = load_or_create(identity_dir)
    creds = Credentials(identity, token.mesh_id, token.secret, lambda _: (token.secret,))
    rogue = MeshTransport(creds, {}, host="127.0.0.9")
    ended: dict[str, int] = {"answered": 0, "reset": 0, "reconnects": 0}
    cases = [(h, b) for kind in STREAM_TYPES for h in headers_for(kind) for b in GARBAGE_BODIES[:1]]
    cases += [({"t": kind}, body) for kind in STREAM_TYPES for body in GARBAGE_BODIES]
    conn: Connection | None = None
    lock = anyio.Lock()

    async def connection() -> Connection:
        nonlocal conn
        async with lock:
            if conn is None or conn.closed_event.is_set():
                if conn is not None:
                    ended["reconnects"] += 1
                conn = await rogue.connect(token.addresses[0])
            return conn

    async def one(header: dict[str, Any], body: bytes, limit: anyio.Semaphore) -> None:
        async with limit:
            c = await connection()
            try:
                reader, writer = await c.open_stream(header)
                writer.write(body)
                writer.write_eof()
                with anyio.fail_after(STREAM_WAIT_S):
                    while await reader.read(65536):
                        pass
                ended["answered"] += 1
            except (ConnectionError, RuntimeError, asyncio.IncompleteReadError):
                ended["reset"] += 1

    async with anyio.create_task_group() as tg:
        await tg.start(rogue.run)
        limit = anyio.Semaphore(16)
        async with anyio.create_task_group() as attack:
            for header, body in cases:
                attack.start_soon(one, header, body, limit)
        tg.cancel_scope.cancel()
    ended["streams"] = len(cases)
    return ended


@pytest.mark.slow
def test_hostile_input_on_every_stream_type_crashes_nothing(llama: object, spawn: Spawn, tmp_path: Path) -> None:
    # a member that serves nothing yet: it registers every stream type (leases included) and carries the board
    target = spawn("--mesh-host", "127.0.0.2", "--blackboard", name="target")
    token_text = str(target.wait_for("token", lambda s: bool(s.get("invite_token")), 60)["invite_token"])
    target.wait_for("blackboard", lambda s: (s.get("blackboard") or {}).get("state") == "ready", 120)
    ended = anyio.run(_attack, tmp_path / "hostile", tokens.decode(token_text))
    print(f"hostile streams: {ended}")
    assert ended["streams"] == ended["answered"] + ended["reset"] > 3000
    assert ended["answered"] > 0  # the node really served these streams (a dead node would reset them all)
    assert target.proc is not None and target.proc.poll() is None
    log = target.log()
    assert "stream handler failed" not in log and "Traceback" not in log, log[-4000:]
    # and it still does its job: an honest node joins and both see each other
    honest = spawn("--mesh-host", "127.0.0.3", "--client", "--blackboard", "--join", token_text, name="honest")
    honest.wait_for("the target as a peer", lambda s: target.status()["node_id"] in {p["node_id"] for p in s["peers"]})
    assert target.status()["blackboard"]["state"] == "ready"

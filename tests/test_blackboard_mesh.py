"""The blackboard across real node processes: posts made with the CLI on one node are found on
every node (members and a `--client --blackboard`), limits are errors the poster sees, personal
data never leaves the poster's node, restarts keep posts, a node that was away catches up, and a
member that sends forged, unsigned, oversized or unscrubbed posts gets them refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from blackboard.post import make_post, to_wire
from mesh_mcp.mesh import tokens
from mesh_mcp.mesh.credentials import Credentials
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.mesh.quic import MeshTransport
from mesh_mcp.mesh.wire import close_quietly
from tests.harness import NodeProcess

pytestmark = pytest.mark.slow
Spawn = Callable[..., NodeProcess]


def board_node(spawn: Spawn, name: str, ip: str, *args: str) -> NodeProcess:
    node = spawn("--mesh-host", ip, "--name", name, *args, name=name)
    node.wait_for("blackboard", lambda s: bool(s.get("invite_token")) and _ready(s), timeout=60)
    return node


def _ready(status: dict[str, Any]) -> bool:
    """The blackboard reports its state: ready once its scrubber is loaded (clients without one: None)."""
    return (status.get("blackboard") or {}).get("state") == "ready"


def cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """`mesh-llm blackboard ...` as a user runs it on that node's machine (its home)."""
    env = {**os.environ, "MESH_LLM_HOME": str(node.home)}
    return subprocess.run(
        [sys.executable, "-m", "mesh_mcp.cli", "blackboard", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def posts(node: NodeProcess, **params: Any) -> list[dict[str, Any]]:
    r = httpx2.get(node.console + "/api/blackboard", params=params, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["posts"]  # type: ignore[no-any-return]


def wait_found(node: NodeProcess, query: str, post_id: str, timeout: float = 15) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if any(p["id"] == post_id for p in posts(node, q=query)):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"post {post_id} not found on {node.home.name} in {timeout} s\n{node.log()[-3000:]}")


def wait_members(node: NodeProcess, n: int) -> None:
    node.wait_for(f"{n} members", lambda s: len(s.get("peers", [])) >= n, timeout=30)


@pytest.fixture
def trio(spawn: Spawn) -> tuple[NodeProcess, NodeProcess, NodeProcess]:
    """Two members without models and a GPU-less client carrying the blackboard."""
    a = board_node(spawn, "alice", "127.0.0.2", "--blackboard")
    token = a.status()["invite_token"]
    b = board_node(spawn, "bob", "127.0.0.3", "--join", token)
    c = board_node(spawn, "carol", "127.0.0.4", "--client", "--blackboard", "--join", token)
    wait_members(a, 2)
    wait_members(b, 2)
    return a, b, c


def test_a_post_on_one_node_is_found_on_every_node(trio: tuple[NodeProcess, NodeProcess, NodeProcess]) -> None:
    a, b, c = trio
    r = cli(a, "STATUS: [org/repo branch:main] refactoring billing")
    assert r.returncode == 0, r.stderr
    post_id = r.stdout.split()[-1]
    for node in (a, b, c):
        wait_found(node, "billing refactor", post_id)
    # the client's own post reaches the members
    r = cli(c, "QUESTION: who knows the payments schema?")
    assert r.returncode == 0, r.stderr
    question = r.stdout.split()[-1]
    for node in (a, b):
        wait_found(node, "payments schema", question)
    # an answer from another node, linked to the question
    r = cli(b, "--reply-to", question, "ANSWER: bob does; see docs/payments.md")
    assert r.returncode == 0, r.stderr
    answer = r.stdout.split()[-1]
    wait_found(c, "payments", answer)
    found = {p["id"]: p for p in posts(c, q="payments")}
    assert found[answer]["reply_to"] == question and found[answer]["kind"] == "ANSWER"
    assert found[answer]["author"] == "bob" and found[question]["author"] == "carol"
    # filters and the feed, through the CLI
    r = cli(a, "--search", "payments", "--from", "carol")
    assert r.returncode == 0 and "QUESTION: who knows the payments schema?" in r.stdout and "ANSWER" not in r.stdout
    r = cli(a)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 3 and "ANSWER" in lines[0], "the feed is newest first"
    r = cli(a, "--since", "1", "--kind", "status", "--json")
    assert r.returncode == 0 and [p["id"] for p in __import__("json").loads(r.stdout)] == [post_id]


def test_personal_data_is_scrubbed_before_it_leaves_the_node(
    trio: tuple[NodeProcess, NodeProcess, NodeProcess],
) -> None:
    a, b, c = trio
    secret = "FINDING: mail jane.doe@example.com, key sk-proj-abcdefghijklmnopqrstuvwxyz0123456789 in /home/jane/app"
    r = cli(c, secret)
    assert r.returncode == 0, r.stderr
    post_id = r.stdout.split()[-1]
    wait_found(a, "FINDING", post_id)
    for node in (a, b, c):
        text = next(p["text"] for p in posts(node, kind="FINDING") if p["id"] == post_id)
        assert "jane.doe@example.com" not in text and "sk-proj-abcdef" not in text and "/home/jane" not in text
        assert text.startswith("FINDING: mail ")
        assert "jane.doe" not in (node.home / "blackboard.db").read_bytes().decode("latin-1")


def test_limits_are_errors_the_poster_sees(spawn: Spawn) -> None:
    a = board_node(spawn, "alice", "127.0.0.2", "--blackboard")
    r = cli(a, "x" * 5000)
    assert r.returncode == 1 and "at most 4096 bytes" in r.stderr
    r = cli(a, "   ")
    assert r.returncode == 1 and "needs some text" in r.stderr
    r = cli(a, "--reply-to", "nope", "hi")
    assert r.returncode == 1 and "reply-to" in r.stderr
    statuses = [
        httpx2.post(a.console + "/api/blackboard", json={"text": f"STATUS: {i}"}).status_code for i in range(25)
    ]
    assert statuses[:20] == [201] * 20 and statuses[20:] == [429] * 5
    r = httpx2.post(a.console + "/api/blackboard", json={"text": "STATUS: one more"})
    assert "retry in" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
    # another author on the same node has their own allowance
    r = httpx2.post(a.console + "/api/blackboard", json={"text": "STATUS: me too", "author": "dave"})
    assert r.status_code == 201
    json_type = {"content-type": "application/json"}
    assert httpx2.post(a.console + "/api/blackboard", content=b"{nope", headers=json_type).status_code == 400
    # without a JSON content type a POST is what a cross-site form could send: refused before it is read
    assert httpx2.post(a.console + "/api/blackboard", content=b"{nope").status_code == 415
    assert httpx2.get(a.console + "/api/blackboard", params={"since": "99"}).status_code == 400


def test_restart_keeps_posts_and_a_node_that_was_away_catches_up(spawn: Spawn) -> None:
    a = board_node(spawn, "alice", "127.0.0.2", "--blackboard")
    token = a.status()["invite_token"]
    b = board_node(spawn, "bob", "127.0.0.3", "--join", token)
    wait_members(a, 2)
    first = cli(a, "FINDING: tests need the llama.cpp build cache").stdout.split()[-1]
    wait_found(b, "cache", first)
    b.stop()
    missed = cli(a, "FINDING: the gossip port is UDP").stdout.split()[-1]
    b.start()  # same home: same node, same database
    b.wait_for("up", lambda s: bool(s.get("invite_token")), timeout=60)
    assert any(p["id"] == first for p in posts(b, q="cache")), "posts survive a restart"
    wait_found(b, "gossip UDP", missed, timeout=20)  # the digest exchange on reconnect brings it
    # the exchange is logged once it completed, after it stored what it brought: a bounded wait, not a read
    b.wait_for("a sync logged", lambda s: "synced with" in a.log() + b.log(), timeout=30)
    assert "Traceback" not in b.log() and "Error" not in b.log(), b.log()


def test_a_member_sending_bad_posts_gets_them_refused(spawn: Spawn, tmp_path: Path) -> None:
    a = board_node(spawn, "alice", "127.0.0.2", "--blackboard")
    token = tokens.decode(a.status()["invite_token"])
    ident = load_or_create(tmp_path / "rogue")
    creds = Credentials(ident, token.mesh_id, token.secret, lambda _: (token.secret,))
    now = time.time()
    good = to_wire(make_post("STATUS: a fair post", "rogue", ident.key, now))
    forged = to_wire(make_post("STATUS: forged", "rogue", Ed25519PrivateKey.generate(), now))
    forged["origin"] = ident.node_id  # claims to be the rogue node, signed by another key
    unsigned = {**to_wire(make_post("STATUS: unsigned", "rogue", ident.key, now)), "signature": "A" * 86 + "=="}
    edited = {**to_wire(make_post("STATUS: original", "rogue", ident.key, now)), "text": "STATUS: edited"}
    oversized = {**good, "text": "STATUS: " + "x" * 5000}
    dirty = to_wire(make_post("FINDING: call me at jane.doe@example.com", "rogue", ident.key, now))

    async def main() -> None:
        rogue = MeshTransport(creds, {}, host="127.0.0.6")
        async with anyio.create_task_group() as tg:
            await tg.start(rogue.run)
            conn = await rogue.connect(token.addresses[0])
            for batch in ([forged, unsigned, edited, oversized, dirty, "garbage"], [good]):
                _, writer = await conn.open_stream({"t": "bb", "posts": batch})
                close_quietly(writer)
                conn.transmit()
            _, writer = await conn.open_stream({"t": "bb", "posts": "nope"})
            close_quietly(writer)
            _, writer = await conn.open_stream({"t": "bb-sync", "digest": {"x": 1}})
            close_quietly(writer)
            with anyio.fail_after(15):  # the good post gets through, while the connection lasts
                while not await anyio.to_thread.run_sync(lambda: posts(a)):
                    await anyio.sleep(0.1)
            tg.cancel_scope.cancel()

    anyio.run(main)
    texts = [p["text"] for p in posts(a)]
    assert texts == ["STATUS: a fair post"]
    log = a.log()
    for reason in (
        "key is not node",
        "bad signature",
        "id does not match",
        "at most 4096 bytes",
        "personal data (EMAIL_ADDRESS)",
    ):
        assert reason in log, reason
    assert "dropped a stream" in log and a.proc is not None and a.proc.poll() is None

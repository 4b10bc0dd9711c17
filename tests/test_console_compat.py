"""Issue 19, the reference implementation's console API as compatibility aliases: `POST /api/blackboard/post`,
`GET /api/blackboard/feed` and `/search` (bare arrays) over the same board, guards and limits as `/api/blackboard`;
`llama_ready` and `token` in `/api/status` (the token to this machine only, never to a remote viewer); every console
error as JSON; and `mesh-llm blackboard`'s `--json` output and exit codes. In-process against a real `Board` and the
guarded console app, then against a real `--client --blackboard` node over plain HTTP and the CLI as a subprocess,
with the checks the reference's own blackboard and two-node smoke scripts make.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from blackboard.board import MAX_RESULTS, Board
from blackboard.scrub import default_scrubber
from blackboard.store import Store
from mesh_mcp.api.console import build_console, compat_window, llama_ready
from mesh_mcp.api.errors import HttpError
from mesh_mcp.api.guard import CONSOLE, Policy
from mesh_mcp.api.middleware import HttpGuard
from mesh_mcp.state import NodeState
from tests.harness import NodeProcess

KEY = "compat-test-key"
SECRET = "mesh1SECRET-TOKEN"
REMOTE = ("10.1.2.3", 5555)  # a viewer on another machine
LISTEN_ALL = Policy(listen_all=True, api_keys=(KEY,))
LOOPBACK = Policy()
Request = tuple[str, str, Any] | tuple[str, str, Any, dict[str, str]]


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Board]:
    scrubber = default_scrubber()
    with Store(tmp_path / "blackboard.db") as store:
        yield Board(store, Ed25519PrivateKey.generate(), "0123456789abcdef", "me", lambda: scrubber)


def make_node() -> NodeState:
    return NodeState(node_id="0123456789abcdef", name="me", version="0", api_url="", console_url="",
                     invite_token=SECRET)  # fmt: skip


def console(
    board: Board | None,
    *requests: Request,
    node: NodeState | None = None,
    policy: Policy = LOOPBACK,
    client: tuple[str, int] = ("127.0.0.1", 123),
    base: str = "http://127.0.0.1:3131",
) -> list[httpx2.Response]:
    """`requests` (method, path, JSON body or raw bytes, headers?) in order, to a guarded console."""

    async def go() -> list[httpx2.Response]:
        app = HttpGuard(build_console(node or make_node(), None, board), policy, CONSOLE)
        transport = httpx2.ASGITransport(app=app, client=client)
        async with httpx2.AsyncClient(transport=transport, base_url=base) as c:
            out = []
            for method, path, body, *more in requests:
                headers = more[0] if more else {}
                if isinstance(body, bytes):
                    out.append(await c.request(method, path, content=body, headers=headers))
                else:
                    out.append(await c.request(method, path, json=body, headers=headers))
            return out

    return anyio.run(go)


def from_afar(board: Board | None, *requests: Request) -> list[httpx2.Response]:
    """`requests` to a `--listen-all` console with a key, from a viewer on another machine."""
    return console(board, *requests, policy=LISTEN_ALL, client=REMOTE, base="http://10.0.0.1:3131")


# --- the aliases, in process ----------------------------------------------------------------------------------------


def test_post_feed_and_search_aliases_answer_the_references_shapes(board: Board) -> None:
    before = time.time()
    posted, other, feed, search, none, limited, since, native = console(
        board,
        ("POST", "/api/blackboard/post", {"text": "Hello from Node A - testing the whiteboard"}),
        ("POST", "/api/blackboard/post", {"text": "STATUS: second", "from": "alice", "peer_id": "ignored"}),
        ("GET", "/api/blackboard/feed", None),
        ("GET", "/api/blackboard/search?q=whiteboard", None),
        ("GET", "/api/blackboard/search?q=zzzznonexistent", None),
        ("GET", "/api/blackboard/feed?limit=1", None),
        ("GET", f"/api/blackboard/feed?since={int(before) - 3600}&from=alice", None),
        ("GET", "/api/blackboard", None),
    )
    assert posted.status_code == 200, posted.text  # the reference answers 200 with the post
    item = posted.json()
    assert item["text"] == "Hello from Node A - testing the whiteboard" and len(item["id"]) == 32
    assert item["from"] == item["author"] == "me" and item["peer_id"] == item["origin"] and len(item["origin"]) == 16
    assert isinstance(item["timestamp"], int) and int(before) <= item["timestamp"] <= time.time()
    assert other.json()["from"] == "alice" and other.json()["kind"] == "STATUS"  # `from` names the author
    assert [p["id"] for p in feed.json()] == [other.json()["id"], item["id"]]  # a bare array, newest first
    assert feed.json()[1] == item
    assert [p["text"] for p in search.json()] == [item["text"]]
    assert none.status_code == 200 and none.json() == []
    assert len(limited.json()) == 1
    assert [p["from"] for p in since.json()] == ["alice"]
    # one board: the native route sees the aliases' posts
    assert {p["id"] for p in native.json()["posts"]} == {item["id"], other.json()["id"]}


def test_the_aliases_refuse_like_the_native_route(board: Board) -> None:
    empty, not_text, not_json, bad_since, *burst = console(
        board,
        ("POST", "/api/blackboard/post", {"text": ""}),
        ("POST", "/api/blackboard/post", {"text": 5}),
        ("POST", "/api/blackboard/post", b"{not json", {"content-type": "application/json"}),
        ("GET", "/api/blackboard/search?q=x&since=yesterday", None),
        *[("POST", "/api/blackboard/post", {"text": f"post {i}", "from": "bob"}) for i in range(21)],
    )
    assert empty.status_code == 400 and empty.json() == {"error": {"message": "a post needs some text"}}
    assert not_text.status_code == 400 and '"text"' in not_text.json()["error"]["message"]
    assert not_json.status_code == 400 and not_json.json()["error"]["message"]
    assert bad_since.status_code == 400 and "unix seconds" in bad_since.json()["error"]["message"]
    codes = [r.status_code for r in burst]
    assert codes[:20] == [200] * 20 and codes[20] == 429  # the same rate limit as /api/blackboard
    assert int(burst[20].headers["retry-after"]) >= 1


def test_the_aliases_are_guarded_like_the_blackboard(board: Board) -> None:
    keyed = {"authorization": f"Bearer {KEY}"}
    no_key_feed, no_key_post, key_post, key_feed = from_afar(
        board,
        ("GET", "/api/blackboard/feed", None),
        ("POST", "/api/blackboard/post", {"text": "from afar"}),
        ("POST", "/api/blackboard/post", {"text": "from afar"}, keyed),
        ("GET", "/api/blackboard/search?q=afar", None, keyed),
    )
    assert no_key_feed.status_code == 401 and no_key_post.status_code == 401
    assert no_key_feed.json()["error"]["message"]
    assert key_post.status_code == 200 and [p["id"] for p in key_feed.json()] == [key_post.json()["id"]]
    # CSRF: a body any web page could send is refused, and a body over the console's limit
    (form, big) = console(
        board,
        ("POST", "/api/blackboard/post", b'{"text": "pwned"}', {"content-type": "text/plain"}),
        ("POST", "/api/blackboard/post", b"x" * (65 << 10), {"content-type": "application/json"}),
    )
    assert form.status_code == 415 and big.status_code == 413


def test_without_a_blackboard_the_aliases_say_how_to_get_one() -> None:
    for r in console(None, ("GET", "/api/blackboard/feed", None), ("POST", "/api/blackboard/post", {"text": "x"})):
        assert r.status_code == 404 and "--blackboard" in r.json()["error"]["message"]


def test_compat_window_reads_unix_seconds_and_holds_the_limit() -> None:
    now = 1_700_000_000.0
    assert compat_window(None, None, now) == (None, 20)
    assert compat_window("0", "5", now) == (None, 5)
    assert compat_window(str(now - 7200), "500", now) == (2.0, MAX_RESULTS)
    assert compat_window(str(now - 49 * 3600), "0", now) == (None, 1)  # older than any post lives: no filter
    assert compat_window(str(now + 60), None, now) == (1 / 3600, 20)  # at or past now: the last second
    with pytest.raises(HttpError) as refused:
        compat_window("1h", None, now)
    assert refused.value.status == 400


# --- every console error is JSON ------------------------------------------------------------------------------------


def test_unknown_routes_and_wrong_methods_are_json() -> None:
    unknown, deep, post_wrong, status_post, get_control, post_control = console(
        None,
        ("GET", "/api/x", None),
        ("GET", "/api/blackboard/nothing", None),
        ("GET", "/api/blackboard/post", None),
        ("POST", "/api/status", {}),
        ("GET", "/api/drop", None),
        ("POST", "/api/nothing", {}),
    )
    assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/json"
    assert unknown.json() == {"error": {"message": "no such console route: GET /api/x"}}
    assert deep.status_code == 404 and "/api/blackboard/nothing" in deep.json()["error"]["message"]
    assert post_wrong.status_code == 405 and post_wrong.headers["allow"] == "POST"
    assert post_wrong.json()["error"]["message"] == "/api/blackboard/post does not take GET; it takes POST"
    assert status_post.status_code == 405 and "GET" in status_post.headers["allow"] and status_post.json()["error"]
    assert get_control.status_code == 405 and get_control.json()["error"]
    assert post_control.status_code == 404 and post_control.json() == {"error": {"message": "no such control"}}


# --- the status: llama_ready and token ------------------------------------------------------------------------------


def test_llama_ready_is_a_model_serving_here_or_in_the_mesh() -> None:
    assert not llama_ready({"models": [{"state": "loading"}], "mesh": {"models": [{"servers": []}]}})
    assert llama_ready({"models": [{"state": "serving"}], "mesh": {"models": []}})
    assert llama_ready({"models": [], "mesh": {"models": [{"name": "m", "servers": ["0123456789abcdef"]}]}})
    node = make_node()
    (before,) = console(None, ("GET", "/api/status", None), node=node)
    node.update_model("SmolLM2", state="serving")
    (after,) = console(None, ("GET", "/api/status", None), node=node)
    assert before.json()["llama_ready"] is False and after.json()["llama_ready"] is True


def test_token_is_for_this_machine_only() -> None:
    (local,) = console(None, ("GET", "/api/status", None))
    assert local.json()["token"] == local.json()["invite_token"] == SECRET
    keyed = {"authorization": f"Bearer {KEY}"}
    (viewer, with_key) = from_afar(None, ("GET", "/api/status", None), ("GET", "/api/status", None, keyed))
    for r in (viewer, with_key):  # a key lets a remote viewer in, never to the secret
        assert r.status_code == 200 and "token" not in r.json() and "invite_token" not in r.json()
        assert SECRET not in r.text and r.json()["llama_ready"] is False
    # a page on this machine that rebound its name, on a --listen-all node: no secret either
    (rebound,) = console(None, ("GET", "/api/status", None, keyed), policy=LISTEN_ALL, base="http://evil.test:3131")
    assert rebound.status_code == 200 and "token" not in rebound.json() and SECRET not in rebound.text
    # a node that has no token yet says so with an empty string (the reference's scripts test `-n "$TOKEN"`)
    node = make_node()
    node.invite_token = None
    (fresh,) = console(None, ("GET", "/api/status", None), node=node)
    assert fresh.json()["token"] == ""


# --- a real node over plain HTTP, and the CLI -----------------------------------------------------------------------


def cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESH_LLM_HOME": str(node.home)}
    cmd = [sys.executable, "-m", "mesh_mcp.cli", "blackboard", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_a_node_answers_the_references_blackboard_script(tmp_path: Path) -> None:
    node = NodeProcess(home=tmp_path / "a", args=["--client", "--blackboard"]).start()
    try:
        status = node.wait_for("blackboard", lambda s: (s.get("blackboard") or {}).get("state") == "ready", 120)
        assert status["token"] == status["invite_token"] and status["token"].startswith("mesh1")
        assert status["llama_ready"] is False  # a client alone: no model anywhere
        base = node.console
        # the reference's test_blackboard.sh, its curl calls as plain HTTP
        r = httpx2.post(base + "/api/blackboard/post", json={"text": "Hello from Node A - testing the whiteboard"})
        assert r.status_code == 200 and "id" in r.json()
        assert len(httpx2.get(base + "/api/blackboard/feed").json()) >= 1
        assert len(httpx2.get(base + "/api/blackboard/search?q=whiteboard").json()) >= 1
        assert httpx2.get(base + "/api/blackboard/search?q=zzzznonexistent").json() == []
        empty = httpx2.post(base + "/api/blackboard/post", json={"text": ""})
        assert empty.status_code == 400 and "error" in empty.json()
        assert len(httpx2.get(base + "/api/blackboard/feed?limit=2").json()) <= 2
        missing = httpx2.get(base + "/api/nope")
        assert missing.status_code == 404 and missing.json()["error"]["message"]

        # the CLI: the reference's checks (its --port, "Posted"), then --json and the exit codes
        port = str(node.console_port)
        feed = cli(node, "--port", port, "--limit", "5")
        assert feed.returncode == 0 and "whiteboard" in feed.stdout
        assert "whiteboard" in cli(node, "--search", "whiteboard", "--port", port).stdout
        posted = cli(node, "CLI post test message")
        assert posted.returncode == 0 and posted.stdout.startswith("Posted ")
        as_json = cli(node, "FINDING: json out", "--json")
        assert as_json.returncode == 0
        post = json.loads(as_json.stdout)
        assert post["text"] == "FINDING: json out" and post["kind"] == "FINDING"
        found = cli(node, "--search", "json out", "--json")
        assert found.returncode == 0 and [p["id"] for p in json.loads(found.stdout)] == [post["id"]]
        listed = json.loads(cli(node, "--json", "--limit", "2").stdout)
        assert listed[0]["id"] == post["id"] and len(listed) == 2
        refused = cli(node, "   ", "--json")  # exit 1: the node refused; the error as JSON on stderr
        assert refused.returncode == 1 and refused.stdout == ""
        assert json.loads(refused.stderr) == {"error": {"message": "a post needs some text", "status": 400}}
        refused_text = cli(node, "--reply-to", "nope", "hi")
        assert refused_text.returncode == 1 and refused_text.stderr.startswith("mesh-llm: ")
        for usage in (["--limit", "0"], ["--limit", "101"], ["--since", "-1"], ["x", "--search", "y"], ["--nope"]):
            bad = cli(node, *usage)  # exit 2: found before asking the node
            assert bad.returncode == 2 and bad.stdout == "" and "usage:" in bad.stderr, (usage, bad.stderr)
    finally:
        node.stop()


@pytest.mark.slow
def test_the_references_two_node_wait_llama_ready_and_token(spawn: Callable[..., NodeProcess], smollm: Path) -> None:
    """scripts/ci-two-node-client-serving-smoke.sh: wait for the host's `llama_ready` and `token`, join a client with
    that token; the client is ready too once the host's model is in its mesh (the reference's remote target)."""
    host = spawn("--mesh-host", "127.0.0.2", "--model", str(smollm), name="host")
    ready = host.wait_for("llama_ready and token", lambda s: s.get("llama_ready") is True and bool(s.get("token")))
    assert any(m["state"] == "serving" for m in ready["models"])
    client = spawn("--mesh-host", "127.0.0.3", "--client", "--join", ready["token"], name="client")
    client.wait_for("the client's llama_ready", lambda s: s.get("llama_ready") is True, timeout=60)
    listed = httpx2.get(client.api + "/v1/models", timeout=10).json()["data"]
    assert smollm.stem in [m["id"] for m in listed]


def test_exit_1_as_json_when_no_node_runs(tmp_path: Path) -> None:
    node = NodeProcess(home=tmp_path / "none", args=[])  # never started: nothing listens on its port
    r = cli(node, "--json", "--port", str(node.console_port))
    assert r.returncode == 1 and r.stdout == ""
    assert "mesh-llm --client --blackboard" in json.loads(r.stderr)["error"]["message"]


def test_install_skill_json(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "MESH_LLM_HOME": str(tmp_path / "mesh")}
    cmd = [sys.executable, "-m", "mesh_mcp.cli", "blackboard", "install-skill", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["action"] for row in rows} == {"installed"} and len(rows) == 3
    assert all(Path(row["path"]).is_file() for row in rows)

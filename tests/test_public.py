"""Issue 15 as users run it: public meshes on a real Nostr relay (and the LAN), real node processes on loopback.

- two meshes published (one unnamed, one named): `mesh-llm discover` lists both with their fields; a client started
  with `--auto` joins the unnamed (community) one, by the documented rule; a private mesh never reaches the relay;
- three nodes started at once with the same `--auto --mesh-name` end in one mesh that serves through every node;
- `--max-clients`: the mesh is delisted while full and listed again when the client leaves;
- a killed publisher: an `--auto` member notices its listing has no live publisher and lists the mesh itself;
- no relay reachable at all: the same `--auto --mesh-name` finds the mesh on the LAN (mDNS on loopback);
- a `--client --auto` started before any mesh is listed: its console says it searches, then it joins the one that
  appears.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest

from mesh_mcp.discovery.listing import KIND, Listing
from tests.conftest import SMOLLM
from tests.harness import NodeProcess
from tests.relay import Relay, relay_fixture  # noqa: F401  (the `relay` fixture)
from tests.security.test_dead_peer import kill_node
from tests.test_mesh import Spawn, mesh_node, wait_models

pytestmark = pytest.mark.slow

CHAT: dict[str, Any] = {"model": SMOLLM, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
DEAD_RELAY = "ws://127.0.0.1:9"  # nothing listens: "no relay reachable"


def listings(relay: Relay) -> dict[str, list[dict[str, Any]]]:
    """Mesh id → the live listing events on the relay (withdrawn ones are deleted or replaced by an empty one)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for event in relay.stored():
        if event.get("kind") == KIND and event.get("content"):
            mesh_id = Listing.from_bytes(event["content"].encode()).mesh_id
            out.setdefault(mesh_id, []).append(event)
    return out


def wait_until(what: str, check: Callable[[], Any], timeout: float, node: NodeProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout:.0f} s: {what}" + (f"\n{node.log()[-4000:]}" if node else ""))


def discover(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    env = {**os.environ, "MESH_LLM_HOME": str(tmp_path / "discover-home")}
    out = subprocess.run(
        [sys.executable, "-m", "mesh_mcp.cli", "discover", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    return json.loads(out.stdout)


def mesh_of(node: NodeProcess) -> str:
    return str(node.wait_for("a mesh id", lambda s: bool(s.get("mesh_id")), timeout=60)["mesh_id"])


def test_discover_lists_published_meshes_auto_joins_the_preferred_and_a_private_mesh_stays_off_the_relay(
    spawn: Spawn, relay: Relay, smollm: object, tmp_path: Path
) -> None:
    r = ("--nostr-relay", relay.url)
    a = mesh_node(spawn, "a", "127.0.0.2", "--model", SMOLLM, "--publish", "--region", "lab", *r)
    b = mesh_node(spawn, "b", "127.0.0.3", "--mesh-name", "poker-night", *r)
    private = mesh_node(spawn, "p", "127.0.0.4", "--model", SMOLLM, *r)
    a.wait_model_state(SMOLLM, "serving", timeout=240)
    a_mesh, b_mesh, p_mesh = mesh_of(a), mesh_of(b), mesh_of(private)

    def both_listed() -> bool:
        now = listings(relay)
        if not {a_mesh, b_mesh} <= set(now):
            return False
        return SMOLLM in Listing.from_bytes(now[a_mesh][-1]["content"].encode()).served

    wait_until("both listings on the relay, A's serving SmolLM2", both_listed, 120, a)

    found = {row["mesh_id"]: row for row in discover(tmp_path, *r, "--no-lan")}
    assert set(found) >= {a_mesh, b_mesh}
    assert found[a_mesh]["name"] is None and found[a_mesh]["region"] == "lab"
    assert found[a_mesh]["served"] == [SMOLLM] and found[a_mesh]["nodes"] == 1 and found[a_mesh]["compatible"]
    assert found[a_mesh]["latency_ms"] is not None  # the QUIC probe reached A's listed address
    assert found[b_mesh]["name"] == "poker-night" and found[b_mesh]["served"] == []
    only_named = discover(tmp_path, *r, "--no-lan", "--model", "smollm2")
    assert [row["mesh_id"] for row in only_named] == [a_mesh]

    c = mesh_node(spawn, "c", "127.0.0.5", "--client", "--auto", *r)
    assert mesh_of(c) == a_mesh, c.log()[-3000:]  # unnamed (community) meshes first, and A serves a model
    c.wait_log(r"--auto: joining the best of \d+ mesh", timeout=5)
    wait_models(c, {SMOLLM}, timeout=60)  # joined is not yet synced: A's record (its model) comes by gossip
    answered = httpx2.post(c.api + "/v1/chat/completions", json=CHAT, timeout=120)
    assert answered.status_code == 200, answered.text

    assert p_mesh not in listings(relay), "a private mesh was published"
    assert p_mesh not in {row["mesh_id"] for row in discover(tmp_path, "--nostr-relay", DEAD_RELAY)}  # nor on the LAN


def test_three_nodes_started_at_once_with_one_mesh_name_end_in_one_mesh(
    spawn: Spawn, relay: Relay, smollm: object
) -> None:
    args = ("--auto", "--mesh-name", "party", "--model", SMOLLM, "--nostr-relay", relay.url)
    nodes = [mesh_node(spawn, n, f"127.0.0.{i + 2}", *args) for i, n in enumerate(("x", "y", "z"))]

    def one_mesh() -> str | None:
        try:  # a node that lost the race restarts into the winner's mesh: its API is down for a moment
            statuses = [n.status() for n in nodes]
        except httpx2.TransportError:
            return None
        ids = {s.get("mesh_id") for s in statuses}
        sizes = {len(s["peers"]) for s in statuses}
        return ids.pop() if len(ids) == 1 and None not in ids and sizes == {3} else None

    winner = wait_until("the three nodes in one mesh", one_mesh, 240, nodes[0])
    for n in nodes:
        n.wait_model_state(SMOLLM, "serving", timeout=240)
        r = httpx2.post(n.api + "/v1/chat/completions", json=CHAT, timeout=120)
        assert r.status_code == 200, r.text
    named = [m for m, evs in listings(relay).items() if any('"party"' in e["content"] for e in evs)]
    assert winner in named
    publishers = {e["pubkey"] for e in listings(relay)[winner]}
    assert len(publishers) == 1, "the nodes that moved in publish the winner's mesh too"


def test_a_full_mesh_is_delisted_and_listed_again_when_a_client_leaves(
    spawn: Spawn, relay: Relay, smollm: object
) -> None:
    a = mesh_node(
        spawn, "a", "127.0.0.2", "--model", SMOLLM, "--publish", "--max-clients", "1", "--nostr-relay", relay.url
    )
    mesh = mesh_of(a)
    wait_until("A listed", lambda: mesh in listings(relay), 120, a)
    c = mesh_node(spawn, "c", "127.0.0.3", "--client", "--auto", "--nostr-relay", relay.url)
    assert mesh_of(c) == mesh
    a.wait_log(r"delisted mesh \w+: 1 clients connected, the --max-clients of 1", timeout=60)
    wait_until("A's listing withdrawn", lambda: mesh not in listings(relay), 60, a)
    c.stop()
    wait_until("A listed again once the client left", lambda: mesh in listings(relay), 120, a)


def test_an_auto_member_lists_the_mesh_when_its_publisher_dies(spawn: Spawn, relay: Relay, smollm: object) -> None:
    a = mesh_node(spawn, "a", "127.0.0.2", "--model", SMOLLM, "--publish", "--nostr-relay", relay.url)
    mesh = mesh_of(a)
    wait_until("A listed", lambda: mesh in listings(relay), 120, a)
    b = mesh_node(spawn, "b", "127.0.0.3", "--auto", "--model", SMOLLM, "--nostr-relay", relay.url)
    assert mesh_of(b) == mesh
    b.wait_model_state(SMOLLM, "serving", timeout=240)
    authors = {e["pubkey"] for e in listings(relay)[mesh]}
    kill_node(a)
    b.wait_log(r"mesh \w+ is not listed by a live member \(its publisher left the mesh\)", timeout=180)
    wait_until("B's listing of the mesh", lambda: {e["pubkey"] for e in listings(relay).get(mesh, [])} - authors,
               60, b)  # fmt: skip


def test_with_no_relay_reachable_nodes_find_each_other_on_the_lan(spawn: Spawn, smollm: object) -> None:
    args = ("--auto", "--mesh-name", "offline", "--model", SMOLLM, "--nostr-relay", DEAD_RELAY)
    first = mesh_node(spawn, "x", "127.0.0.2", *args)
    mesh = mesh_of(first)
    first.wait_log(r"listed mesh \w+ as 'offline' on the LAN", timeout=120)
    second = mesh_node(spawn, "y", "127.0.0.3", *args)
    assert mesh_of(second) == mesh, second.log()[-3000:]
    second.wait_model_state(SMOLLM, "serving", timeout=240)
    r = httpx2.post(second.api + "/v1/chat/completions", json=CHAT, timeout=120)
    assert r.status_code == 200, r.text


def test_a_client_started_before_any_mesh_exists_says_it_is_searching_then_joins_one(
    spawn: Spawn, relay: Relay, smollm: object
) -> None:
    """`--client --auto` with nothing listed yet: its console and API answer at once (searching; the same guard as
    ever), it keeps looking, and it joins the mesh that appears; the real console then takes the same ports."""
    r = ("--nostr-relay", relay.url)
    c = mesh_node(spawn, "c", "127.0.0.6", "--client", "--auto", *r)
    status = c.wait_for("the console saying it searches", lambda s: s.get("state") == "searching", timeout=60)
    assert status["discovery"]["state"] == "searching" and status["llama_ready"] is False and status["models"] == []
    assert httpx2.get(c.api + "/v1/models", timeout=10).json() == {"object": "list", "data": []}
    busy = httpx2.post(c.api + "/v1/chat/completions", json=CHAT, timeout=10)
    assert busy.status_code == 503 and busy.headers["retry-after"] and busy.json()["error"]["code"] == "not_ready"
    rebound = httpx2.get(c.console + "/api/status", headers={"Host": "evil.example"}, timeout=10)
    assert rebound.status_code == 421, "the node's guard stands while it searches (DNS rebinding)"
    evil = {"Origin": "https://evil.example"}
    page = httpx2.post(c.api + "/v1/chat/completions", json=CHAT, headers=evil, timeout=10)
    assert page.status_code == 403, "a web page in the user's browser is refused while it searches too"
    assert "token" not in status and "invite_token" not in status, "no secret before there is a mesh"
    c.wait_log(r"a client needs a mesh to join: looking again", timeout=60)  # it looked once and found nothing
    a = mesh_node(spawn, "a", "127.0.0.7", "--model", SMOLLM, "--publish", *r)
    a_mesh = mesh_of(a)
    joined = c.wait_for("joined A's mesh", lambda s: s.get("mesh_id") == a_mesh, timeout=240)
    assert joined.get("state") != "searching"
    wait_models(c, {SMOLLM}, timeout=240)
    answered = httpx2.post(c.api + "/v1/chat/completions", json=CHAT, timeout=120)
    assert answered.status_code == 200, answered.text

"""Issue 14 as a user runs it: a standby replaces a killed model server with nobody typing a command.

Real node processes on loopback addresses: A serves SmolLM2, B joined without a model (a standby; SmolLM2 is in
its models directory), C is a client sending the requests. A is killed -9 while C keeps asking: C's requests get
503 with Retry-After (never a 404) until B, elected by the rules every node computes, promotes itself and answers.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import pytest

from tests.conftest import GEMMA, SMOLLM
from tests.security.test_dead_peer import kill_node
from tests.test_mesh import Spawn, mesh_node, token_of, wait_models

pytestmark = pytest.mark.slow

CHAT: dict[str, Any] = {"model": SMOLLM, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}


def _standby(status: dict[str, Any]) -> dict[str, Any]:
    return status.get("standby") or {}


def _watching(status: dict[str, Any]) -> bool:
    """A standby that stays, having seen requests for SmolLM2 (demand is requests; a server's pin ends with it)."""
    wanted = {d["model"] for d in status["demand"] if d["last_wanted_s_ago"] is not None}
    return _standby(status).get("decision") == "stay" and SMOLLM in wanted


def until_served(api: str, body: dict[str, Any], standby: Any, within_s: float = 300) -> tuple[list[int], Any]:
    """Ask `api` for `body`'s model every 0.5 s until it answers 200 (a standby promoted itself to serve it); every
    answer before that must be 503 with Retry-After. The status codes seen, and the 200."""
    codes: list[int] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        r = httpx2.post(api + "/v1/completions", json=body, timeout=120)
        codes.append(r.status_code)
        if r.status_code == 200:
            return codes, r
        assert r.status_code == 503 and r.headers.get("retry-after"), f"{r.status_code}: {r.text}"
        time.sleep(0.5)
    raise AssertionError(f"{body['model']} never served; codes {codes}\n{standby.log()[-4000:]}")


def test_a_standby_replaces_a_killed_server_and_requests_in_the_gap_get_503(spawn: Spawn, smollm: object) -> None:
    a = mesh_node(spawn, "a", "127.0.0.2", "--model", SMOLLM)
    a.wait_model_state(SMOLLM, "serving", timeout=240)
    token = token_of(a)
    b = mesh_node(spawn, "b", "127.0.0.3", "--join", token)
    c = mesh_node(spawn, "c", "127.0.0.4", "--client", "--join", token)
    c.wait_for("C up", lambda s: True, timeout=60)
    wait_models(c, {SMOLLM}, timeout=60)
    first = httpx2.post(c.api + "/v1/chat/completions", json=CHAT, timeout=120)
    assert first.status_code == 200, first.text
    a_id, b_id = a.status()["node_id"], b.wait_for("B up", lambda s: True, timeout=60)["node_id"]
    assert first.headers["x-mesh-node"] == a_id

    # B is a standby that stays: A serves the model, and B says so.
    status = b.wait_for("B watching as a standby, the requests seen", _watching, timeout=120)
    assert any("standby" == p["role"] for p in status["peers"] if p["self"])

    before_kill = len(b.log())  # B's log so far: no promotion in it (a standby that stays, checked above)
    killed = kill_node(a)
    codes: list[int] = []
    answered: httpx2.Response | None = None
    deadline = time.monotonic() + 300
    while answered is None and time.monotonic() < deadline:
        r = httpx2.post(c.api + "/v1/chat/completions", json=CHAT, timeout=120)
        codes.append(r.status_code)
        if r.status_code == 200:
            answered = r
            break
        assert r.status_code == 503, f"a request in the gap got {r.status_code}, not 503: {r.text}"
        assert r.headers.get("retry-after"), r.headers
        assert r.json()["error"]["message"], r.text
        time.sleep(0.5)
    assert answered is not None, f"no answer from a promoted standby in 300 s; codes {codes}\n{b.log()[-4000:]}"
    assert answered.headers["x-mesh-node"] == b_id, "answered by the promoted standby"
    assert 503 in codes, "requests in the gap were answered 503 while B loaded"

    # What B logged: its decision with the numbers, only once A was gone, and A declared dead. (Not necessarily in
    # that order: the standby counts servers among the members gossip still holds alive, and A's record can age out
    # of that a moment before the membership layer logs the death — under load it did, by a second.)
    died = b.wait_log(rf"member {a_id} .*died", timeout=5)
    decided = b.wait_log(r"promoting to serve " + SMOLLM + r"[^\n]*demand [0-9.]+ req/min", timeout=5)
    assert decided.start() >= before_kill and died.start() >= before_kill, "B promoted only once A was gone"
    served = b.wait_model_state(SMOLLM, "serving", timeout=5)
    assert served["state"] == "serving"
    after = b.status()
    assert not any(p["role"] == "standby" for p in after["peers"] if p["self"]), "a promoted standby is a host"
    print(f"\nA killed → C answered by B after {time.monotonic() - killed:.1f} s; C saw {codes.count(503)} × 503")


def test_two_standbys_and_one_wanted_model_exactly_one_loads_it(spawn: Spawn, smollm: object) -> None:
    a = mesh_node(spawn, "a", "127.0.0.2", "--model", SMOLLM)
    a.wait_model_state(SMOLLM, "serving", timeout=240)
    token = token_of(a)
    standbys = [mesh_node(spawn, name, ip, "--join", token) for name, ip in (("s1", "127.0.0.3"), ("s2", "127.0.0.4"))]
    c = mesh_node(spawn, "c", "127.0.0.5", "--client", "--join", token)
    c.wait_for("C up", lambda s: True, timeout=60)
    wait_models(c, {SMOLLM}, timeout=60)
    assert httpx2.post(c.api + "/v1/chat/completions", json=CHAT, timeout=120).status_code == 200
    for s in standbys:
        s.wait_for("a standby that stays, the requests seen", _watching, timeout=120)
    kill_node(a)

    def loaders(status: dict[str, Any]) -> set[str]:
        return {p["node_id"] for p in status["peers"] if SMOLLM in p["models"]}

    seen = c.wait_for("a standby loading the model", lambda st: bool(loaders(st)), timeout=120)
    winner = loaders(seen)
    assert len(winner) == 1, f"more than one standby took the model: {winner}"
    # The other keeps watching, and says why it stays; the model ends up served by the winner alone.
    final = c.wait_for("the model served again", lambda st: SMOLLM in {m for p in st["peers"] for m in p["serving"]})
    assert loaders(final) == winner, f"a second standby loaded it too: {loaders(final)}"
    loser = next(s for s in standbys if s.status()["node_id"] not in winner)
    assert _standby(loser.status()).get("decision") == "stay"


def test_requests_for_a_model_nobody_serves_make_a_standby_serve_it(
    spawn: Spawn, smollm: object, gemma: object
) -> None:
    a = mesh_node(spawn, "a", "127.0.0.2", "--model", SMOLLM)
    a.wait_model_state(SMOLLM, "serving", timeout=240)
    b = mesh_node(spawn, "b", "127.0.0.3", "--join", token_of(a))
    b_id = b.wait_for("B watching as a standby", lambda s: _standby(s).get("decision") == "stay", timeout=120)[
        "node_id"
    ]
    gemma_chat = {"model": GEMMA, "prompt": "Hello", "max_tokens": 4}
    codes, r = until_served(a.api, gemma_chat, b)
    assert r.headers["x-mesh-node"] == b_id
    assert codes[0] == 503, "the first request for a wanted model nobody serves is a 503 while a standby may take it"
    b.wait_log(r"promoting to serve " + GEMMA, timeout=5)
    junk = httpx2.post(a.api + "/v1/completions", json={**gemma_chat, "model": "no-such-model"}, timeout=30)
    assert junk.status_code == 404, junk.text


def test_a_model_queued_on_every_server_gets_a_replica_released_once_idle_past_the_ttl(
    spawn: Spawn, smollm: object
) -> None:
    """A serves SmolLM2 with one slot; B is a standby. Four clients at once keep A's queue full: B adds a replica,
    requests spread over both; when the load stops and the demand TTL (20 s here) passes, B releases it and is a
    standby again while A, started with --model, keeps serving."""
    # One llama.cpp thread each: two llama-servers spinning two threads each on a 2-core machine slowed generation
    # to 0.5 tokens/s (their thread pools busy-wait) and a request timed out; on two machines each would have its own.
    ttl = ("--parallel", "1", "--demand-ttl", "20", "--threads", "1")
    a = mesh_node(spawn, "a", "127.0.0.2", "--model", SMOLLM, *ttl)
    a.wait_model_state(SMOLLM, "serving", timeout=240)
    b = mesh_node(spawn, "b", "127.0.0.3", "--join", token_of(a), *ttl)
    b_id = b.wait_for("B watching as a standby", lambda s: _standby(s).get("decision") == "stay", timeout=120)[
        "node_id"
    ]
    long_chat = {**CHAT, "max_tokens": 48}
    stop = threading.Event()
    answered_by: list[str] = []

    def load() -> None:
        while not stop.is_set():  # a new conversation each time: sessions stick to a server, conversations spread
            chat = {**long_chat, "messages": [{"role": "user", "content": f"Say hi, number {len(answered_by)}"}]}
            r = httpx2.post(a.api + "/v1/chat/completions", json=chat, timeout=120)
            assert r.status_code == 200, r.text
            answered_by.append(r.headers["x-mesh-node"])

    with ThreadPoolExecutor(4) as pool:
        loads = [pool.submit(load) for _ in range(4)]
        try:
            b.wait_model_state(SMOLLM, "serving", timeout=300)
            served_at = len(answered_by)
            deadline = time.monotonic() + 120
            while (
                b_id not in answered_by[served_at:] and time.monotonic() < deadline and not any(f.done() for f in loads)
            ):
                time.sleep(0.5)
        finally:
            stop.set()
        for f in loads:
            f.result()
    assert b_id in answered_by[served_at:], "the replica got none of the requests"
    b.wait_log(r"adds a replica of " + SMOLLM + r" \(\d+ requests queued beyond the slots", timeout=5)

    stopped = b.wait_model_state(SMOLLM, "stopped", timeout=240)
    assert "no request named it within the demand TTL" in stopped["detail"], stopped
    b.wait_for("B a standby again", lambda s: _standby(s).get("role") == "standby", timeout=60)
    assert a.status()["models"][0]["state"] == "serving", "the operator's --model server is never released"

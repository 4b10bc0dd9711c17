"""`mesh-llm top`: the screen drawn from a status dict (pure), the live rate, the status's `requests` field from a real
`NodeMetrics`, the status read's bounds; then a real node serving SmolLM2 answers two chats and `mesh-llm top --once`,
run as a subprocess that finds the node through its home's runtime file, shows the model with 2 ok requests, no
errors and the decode speed its llama-server measured; and the console page's models table shows the same counts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from mesh_mcp.api.console import REQUEST_KEYS, requests_field
from mesh_mcp.cmd_top import MAX_STATUS_BYTES, UNKNOWN, Sample, TopError, fetch, plain, rates, tokens_out
from mesh_mcp.metrics.families import NodeMetrics
from tests.harness import NodeProcess, free_port
from tests.test_mesh import mesh_node

pytest.register_assert_rewrite("tests.browser")  # the plugin named below: imported here, its asserts rewritten
from tests.browser import TIMEOUT_MS, Page, expect  # noqa: E402

pytest_plugins = ["tests.browser"]


def member(node_id: str, name: str, *models: dict[str, Any], state: str = "alive", me: bool = False) -> dict[str, Any]:
    return {"node_id": node_id, "name": name, "role": "host", "self": me, "state": state, "models": list(models)}


def entry(
    name: str,
    state: str = "serving",
    in_flight: int = 0,
    tok_s: float | None = None,
    answered: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """A member's entry for a model; `answered`: (ok, err) its record carries (a record of an older version: none)."""
    found = {"name": name, "state": state, "in_flight": in_flight, "tok_s": tok_s}
    return found | {"ok": answered[0], "err": answered[1]} if answered is not None else found


STATUS: dict[str, Any] = {
    "node_id": "a" * 16,
    "name": "alpha",
    "version": "0.9",
    "uptime_s": 125.0,
    "mesh_id": "0123456789abcdef" * 4,
    "mesh": {
        "members": [
            member("b" * 16, "beta", entry("M", in_flight=3, tok_s=40.5, answered=(11, 3))),
            member("a" * 16, "alpha", entry("M", in_flight=1, tok_s=52.3, answered=(1, 0)), me=True),
            member("c" * 16, "gamma", entry("M", state="failed")),  # an older version's record: no counts
            member("d" * 16, "delta", entry("M", in_flight=2, tok_s=9.9, answered=(7, 2)), state="dead"),
        ],
        "models": [
            {
                "name": "M",
                "servers": ["a" * 16, "b" * 16],
                "failed": ["c" * 16],
                "mode": "replicas",
                "measured_tok_s": 46.4,
                "demand_rate_per_min": 3.0,
            },
        ],
        "links": [],
    },
    "requests": {
        "M": {"ok": 2, "client_error": 1, "upstream_error": 1, "cancelled": 4, "in_flight": 1, "tokens_out": 57},
        "other": {"ok": 0, "client_error": 3, "upstream_error": 0, "cancelled": 0, "in_flight": 0, "tokens_out": 0},
    },
}


def row(text: str, start: str) -> list[str]:
    """The cells (split on spaces) of the first line of `text` that starts with `start`, `start` left out."""
    found = [line.strip() for line in text.splitlines() if line.strip().startswith(start)]
    assert found, f"no row {start!r} in\n{text}"
    return found[0][len(start) :].split()


def test_a_model_table_lists_every_node_that_holds_it_and_this_nodes_own_counts() -> None:
    text = plain(STATUS, width=140, now=0)
    assert "node alpha (aaaaaaaa)  mesh 01234567  3 members (1 gone)  up 2m05s" in text
    assert "replicas · 2 servers · measured 46.4 tok/s · demand 3.0 req/min  failed on 1" in text
    # This node first, then by name; each node's ok / errors are those its server answered (its record's counts);
    # its cancelled requests and tokens out are only counted where requests entered.
    names = [line.split()[0] for line in text.splitlines() if line.strip()[:5] in ("alpha", "beta ", "gamma", "delta")]
    assert names == ["alpha", "beta", "delta", "gamma"]
    assert row(text, "alpha aaaaaaaa (this)") == ["serving", "1", "52.3", "1", "0", UNKNOWN, UNKNOWN]
    assert row(text, "beta bbbbbbbb") == ["serving", "3", "40.5", "11", "3", UNKNOWN, UNKNOWN]
    assert row(text, "gamma cccccccc") == ["failed", "0", *[UNKNOWN] * 4]  # its record does not carry counts
    # a gone node's last in-flight is no longer true; what its server answered before it went still is
    assert row(text, "delta dddddddd") == ["dead", "7", "2", UNKNOWN, UNKNOWN]
    # in flight, ok, errors (client + upstream), cancelled, tokens out; no rate in a single snapshot
    assert row(text, "→ entered here") == ["1", "2", "2", "4", "57"]
    # Requests this node answered for a name no node serves get their own table.
    assert "other  not served · 0 servers" in text
    assert "ok / errors of the requests its server answered" in " ".join(text.split())


def test_peer_strings_cannot_drive_the_terminal_or_inject_markup() -> None:
    evil = "x\x1b[2J[bold red]boom[/]\u202e"
    status = {**STATUS, "name": evil, "mesh": {"members": [member("e" * 16, evil, entry(evil))], "models": []}}
    text = plain(status, width=200, now=0)
    assert "\x1b" not in text and "\u202e" not in text
    assert "[bold red]boom[/]" in text  # shown as the peer wrote it, not interpreted
    assert "not served" in text  # a model named only in this node's counts


def test_a_status_without_mesh_or_requests_still_renders() -> None:
    text = plain({"node_id": "f" * 16, "name": "solo"}, width=100, now=0)
    assert "mesh none (solo)" in text and "no models in the mesh yet" in text


def test_the_live_rate_is_tokens_out_per_second_between_refreshes() -> None:
    assert tokens_out(STATUS) == {"M": 57, "other": 0}
    first = Sample(100.0, {"M": 57})
    assert rates(None, first) == {}
    assert rates(first, Sample(102.0, {"M": 97, "N": 4})) == {"M": 20.0, "N": 2.0}
    assert rates(first, Sample(102.0, {"M": 10})) == {"M": 5.0}  # the node restarted: its counter began again
    assert rates(first, Sample(100.0, {"M": 60})) == {}


def test_the_status_requests_field_counts_every_result_from_the_node_metrics() -> None:
    metrics = NodeMetrics()
    label = metrics.model_label("M")
    metrics.requests.labels(label, "local", "ok").inc(2)
    metrics.requests.labels(label, "remote", "upstream_error").inc()
    metrics.requests.labels(label, "tunnelled", "ok").inc(5)  # a peer's client: counted on the node it entered
    metrics.in_flight.labels(label, "local").inc()
    metrics.tokens_out.labels(label, "local").inc(30)
    field = requests_field(metrics.summary())
    assert field == {
        "M": {"ok": 2, "client_error": 0, "upstream_error": 1, "cancelled": 0, "in_flight": 1, "tokens_out": 30}
    }
    assert tuple(field["M"]) == REQUEST_KEYS


def test_reading_the_status_is_bounded_and_says_what_went_wrong() -> None:
    def answer(status: int, body: bytes) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(lambda request: httpx2.Response(status, content=body)))

    assert fetch(answer(200, b'{"name": "n"}'), "http://x") == {"name": "n"}
    with pytest.raises(TopError, match="--api-key"):
        fetch(answer(401, b"{}"), "http://x")
    with pytest.raises(TopError, match="MiB"):
        fetch(answer(200, b" " * (MAX_STATUS_BYTES + 1)), "http://x")
    with pytest.raises(TopError, match="not a status"):
        fetch(answer(200, b"[1, 2]"), "http://x")


def top(*args: str, home: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160"}
    if home is not None:
        env["MESH_LLM_HOME"] = home
    cmd = [sys.executable, "-m", "mesh_mcp.cli", "top", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)


def test_top_once_without_a_node_says_how_to_start_one() -> None:
    done = top("--once", "--console", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1 and "no mesh-llm node answers" in done.stderr and not done.stdout


def serve_two_chats(spawn: Callable[..., NodeProcess], model: Any) -> NodeProcess:
    """A node serving `model` that answered two chats, one of them streamed."""
    node = mesh_node(spawn, "a", "127.0.0.1", "--model", str(model))
    node.wait_model_state(model.stem, "serving", timeout=120)
    for stream in (False, True):
        body = {"model": model.stem, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
        r = httpx2.post(node.api + "/v1/chat/completions", json={**body, "stream": stream}, timeout=120)
        assert r.status_code == 200, r.text
    return node


@pytest.mark.slow
def test_top_once_shows_a_real_nodes_requests_and_measured_speed(
    smollm: Any, spawn: Callable[..., NodeProcess]
) -> None:
    node, model = serve_two_chats(spawn, smollm), smollm.stem

    def counted(st: dict[str, Any]) -> bool:
        here = st.get("requests", {}).get(model, {})
        mine = st["mesh"]["members"][0]["models"]
        return here.get("ok") == 2 and here.get("in_flight") == 0 and bool(mine and mine[0].get("tok_s"))

    status = node.wait_for("2 ok requests and a measured decode speed", counted, timeout=90)
    assert status["requests"][model]["tokens_out"] > 0

    done = top("--once", home=str(node.home))  # finds the node through the runtime file in its home
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert model in text and f"node {status['name']}" in text
    this = row(text, f"{status['name']} {status['node_id'][:8]} (this)")
    assert this[0] == "serving" and this[1] == "0" and float(this[2]) > 0
    in_flight, ok, errors, cancelled, tokens = row(text, "→ entered here")
    assert (in_flight, ok, errors, cancelled) == ("0", "2", "0", "0") and int(tokens) > 0


@pytest.mark.slow
def test_the_console_models_table_shows_this_nodes_requests(
    smollm: Any, spawn: Callable[..., NodeProcess], page: Page
) -> None:
    node, model = serve_two_chats(spawn, smollm), smollm.stem
    page.goto(node.console + "/")
    live = page.locator(f'#models tr[data-model="{model}"] td.live')
    expect(live).to_have_attribute("data-ok", "2", timeout=TIMEOUT_MS)
    expect(live).to_have_attribute("data-errors", "0")
    expect(live).to_have_text("0 in flight · 2 ok · 0 errors")
    # A third chat from the page's own chat box: the count moves live (the page follows /api/events).
    page.select_option("#chat-model", model)
    page.fill("#chat-max-tokens", "8")
    page.fill("#chat-input", "Say hello.")
    page.click("#chat-send")
    expect(live).to_have_attribute("data-ok", "3", timeout=TIMEOUT_MS)

"""Issue 16, the console's backend: the `mesh` field of `/api/status` and `/api/events` (console_view.py, pure),
the recently gone members the mesh remembers for it, `POST /api/chat` (forwarded in-process to this node's API)
and `GET /static/{file}`; then a real node serving SmolLM2 on --listen-all with a key: a streamed chat through its
console, a bad body, and a viewer from another machine who sees the mesh but never the invite token.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import anyio
import httpx2
import pytest
from starlette.types import Receive, Scope, Send

from mesh_mcp.api.console import build_console
from mesh_mcp.api.console_view import MAX_LINKS, Gone, mesh_view
from mesh_mcp.api.guard import CONSOLE, MAX_BODY_BYTES, Policy
from mesh_mcp.api.middleware import HttpGuard
from mesh_mcp.mesh.records import NodeRecord, ServedModel
from mesh_mcp.mesh.runtime import GONE_SHOWN_S, Mesh
from mesh_mcp.state import NodeState
from mesh_mcp.testing.clock import FakeClock
from tests.harness import NodeProcess
from tests.test_mesh import mesh_node

KEY = "console-test-key"
USER = [{"role": "user", "content": "hi"}]


def nid(n: int) -> str:
    return f"{n:016x}"


def rec(n: int, *served: ServedModel, role: str = "host", rtt: tuple[tuple[str, int], ...] = ()) -> NodeRecord:
    return NodeRecord(
        node_id=nid(n),
        public_key=b"",
        name=f"node{n}",
        addresses=(f"10.0.0.{n}:4000",),
        role=role,
        capacity_bytes=n << 30,
        models_served=served,
        rtt=rtt,
    )


def serving(name: str, **kw: Any) -> ServedModel:
    return ServedModel(name, "serving", **kw)


# --- the pure view --------------------------------------------------------------------------------------------------


def test_members_models_and_links_of_a_mesh() -> None:
    # ok/err: requests its server answered
    qwen = serving("qwen", ctx=4096, slots=2, size_bytes=10, tools=True, ok=7, err=1, think=True)
    a = rec(1, qwen, rtt=((nid(2), 120), (nid(3), 900)))
    b = rec(2, serving("qwen", ctx=8192, tools=False), rtt=((nid(1), 100),))
    c = rec(3, ServedModel("llama", "loading"), role="standby")
    view = mesh_view(
        self_id=nid(2),
        alive=[a, b, c],
        since={nid(1): 5.0},
        rtt_here={nid(1): 9.5, nid(3): 81.0},
        demand=[{"model": "gemma", "rate_per_min": 2.5}, {"model": "qwen", "rate_per_min": 1.0}],
    )
    members = view["members"]
    assert [m["node_id"] for m in members] == [nid(2), nid(1), nid(3)]  # this node first
    me, first = members[0], members[1]
    assert me["self"] and not first["self"] and me["state"] == "alive"
    assert me["rtt_ms"] == {nid(1): 9.5, nid(3): 81.0}  # this node's own measurements, not its record's
    assert first == {
        "node_id": nid(1),
        "name": "node1",
        "role": "host",
        "self": False,
        "state": "alive",
        "since": 5.0,
        "capacity_bytes": 1 << 30,
        "addresses": ["10.0.0.1:4000"],
        "rtt_ms": {nid(2): 12.0, nid(3): 90.0},
        "models": [
            {
                "name": "qwen",
                "state": "serving",
                "in_flight": 0,
                "slots": 2,
                "ctx": 4096,
                "size_bytes": 10,
                "tok_s": None,
                "predicted_tok_s": None,
                "ok": 7,
                "err": 1,
            }
        ],
    }
    models = {m["name"]: m for m in view["models"]}
    assert models["qwen"]["servers"] == [nid(1), nid(2)] and models["qwen"]["mode"] == "replicas"
    assert models["qwen"]["ctx"] == 8192 and models["qwen"]["tools"] is True
    assert models["qwen"]["reasoning"] is True, "one server says it thinks (the other does not know)"
    assert models["qwen"]["demand_rate_per_min"] == 1.0
    assert models["llama"] == {
        "name": "llama",
        "servers": [],
        "loading": [nid(3)],
        "failed": [],
        "mode": "none",
        "ctx": None,
        "tools": None,
        "reasoning": None,
        "measured_tok_s": None,
        "predicted_tok_s": None,
        "demand_rate_per_min": None,
        "stages": [],
        "shards": [],
    }
    assert models["gemma"]["mode"] == "none" and models["gemma"]["demand_rate_per_min"] == 2.5  # wanted, unserved
    links = {(link["a"], link["b"]): link for link in view["links"]}
    assert links[(nid(1), nid(2))]["rtt_ms"] == 9.5  # the smaller of the two sides' measurements
    assert links[(nid(1), nid(3))] == {"a": nid(1), "b": nid(3), "rtt_ms": 90.0, "over_cap": True}
    assert links[(nid(2), nid(3))]["over_cap"] is True and len(links) == 3


def test_split_and_shards_come_from_this_nodes_placements() -> None:
    host = rec(1, serving("big"), serving("moe"))
    worker = rec(2, role="worker")
    shard = rec(3, serving("moe"))
    split = {
        "kind": "split",
        "stages": [{"node_id": nid(2), "layers": [0, 11]}, {"node_id": nid(1), "layers": [12, 23]}],
    }
    shards = {
        "kind": "expert-shards",
        "experts_per_shard": 40,
        "shards": [{"node_id": nid(1), "shard": 0}, {"node_id": nid(3), "shard": 1, "quality": 0.97, "passed": True}],
    }
    view = mesh_view(self_id=nid(1), alive=[host, worker, shard], placements={"big": split, "moe": shards})
    models = {m["name"]: m for m in view["models"]}
    assert models["big"]["mode"] == "split"
    assert models["big"]["stages"] == [{"node_id": nid(2), "layers": [0, 11]}, {"node_id": nid(1), "layers": [12, 23]}]
    assert models["moe"]["mode"] == "shards" and models["moe"]["servers"] == [nid(1)]  # the shard lends, not serves
    assert models["moe"]["shards"][1] == {"node_id": nid(3), "experts": 40, "quality": 0.97, "passed": True}
    roles = {m["node_id"]: m["role"] for m in view["members"]}
    assert roles == {nid(1): "host", nid(2): "worker", nid(3): "shard"}


def test_a_split_hosted_elsewhere_shows_its_stages_from_the_hosts_record() -> None:
    """A client's console: the host's signed record carries the split's stages, so every node tells where it runs."""
    stages = ((nid(2), 0, 11), (nid(1), 12, 23))
    host = rec(1, dataclasses.replace(serving("big"), stages=stages))
    view = mesh_view(self_id=nid(9), alive=[host, rec(2, role="standby")])
    (big,) = view["models"]
    roles = {m["node_id"]: m["role"] for m in view["members"]}
    assert roles == {nid(1): "host", nid(2): "worker"}  # a standby lending a stage is a worker
    assert big["mode"] == "split" and big["servers"] == [nid(1)]
    assert big["stages"] == [{"node_id": nid(2), "layers": [0, 11]}, {"node_id": nid(1), "layers": [12, 23]}]


def test_expert_shards_hosted_elsewhere_show_from_the_coordinators_record() -> None:
    """A client's console: the coordinator's record says where each shard runs, its experts and its gate."""
    shards = ((nid(1), 40, 1000, -1), (nid(3), 40, 973, 1))
    coordinator = rec(1, dataclasses.replace(serving("moe"), shards=shards))
    view = mesh_view(self_id=nid(9), alive=[coordinator, rec(3, serving("moe"))])
    (moe,) = view["models"]
    assert moe["mode"] == "shards" and moe["servers"] == [nid(1)]  # the shard lends, it serves no one
    assert moe["shards"] == [
        {"node_id": nid(1), "experts": 40, "quality": {"agreement": 1.0}},
        {"node_id": nid(3), "experts": 40, "quality": {"agreement": 0.973}, "passed": True},
    ]
    assert {m["node_id"]: m["role"] for m in view["members"]} == {nid(1): "host", nid(3): "shard"}


def test_decode_speeds_failures_and_what_each_node_of_a_split_holds() -> None:
    """Measured tok/s is the mean of the servers' reports, predicted the best; a failure names its node; a split's
    host and worker each hold their stage's share of the bytes (the capacity bars add up)."""
    stages = ((nid(2), 0, 5), (nid(1), 6, 23))
    host = rec(1, dataclasses.replace(serving("big", size_bytes=2400), stages=stages, tps=105, ptps=90))
    view = mesh_view(
        self_id=nid(9),
        alive=[
            host,
            rec(2, role="standby"),
            rec(3, serving("qwen", tps=200), ServedModel("gemma", "failed")),
            rec(4, serving("qwen", tps=100, ptps=310)),
        ],
    )
    models = {m["name"]: m for m in view["models"]}
    assert models["qwen"]["measured_tok_s"] == 15.0 and models["qwen"]["predicted_tok_s"] == 31.0
    assert models["big"]["measured_tok_s"] == 10.5 and models["big"]["predicted_tok_s"] == 9.0
    assert models["gemma"]["failed"] == [nid(3)] and models["gemma"]["mode"] == "none"
    members = {m["node_id"]: m for m in view["members"]}
    (on_host,) = members[nid(1)]["models"]
    (on_worker,) = members[nid(2)]["models"]
    assert (on_host["size_bytes"], on_host["stage"], on_host["tok_s"]) == (1800, [6, 23], 10.5)
    assert (on_worker["name"], on_worker["state"], on_worker["size_bytes"], on_worker["stage"]) == (
        "big",
        "stage",
        600,
        [0, 5],
    )
    assert (on_worker["ok"], on_worker["err"]) == (None, None)  # a stage's requests are counted on its host


def test_dead_and_left_members_are_listed_with_when_and_clients_by_id() -> None:
    gone = [Gone(rec(2), "dead", 100.0), Gone(rec(3), "left", 110.0), Gone(rec(1), "dead", 50.0)]
    view = mesh_view(self_id=nid(1), alive=[rec(1)], gone=gone, clients=[nid(9), nid(1)], since={nid(9): 7.0})
    states = [(m["node_id"], m["state"], m["since"], m["role"]) for m in view["members"]]
    # Newest first; a member alive again (1) is not listed dead; a connected id with a record is no client.
    assert states == [
        (nid(1), "alive", None, "host"),
        (nid(3), "left", 110.0, "host"),
        (nid(2), "dead", 100.0, "host"),
        (nid(9), "alive", 7.0, "client"),
    ]
    assert view["links"] == []


def test_a_thousand_members_stay_bounded_and_fast() -> None:
    nodes = [
        rec(n, serving(f"m{n % 50}"), rtt=tuple((nid(p), 10 * p) for p in range(n + 1, n + 33))) for n in range(1200)
    ]
    view = mesh_view(self_id=nid(0), alive=nodes, clients=[nid(5000 + n) for n in range(500)])
    assert len([m for m in view["members"] if m["role"] != "client"]) == 1000
    assert len(view["links"]) == MAX_LINKS and len(view["models"]) == 50
    assert len(json.dumps(view)) < 8 << 20  # its speed is bench/p16_console.py's


# --- what the mesh remembers: recently gone members --------------------------------------------------------------


def test_the_mesh_forgets_a_gone_member_after_a_minute() -> None:
    clock = FakeClock()
    mesh = SimpleNamespace(clock=clock, member_since={}, _departed={}, members=lambda: [])
    remember = Mesh._remember_change.__get__(mesh)
    remember(nid(2), "joined", rec(2))
    joined_at = clock.time()
    assert mesh.member_since[nid(2)] == joined_at and Mesh.recently_gone(mesh) == []  # type: ignore[arg-type]
    clock.advance(5)
    remember(nid(2), "died", rec(2))
    assert Mesh.recently_gone(mesh) == [(rec(2), "dead", joined_at + 5)]  # type: ignore[arg-type]
    clock.advance(GONE_SHOWN_S)
    assert len(Mesh.recently_gone(mesh)) == 1  # type: ignore[arg-type]  # a minute exactly: still shown
    clock.advance(0.5)
    assert Mesh.recently_gone(mesh) == [] and nid(2) not in mesh.member_since  # type: ignore[arg-type]


# --- the console app in process: the chat's forwarding, the static files ----------------------------------------------


class FakeApi:
    """An API app that answers a chat as an SSE stream and remembers what it was asked."""

    def __init__(self) -> None:
        self.seen: list[tuple[Scope, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append((scope, body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for word in ("Hel", "lo"):
            chunk = {"choices": [{"delta": {"content": word}}]}
            await send(
                {"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def console(api: FakeApi, policy: Policy | None = None) -> httpx2.AsyncClient:
    node = NodeState(node_id=nid(1), name="t", version="0", api_url="", console_url="", invite_token="SECRET")
    app = HttpGuard(build_console(node, api=api), policy or Policy(), CONSOLE)
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://127.0.0.1:3131")


def run(test: Callable[[], Any]) -> None:
    anyio.run(test)


def test_the_chat_goes_to_the_api_and_streams_back() -> None:
    api = FakeApi()

    async def go() -> None:
        async with console(api) as c:
            body = {"model": "m", "messages": USER, "stream": True}
            r = await c.post("/api/chat", json=body, headers={"Authorization": "Bearer x", "Cookie": "a=b"})
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        assert r.text.count("data: ") == 3 and r.text.endswith("data: [DONE]\n\n")
        ((scope, raw),) = api.seen
        assert scope["path"] == "/v1/chat/completions" and scope["method"] == "POST"
        assert json.loads(raw) == body
        names = {k for k, _ in scope["headers"]}
        assert names == {b"host", b"content-type", b"content-length"}  # no key, cookie or Origin goes along

    run(go)


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"model": "m"}', b'{"model": "m", "messages": []}', b'{"model": 3, "messages": [{}]}'],
)
def test_a_bad_chat_body_is_a_400_and_never_reaches_the_api(body: bytes) -> None:
    api = FakeApi()

    async def go() -> None:
        async with console(api) as c:
            r = await c.post("/api/chat", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "chat-completions" in r.text
        assert api.seen == []

    run(go)


def test_the_chat_is_guarded_like_every_console_route() -> None:
    api = FakeApi()
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}  # as /v1 refuses

    async def go() -> None:
        async with console(api) as c:
            assert (await c.post("/api/chat", json=big)).status_code == 413
            foreign = {"Origin": "http://evil.example"}
            assert (await c.post("/api/chat", json={"messages": USER}, headers=foreign)).status_code == 403
            simple = {"Content-Type": "text/plain"}  # what a cross-site form could send without a preflight
            assert (await c.post("/api/chat", content=b'{"messages": []}', headers=simple)).status_code == 415
            assert (await c.get("/api/chat")).status_code == 405
        assert api.seen == []

    run(go)


def test_static_files_are_the_packages_own_and_nothing_else() -> None:
    async def go() -> None:
        async with console(FakeApi()) as c:
            css = await c.get("/static/console.css")
            assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
            assert css.headers["x-content-type-options"] == "nosniff"
            for path in (
                "/static/index.html",
                "/static/",
                "/static/../state.py",
                "/static/%2e%2e%2fstate.py",
                "/static/x.js",
            ):
                assert (await c.get(path)).status_code == 404, path
            page = await c.get("/")
            assert "script-src 'self'" in page.headers["content-security-policy"]

    run(go)


# --- a real node -----------------------------------------------------------------------------------------------------


@pytest.fixture
def node(spawn: Callable[..., NodeProcess], smollm: Any) -> NodeProcess:
    started = mesh_node(spawn, "a", "127.0.0.1", "--model", str(smollm), "--listen-all", "--api-key", KEY)  # type: ignore[arg-type]
    started.wait_model_state(smollm.stem, "serving", timeout=120)
    return started


def sse_contents(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices", []):
                out.append(choice.get("delta", {}).get("content") or "")
    return out


def test_a_real_node_chats_through_its_console_and_hides_the_token_from_a_remote_viewer(node: NodeProcess) -> None:
    model = node.status()["models"][0]["name"]
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "stream": True, "max_tokens": 8}
    with httpx2.stream("POST", node.console + "/api/chat", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    assert "".join(sse_contents(text)).strip() and text.rstrip().endswith("data: [DONE]")

    bad = httpx2.post(node.console + "/api/chat", json={"model": model}, timeout=10)
    assert bad.status_code == 400

    local = node.status()
    assert local["invite_token"]
    me = local["mesh"]["members"][0]
    assert me["self"] and me["state"] == "alive" and me["node_id"] == local["node_id"]
    assert [m["name"] for m in me["models"]] == [model]
    assert local["mesh"]["models"][0]["servers"] == [local["node_id"]]

    # Another machine's browser: it names this machine's address, with the key. It sees the mesh, never the token.
    port = node.console.rsplit(":", 1)[1]
    remote = {"Host": f"192.0.2.10:{port}", "Authorization": f"Bearer {KEY}"}
    assert (
        httpx2.get(node.console + "/api/status", headers={"Host": f"192.0.2.10:{port}"}, timeout=5).status_code == 200
    )
    seen = httpx2.get(node.console + "/api/status", headers=remote, timeout=5).json()
    assert "invite_token" not in seen and seen["mesh"]["members"][0]["node_id"] == local["node_id"]
    assert local["invite_token"] not in json.dumps(seen)
    no_key = httpx2.post(node.console + "/api/chat", json=body, headers={"Host": f"192.0.2.10:{port}"}, timeout=10)
    assert no_key.status_code == 401
    with httpx2.stream("GET", node.console + "/api/events", timeout=10) as events:  # local, yet no token in events
        for line in events.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                assert "invite_token" not in event and event["mesh"]["members"]
                assert local["invite_token"] not in line
                break

    # The decode speed llama-server measured for the chat above: in the model's status and the mesh's model row.
    def measured(st: dict[str, Any]) -> bool:
        rate = st["models"][0].get("measured_tok_s")
        row = st["mesh"]["models"][0].get("measured_tok_s")
        return isinstance(rate, float) and rate > 0 and row == rate

    node.wait_for("a measured decode speed", measured, timeout=90)

"""Issue 18, `GET /metrics`: the node's request metrics, its live state and its llama-servers' own metrics in
Prometheus' text format, read back with prometheus_client's parser. In process against a stand-in llama-server
(real sockets, the real proxy and console apps), then a real node serving SmolLM2.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from starlette.types import Message

from blackboard.board import Board
from blackboard.post import TTL_S, make_post
from blackboard.store import Store
from inference.llamacpp import LlamaCpp
from inference.rpc_server import probe
from mesh_mcp.api.app import build_api
from mesh_mcp.api.console import build_console
from mesh_mcp.api.console_view import standalone
from mesh_mcp.api.guard import CONSOLE, Policy
from mesh_mcp.api.middleware import HttpGuard
from mesh_mcp.dataplane.relay import open_relay
from mesh_mcp.mesh import meshfile, tokens
from mesh_mcp.mesh.board_link import NEWEST_REFRESH_S, BoardLink
from mesh_mcp.mesh.credentials import Credentials
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.mesh.quic import MeshTransport
from mesh_mcp.mesh.runtime import Mesh, MeshSettings, served_models
from mesh_mcp.mesh.transport import PeerConnection
from mesh_mcp.mesh.tunnel import HOP_HEADER
from mesh_mcp.mesh.wire import encode, read_frame
from mesh_mcp.metrics import NodeMetrics, live, metrics_of
from mesh_mcp.metrics.families import MAX_MODEL_LABELS, OTHER, Result
from mesh_mcp.metrics.trace import Trace
from mesh_mcp.serving.rpc_worker import RpcLink, lease
from mesh_mcp.state import NodeState
from mesh_mcp.testing import FakeClock, MemoryNetwork
from tests.harness import NodeProcess
from tests.test_console_api import KEY
from tests.test_mesh import mesh_node

CHAT = "/v1/chat/completions"
HEAD = b"HTTP/1.1 200 OK\r\nconnection: close\r\n"
USER = [{"role": "user", "content": "hi"}]
LLAMA_METRICS = (
    "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n"
    "# TYPE llamacpp:prompt_tokens_total counter\n"
    "llamacpp:prompt_tokens_total 31\n"
    "# HELP llamacpp:requests_processing Number of requests processing.\n"
    "# TYPE llamacpp:requests_processing gauge\n"
    "llamacpp:requests_processing 0\n"
)


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    obj = {"choices": [{"finish_reason": finish, "index": 0, "delta": delta}], "id": "chatcmpl-1", **extra}
    obj["object"], obj["created"], obj["model"] = "chat.completion.chunk", 1, "m"
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


TIMINGS = {"cache_n": 30, "prompt_n": 1, "prompt_ms": 12.5, "predicted_n": 3, "predicted_ms": 30.0}
TIMINGS["predicted_per_token_ms"] = 10.0


def chat_events(words: list[str]) -> list[bytes]:
    """What llama-server streams for a chat: a role chunk, one chunk a token, the finish chunk with its timings."""
    first = [_chunk({"role": "assistant", "content": None})]
    return [*first, *(_chunk({"content": w}) for w in words), _chunk({}, "stop", timings=TIMINGS), b"data: [DONE]\n\n"]


def anthropic_events(words: list[str]) -> list[bytes]:
    def ev(kind: str, **data: Any) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

    usage = {"cache_read_input_tokens": 30, "input_tokens": 1, "output_tokens": 0}
    message = {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "m", "usage": usage}
    return [
        ev("message_start", message={**message, "stop_reason": None, "stop_sequence": None}),
        ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        *(ev("content_block_delta", index=0, delta={"type": "text_delta", "text": w}) for w in words),
        ev("content_block_stop", index=0),
        ev("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None}, usage={"output_tokens": 3}),
        ev("message_stop"),
    ]


CHAT_BODY = {
    "choices": [{"finish_reason": "stop", "index": 0, "message": {"role": "assistant", "content": "a b c"}}],
    "object": "chat.completion",
    "id": "chatcmpl-2",
    "created": 1,
    "model": "m",
    "usage": {"completion_tokens": 3, "prompt_tokens": 31, "total_tokens": 34},
    "timings": TIMINGS,
}


@asynccontextmanager
async def fake_llama(words: tuple[str, ...] = ("a", " b", " c"), stall: bool = False) -> AsyncIterator[str]:
    """A stand-in llama-server on a real socket: chat (streamed or not), Anthropic messages (streamed) and
    `/metrics`, in the shapes llama-server 11434 answers (recorded from one); one request a connection. `stall`: a
    stream stops after its first event until its client closes the connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.decode().split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = next(
                    (int(v) for k, _, v in (x.partition(":") for x in lines) if k.lower() == "content-length"), 0
                )
                body = json.loads(await reader.readexactly(length)) if length else {}
                if method == "GET":
                    raw = LLAMA_METRICS.encode()
                    writer.write(HEAD + b"content-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(raw))
                    writer.write(raw)
                elif body.get("stream"):
                    events = anthropic_events(list(words)) if target == "/v1/messages" else chat_events(list(words))
                    writer.write(HEAD + b"content-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    for event in events:
                        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                        await writer.drain()
                        if stall:
                            await reader.read()  # until the proxy closes the connection
                            return
                    writer.write(b"0\r\n\r\n")
                else:
                    raw = json.dumps(CHAT_BODY).encode()
                    writer.write(HEAD + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(raw))
                    writer.write(raw)
                await writer.drain()
                break  # one request a connection: the proxy's pool keeps none open after the test
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def serving_node(upstream: str, node_id: str = "00000000000000a1", model: str = "m") -> NodeState:
    node = NodeState(node_id=node_id, name="t", version="0", api_url="", console_url="")
    node.update_model(model, state="serving", upstream=upstream)
    return node


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    return sum(s.value for s in found if s.name == name and labels.items() <= s.labels.items())


async def scrape(console: Any, **headers: str) -> httpx2.Response:
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=console), base_url="http://127.0.0.1") as c:
        return await c.get("/metrics", headers=headers)


def test_metrics_move_as_requests_run_and_fold_in_llama_servers_own() -> None:
    async def main() -> None:
        async with fake_llama() as upstream:
            node = serving_node(upstream)
            api, console = build_api(node), build_console(node)
            before = samples((await scrape(console)).text)
            assert value(before, "mesh_llm_requests_total") == 0
            async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=api), base_url="http://node") as c:
                streamed = await c.post(CHAT, json={"model": "m", "messages": USER, "stream": True})
                whole = await c.post(CHAT, json={"model": "m", "messages": USER})
                unknown = await c.post(CHAT, json={"model": "made-up-by-a-client", "messages": USER})
            assert (streamed.status_code, whole.status_code, unknown.status_code) == (200, 200, 404)
            r = await scrape(console)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        found = samples(r.text)
        assert value(found, "mesh_llm_requests_total", model="m", route="local", result="ok") == 2
        assert value(found, "mesh_llm_requests_total", model=OTHER, result="client_error") == 1
        assert not [s for s in found if s.labels.get("model") == "made-up-by-a-client"]
        assert value(found, "mesh_llm_requests_in_flight", model="m") == 0
        assert value(found, "mesh_llm_time_to_first_token_seconds_count", model="m") == 1  # the stream only
        assert value(found, "mesh_llm_inter_token_latency_seconds_count", model="m") >= 3
        # tokens: the stream's from llama-server's timings (31 = 1 + 30 cached, 3), the whole answer's from usage
        assert value(found, "mesh_llm_completion_tokens_total", model="m") == 6
        assert value(found, "mesh_llm_prompt_tokens_total", model="m") == 62
        assert value(found, "mesh_llm_queue_wait_seconds_count", model="m") == 2
        assert value(found, "mesh_llm_failovers_total") == 0
        # live state and llama-server's own, under the model's label and the mesh_llm_llamacpp_ prefix
        assert value(found, "mesh_llm_model_state", model="m", state="serving") == 1
        assert value(found, "mesh_llm_process_restarts_total", model="m", process="llama-server") == 0
        assert value(found, "mesh_llm_llamacpp_prompt_tokens_total", model="m") == 31
        assert not [s for s in found if s.name.startswith("llamacpp")]
        assert metrics_of(node).summary()["m"] == {"ok": 2, "in_flight": 0, "tokens_out": 6}  # a `top` view's row

    anyio.run(main)


def test_a_dead_server_is_counted_as_an_upstream_error() -> None:
    async def main() -> None:
        node = serving_node("http://127.0.0.1:9")  # nothing listens on the discard port
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=build_api(node)), base_url="http://n") as c:
            dead = await c.post(CHAT, json={"model": "m", "messages": USER})
        assert dead.status_code == 503
        found = samples((await scrape(build_console(node))).text)
        assert value(found, "mesh_llm_requests_total", model="m", result="upstream_error") == 1

    anyio.run(main)


def test_a_client_that_goes_away_mid_stream_is_counted_as_cancelled() -> None:
    async def main() -> None:
        async with fake_llama(stall=True) as upstream:
            node = serving_node(upstream)
            body = json.dumps({"model": "m", "messages": USER, "stream": True}).encode()
            got_first, asked = anyio.Event(), False

            async def receive() -> Message:
                nonlocal asked
                if not asked:
                    asked = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await got_first.wait()
                return {"type": "http.disconnect"}  # the client hangs up after the first event

            async def send(message: Message) -> None:
                if message["type"] == "http.response.body" and message.get("body"):
                    got_first.set()

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": CHAT,
                "raw_path": CHAT.encode(),
                "root_path": "",
                "query_string": b"",
                "headers": [(b"host", b"n"), (b"content-type", b"application/json")],
                "client": ("127.0.0.1", 1),
                "server": ("n", 80),
            }
            with anyio.fail_after(60):  # a bound, not a speed: a loaded machine answers late
                await build_api(node)(scope, receive, send)
            found = samples((await scrape(build_console(node))).text)
        assert value(found, "mesh_llm_requests_total", model="m", result="cancelled") == 1
        assert value(found, "mesh_llm_requests_total", model="m", result="ok") == 0
        assert value(found, "mesh_llm_requests_in_flight", model="m") == 0

    anyio.run(main)


def test_the_requests_this_nodes_server_answered_are_counted_for_its_record() -> None:
    """Issue 18 (`top`'s errors per node): what this node's own llama-server answered, whichever node the request
    entered by (here: its own client, and a peer's tunnelled in), reaches its record's `ok` / `err`; requests a peer
    answered, cancelled ones and those refused before a server was asked do not."""

    async def main() -> None:
        async with fake_llama() as upstream:
            node = serving_node(upstream)
            assert node.served() == {} and served_models(node, 8)[0].ok == 0
            api = build_api(node)
            async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=api), base_url="http://node") as c:
                mine = await c.post(CHAT, json={"model": "m", "messages": USER, "stream": True})
                peers = await c.post(CHAT, json={"model": "m", "messages": USER}, headers={HOP_HEADER.decode(): "1"})
                refused = await c.post(CHAT, json={"model": "made-up", "messages": USER})
            assert (mine.status_code, peers.status_code, refused.status_code) == (200, 200, 404)
        metrics = metrics_of(node)
        ends: list[tuple[str, Result | None]] = [(node.node_id, "upstream_error"), ("00000000000000b2", "ok")]
        for served_by, result in [*ends, (node.node_id, None)]:
            trace = Trace(metrics, node.node_id)
            trace.routed("m", tunnelled=False)
            trace.answered(served_by, [])
            if result is not None:
                trace.finish(result)
            trace.close()  # no result: its client went away (cancelled)
        assert node.served() == {"m": (2, 1)}
        # this node's server broke off mid-answer: its error, once, whether a peer then served the rest or none did
        for then in ("00000000000000b2", node.node_id):
            trace = Trace(metrics, node.node_id)
            trace.routed("m", tunnelled=False)
            trace.answered(node.node_id, [])
            trace.server_failed(node.node_id)
            trace.server_failed("00000000000000b2")  # a peer's failure is the peer's to count
            trace.answered(then, [])
            trace.finish("ok" if then != node.node_id else "upstream_error")
            trace.close()
        assert node.served() == {"m": (2, 3)}
        (record,) = served_models(node, 8)
        assert (record.ok, record.err) == (2, 3)
        # and the console's view of this node carries them per model, as `top` reads them
        (me,) = standalone(node, "host")([])["members"]
        assert [(m["name"], m["ok"], m["err"]) for m in me["models"]] == [("m", 2, 3)]

    anyio.run(main)


def test_model_labels_are_bounded() -> None:
    metrics = NodeMetrics()
    names = [metrics.model_label(f"model-{i}") for i in range(MAX_MODEL_LABELS + 10)]
    assert len(set(names)) == MAX_MODEL_LABELS + 1 and names[-1] == OTHER
    assert metrics.model_label("model-0") == "model-0" and metrics.model_label("") == OTHER
    metrics.failover("model-1", "mid_stream")
    assert metrics.failovers.labels("model-1", "mid_stream")._value.get() == 1


def test_each_node_has_its_own_registry() -> None:
    a, b = serving_node("http://x"), serving_node("http://y")
    assert metrics_of(a) is metrics_of(a) and metrics_of(a) is not metrics_of(b)
    metrics_of(a).failover("m", "before_answer")
    assert metrics_of(b).failovers.labels("m", "before_answer")._value.get() == 0


def test_a_remote_viewer_needs_the_key_for_metrics_and_loopback_does_not() -> None:
    async def main() -> None:
        node = serving_node("http://127.0.0.1:9")
        guarded = HttpGuard(build_console(node), Policy(listen_all=True, api_keys=("k",)), CONSOLE)
        remote = {"host": "192.0.2.10:3131"}
        assert (await scrape(guarded, **remote)).status_code == 401
        assert (await scrape(guarded, **remote, authorization="Bearer k")).status_code == 200
        assert (await scrape(guarded)).status_code == 200  # this machine

    anyio.run(main)


# --- a real node ------------------------------------------------------------------------------------------------------


@pytest.fixture
def node(spawn: Callable[..., NodeProcess], smollm: Any) -> NodeProcess:
    started = mesh_node(spawn, "a", "127.0.0.1", "--model", str(smollm), "--listen-all", "--api-key", KEY)
    started.wait_model_state(smollm.stem, "serving", timeout=120)
    return started


def test_a_real_node_counts_a_chat_in_its_metrics(node: NodeProcess) -> None:
    model = node.status()["models"][0]["name"]
    get: Callable[[], list[Sample]] = lambda: samples(httpx2.get(node.console + "/metrics", timeout=10).text)  # noqa: E731
    before = get()
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "stream": True, "max_tokens": 8}
    with httpx2.stream("POST", node.api + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        "".join(r.iter_text())
    after = get()
    assert value(after, "mesh_llm_requests_total", model=model, result="ok") == 1 + value(
        before, "mesh_llm_requests_total", model=model, result="ok"
    )
    assert value(after, "mesh_llm_time_to_first_token_seconds_count", model=model) >= 1
    assert value(after, "mesh_llm_completion_tokens_total", model=model) >= 1
    assert value(after, "mesh_llm_llamacpp_tokens_predicted_total", model=model) >= 1  # llama-server's own
    assert value(after, "mesh_llm_mesh_members") == 1
    assert value(after, "mesh_llm_gossip_rounds_total") >= value(before, "mesh_llm_gossip_rounds_total") > 0
    port = node.console.rsplit(":", 1)[1]
    remote = {"Host": f"192.0.2.10:{port}"}
    assert httpx2.get(node.console + "/metrics", headers=remote, timeout=5).status_code == 401
    keyed = {**remote, "Authorization": f"Bearer {KEY}"}
    assert httpx2.get(node.console + "/metrics", headers=keyed, timeout=5).status_code == 200


# --- what the mesh and the planes above count: gossip rounds, bytes per peer, blackboard syncs, rpc-server restarts --


def has(found: list[Sample], name: str, **labels: str) -> bool:
    return any(s.name == name and labels.items() <= s.labels.items() for s in found)


def peer_row(node_id: str, **fields: Any) -> dict[str, Any]:
    return {"node_id": node_id, "self": False, **fields}


def live_samples(node: NodeState) -> list[Sample]:
    """`live.families(node)` rendered by prometheus_client and read back by its parser."""

    class Live(Collector):
        def collect(self) -> Iterator[Metric]:
            return live.families(node)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Live())
    return samples(generate_latest(registry).decode())


def test_per_peer_families_read_the_peer_rows_within_bounds() -> None:
    node = serving_node("http://127.0.0.1:9")
    own = {"node_id": "me", "self": True, "gossip_rounds": 7, "rpc_server_restarts": {"big": 2, "bad": "x"}}
    rows = [peer_row(f"p{i:04d}", quic_bytes={"in": i, "out": 2 * i}) for i in range(live.MAX_PEERS + 5)]
    odd = [
        peer_row("zz-age", blackboard_sync_age_s=3.5, dataplane_bytes={"in": 10, "out": 20}),
        peer_row("zz-bad", quic_bytes="many", dataplane_bytes={"in": float("nan"), "out": True}),
    ]
    node.peers = lambda: [own, *odd, *rows]
    found = live_samples(node)
    assert value(found, "mesh_llm_gossip_rounds_total") == 7
    assert value(found, "mesh_llm_process_restarts_total", model="big", process="rpc-server") == 2
    assert not [s for s in found if s.labels.get("model") == "bad"]
    quic = [s for s in found if s.name == "mesh_llm_peer_traffic_bytes_total" and s.labels["plane"] == "quic"]
    assert len({s.labels["peer"] for s in quic}) == live.MAX_PEERS  # the first MAX_PEERS by id: zz-* left out
    assert value(found, "mesh_llm_peer_traffic_bytes_total", peer="p0003", plane="quic", direction="out") == 6
    assert value(found, "mesh_llm_peer_traffic_bytes_total", peer="zz-age") == 0
    node.peers = lambda: [own, *odd]
    found = live_samples(node)
    assert value(found, "mesh_llm_blackboard_sync_age_seconds", peer="zz-age") == 3.5
    assert value(found, "mesh_llm_peer_traffic_bytes_total", peer="zz-age", plane="dataplane", direction="out") == 20
    assert not [s for s in found if s.labels.get("peer") == "zz-bad"]  # malformed numbers are left out


def test_a_split_hosts_relayed_bytes_and_the_newest_posts_age_join_the_live_families() -> None:
    """The host's side of the data plane (its relays' bytes by worker) adds to the worker's side in the node's totals
    and per peer; the newest post's age comes from this node's own row, within the posts' life."""
    node = serving_node("http://127.0.0.1:9")
    own = {"node_id": "me", "self": True, "blackboard_newest_post_age_s": 42.5}
    worker, lender = peer_row("w1"), peer_row("w2", dataplane_bytes={"in": 10, "out": 20})
    node.peers = lambda: [own, worker, lender]
    node.traffic = lambda: {"rpc_bytes_in": 10, "rpc_bytes_out": 20}
    relayed = {"w1": (300, 4000), "w2": (5, 6), "gone": (1, 1)}  # a worker no longer a member: in the totals only

    def collected() -> list[Sample]:
        class Live(Collector):
            def collect(self) -> Iterator[Metric]:
                return live.families(node, None, relayed)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Live())
        return samples(generate_latest(registry).decode())

    found = collected()
    per_peer, total = "mesh_llm_peer_traffic_bytes_total", "mesh_llm_traffic_bytes_total"
    assert value(found, per_peer, peer="w1", plane="dataplane", direction="in") == 300
    assert value(found, per_peer, peer="w1", plane="dataplane", direction="out") == 4000
    assert value(found, per_peer, peer="w2", plane="dataplane", direction="in") == 15
    assert value(found, per_peer, peer="w2", plane="dataplane", direction="out") == 26
    assert not [s for s in found if s.labels.get("peer") == "gone"]
    assert value(found, total, plane="dataplane", direction="in") == 10 + 306
    assert value(found, total, plane="dataplane", direction="out") == 20 + 4007
    assert value(found, "mesh_llm_blackboard_newest_post_age_seconds") == 42.5
    assert worker == peer_row("w1")  # the rows were read, not changed
    for bad in (-1.0, 48 * 3600 + 1.0, float("nan"), True, "42", None):
        own["blackboard_newest_post_age_s"] = bad
        assert not has(collected(), "mesh_llm_blackboard_newest_post_age_seconds")
    node.traffic = lambda: {}  # a node that lends no rpc-server: its totals are its relays' alone
    assert value(collected(), total, plane="dataplane", direction="out") == 4007


def test_the_newest_posts_age_is_read_from_the_store_raised_by_each_post_accepted_and_gone_with_it(
    tmp_path: Path,
) -> None:
    """The blackboard's other lag (next to the per-peer sync age): how old the newest post this node holds is. Read
    from the store when the link starts, raised by a post the board accepts, and re-read so an expired one goes."""

    async def main() -> None:
        clock = FakeClock()
        ident = load_or_create(tmp_path / "a")
        state = NodeState(node_id=ident.node_id, name="a", version="0", api_url="", console_url="")
        config = meshfile.create(owner=ident.public_bytes)
        mesh = Mesh(ident, config, tmp_path / "a", state, MeshSettings(host="127.0.0.1"), clock=clock,
                    transport=MemoryNetwork(clock).transport)  # fmt: skip
        author = Ed25519PrivateKey.generate()
        with Store(tmp_path / "board.db") as store:
            board = Board(store, ident.key, ident.node_id, "me", lambda: None, clock=clock.time)  # type: ignore[arg-type,return-value]
            link = BoardLink(mesh, board)
            age = mesh.own_stats["blackboard_newest_post_age_s"]  # what this node's own peer row carries
            assert age() is None  # holds no post
            store.add(make_post("STATUS: first", "bob", author, clock.time() - 100), clock.time())
            async with anyio.create_task_group() as tg:
                tg.start_soon(link.run)
                with anyio.fail_after(30):  # the store is read on a thread: a bound in real time
                    while age() is None:
                        await anyio.sleep(0.01)
                assert age() == 100
                clock.advance(5)
                assert age() == 105
                newer = make_post("second", "bob", author, clock.time() - 1)
                store.add(newer, clock.time())
                board.on_accept(newer, None)  # type: ignore[misc]  # what the board calls for every post it takes
                assert age() == 1
                clock.advance(TTL_S)  # both expired: the next re-read finds none
                with anyio.fail_after(30):
                    while age() is not None:
                        clock.advance(NEWEST_REFRESH_S)
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()

    anyio.run(main)


def quic_creds(tmp_path: Path, name: str) -> Credentials:
    secret = b"s" * 32
    return Credentials(load_or_create(tmp_path / name), b"m" * 16, secret, accepted=lambda node_id: (secret,))


async def quic_echo(
    conn: PeerConnection, header: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    data = await read_frame(reader)
    writer.write(encode(data or b""))
    writer.write_eof()


def test_quic_counts_bytes_per_peer_and_keeps_them_past_the_connection(tmp_path: Path) -> None:
    async def main() -> None:
        with anyio.fail_after(120):
            a = MeshTransport(quic_creds(tmp_path, "a"), {"echo": quic_echo}, host="127.0.0.1")
            b = MeshTransport(quic_creds(tmp_path, "b"), {"echo": quic_echo}, host="127.0.0.1")
            a_id, b_id = a.creds.identity.node_id, b.creds.identity.node_id
            async with anyio.create_task_group() as tg:
                await tg.start(a.run)
                port_b = await tg.start(b.run)
                conn = await a.connect(f"127.0.0.1:{port_b}")
                reader, writer = await conn.open_stream({"t": "echo"})
                writer.write(encode(b"x" * 50_000))
                writer.write_eof()
                assert await read_frame(reader) == b"x" * 50_000
                with anyio.fail_after(60):  # until b has taken the connection as authenticated
                    while b.connection(a_id) is None:
                        await anyio.sleep(0.01)
                for t, peer in ((a, b_id), (b, a_id)):
                    assert t.peer_traffic() == {peer: (t.traffic.bytes_in, t.traffic.bytes_out)}
                assert a.peer_traffic()[b_id][1] > 50_000 and b.peer_traffic()[a_id][0] > 50_000
                before = a.peer_traffic()[b_id]
                conn.close()
                with anyio.fail_after(60):
                    while a.connections:
                        await anyio.sleep(0.01)
                after = a.peer_traffic()[b_id]  # no connection left: its bytes are remembered
                assert after >= before and after == (a.traffic.bytes_in, a.traffic.bytes_out)
                tg.cancel_scope.cancel()

    anyio.run(main)


@pytest.mark.slow
def test_a_mesh_counts_gossip_rounds_bytes_per_peer_blackboard_syncs_and_rpc_server_restarts(
    tmp_path: Path, llama: LlamaCpp, smollm: Path
) -> None:
    """Two in-process meshes over real QUIC: A lends B a real rpc-server; B reaches it through A's data plane;
    the rpc-server is killed and restarted; both carry the blackboard. A's /metrics shows all of it per peer."""

    def mesh(name: str, config: meshfile.MeshConfig, joins: tuple[tokens.InviteToken, ...] = ()) -> Mesh:
        ident = load_or_create(tmp_path / name)
        state = NodeState(node_id=ident.node_id, name=name, version="0", api_url="", console_url="")
        state_of[ident.node_id] = state
        made = Mesh(ident, config, tmp_path / name, state, MeshSettings(host="127.0.0.1", joins=joins))
        state.peers = made.peer_table
        return made

    def board(m: Mesh, stack: ExitStack) -> BoardLink:
        store = stack.enter_context(Store(m.home / "blackboard.db"))
        return BoardLink(m, Board(store, m.identity.key, m.identity.node_id, "me", lambda: None))  # type: ignore[arg-type,return-value]

    async def metrics(m: Mesh) -> list[Sample]:
        return samples((await scrape(build_console(state_of[m.identity.node_id]))).text)

    state_of: dict[str, NodeState] = {}

    async def main() -> None:
        with ExitStack() as stack:
            a = mesh("a", meshfile.create(owner=load_or_create(tmp_path / "a").public_bytes))
            link = RpcLink(a, smollm.parent, tmp_path / "a")
            link.llama, link.threads = llama, 1
            async with anyio.create_task_group() as tg:
                await tg.start(a.run)
                await tg.start(link.run)
                token = tokens.decode(a.invite_token())
                b = mesh("b", meshfile.from_token(token), (token,))
                await tg.start(b.run)
                for m in (a, b):
                    tg.start_soon(board(m, stack).run)
                a_id, b_id = a.identity.node_id, b.identity.node_id
                with anyio.fail_after(240):
                    while len(a.members()) < 2 or len(b.members()) < 2:
                        await anyio.sleep(0.05)
                    async with lease(b, a_id, "split-1", smollm, (0, 0)) as lent:
                        host = lent.address.rsplit(":", 1)[0]
                        port = int(lent.address.rsplit(":", 1)[1])
                        creds = lambda: b.transport.creds  # noqa: E731
                        async with open_relay(b.identity, creds, f"{host}:{port}", lent.target) as relay:
                            info = await probe("127.0.0.1", relay.port)  # through A's data plane
                        ((_, server),) = link._running.values()
                        assert server.pid is not None
                        os.kill(server.pid, signal.SIGKILL)
                        while server.restarts < 1 or server.endpoint is None:
                            await anyio.sleep(0.05)
                    while link._running:  # the lease ended on A's side too
                        await anyio.sleep(0.05)
                    while not has(await metrics(a), "mesh_llm_blackboard_sync_age_seconds", peer=b_id):
                        await anyio.sleep(0.05)  # a sync exchange with B completed
                found = await metrics(a)
                n = len(info.devices)  # HELLO, DEVICE_COUNT, GET_DEVICE_MEMORY per device: requests in, answers out
                dataplane = {"peer": b_id, "plane": "dataplane"}
                assert value(found, "mesh_llm_peer_traffic_bytes_total", **dataplane, direction="in") == 33 + 9 + 13 * n
                assert (
                    value(found, "mesh_llm_peer_traffic_bytes_total", **dataplane, direction="out") == 36 + 12 + 24 * n
                )
                assert value(found, "mesh_llm_process_restarts_total", model=smollm.stem, process="rpc-server") == 1
                for direction in ("in", "out"):
                    quic = value(
                        found, "mesh_llm_peer_traffic_bytes_total", peer=b_id, plane="quic", direction=direction
                    )
                    assert quic > 0
                assert value(found, "mesh_llm_blackboard_sync_age_seconds", peer=b_id) >= 0
                rounds = value(found, "mesh_llm_gossip_rounds_total")
                assert rounds > 0
                with anyio.fail_after(120):
                    while value(await metrics(a), "mesh_llm_gossip_rounds_total") <= rounds:
                        await anyio.sleep(0.05)
                assert has(await metrics(b), "mesh_llm_blackboard_sync_age_seconds", peer=a_id)
                # B is the split's host: its relay counted the same RPC bytes, the other way round, under A
                on_b, hosted = await metrics(b), {"peer": a_id, "plane": "dataplane"}
                assert value(on_b, "mesh_llm_peer_traffic_bytes_total", **hosted, direction="out") == 33 + 9 + 13 * n
                assert value(on_b, "mesh_llm_peer_traffic_bytes_total", **hosted, direction="in") == 36 + 12 + 24 * n
                total = value(on_b, "mesh_llm_traffic_bytes_total", plane="dataplane", direction="in")
                assert total == 36 + 12 + 24 * n
                assert [s.labels["peer"] for s in found if s.name == "mesh_llm_blackboard_sync_age_seconds"] == [b_id]
                tg.cancel_scope.cancel()

    anyio.run(main)

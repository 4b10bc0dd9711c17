"""Issue 18, per-hop timing: `Server-Timing` and `x-mesh-path` on every proxied answer, and `mesh_timing` on a
stream's final event, read by the official openai and anthropic clients; what a peer says of its part is bounded.
Pure parts first, then in process against a stand-in llama-server, then a real two-node mesh.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import anyio
import httpx2
import openai

from mesh_mcp.api.app import build_api
from mesh_mcp.api.directory import RemoteModel
from mesh_mcp.metrics import timing
from mesh_mcp.metrics.sse import Tap
from mesh_mcp.response import Response
from mesh_mcp.state import NodeState
from tests.harness import NodeProcess
from tests.test_mesh import SMOLLM, Spawn, host, mesh_node, token_of, wait_models  # noqa: F401
from tests.test_metrics import CHAT, USER, chat_events, fake_llama, serving_node

ENTRY, PEER = "00000000000000e1", "00000000000000f2"
MESSAGES: Any = USER  # the SDKs' own message types, as plain dicts
HELLO: Any = [{"role": "user", "content": "Say hello."}]


def server_timing(value: str) -> dict[str, float]:
    """A Server-Timing header as {name: dur} (the standard's syntax: `name;dur=N, ...`)."""
    out = {}
    for entry in value.split(","):
        name, _, param = entry.strip().partition(";")
        assert param.startswith("dur="), value
        out[name] = float(param[4:])
    return out


def final_event(text: str) -> dict[str, Any]:
    datas = [line[6:] for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    return json.loads(datas[-1])


# --- pure -----------------------------------------------------------------------------------------------------------


def test_a_peers_header_is_read_within_bounds() -> None:
    got = timing.parse_header([b"upstream;dur=12.5, queue;desc=x;dur=3, prompt;dur=-4, evil;dur=9, hop;dur=1e999"])
    assert got == {"upstream": 12.5, "queue": 3.0}  # negative, unknown and non-decimal values dropped
    flood = b", ".join(b"x%d;dur=1" % i for i in range(1000)) + b", route;dur=5"
    assert timing.parse_header([flood]) == {}  # only MAX_ENTRIES entries are looked at
    assert timing.parse_header([b"serve;dur=7", b"upstream;dur=2"]) == {"serve": 7.0, "upstream": 2.0}
    assert timing.clamp({"upstream": 5e9, "queue": float("nan"), "prompt": True}, 100.0) == {"upstream": 100.0}
    assert server_timing(timing.header_value({"route": 0.25, "hop": 3.0}).decode()) == {"route": 0.2, "hop": 3.0}


def test_the_final_event_is_stamped_once_even_split_across_chunks() -> None:
    given: list[object] = []

    def stamp(peer: object) -> dict[str, Any]:
        given.append(peer)
        return {"route_ms": 1.0}

    tap = Tap(stamp)
    raw = b"".join(chat_events(["a", " b"]))
    end = raw.index(b'"timings"')
    out = tap.feed(raw[:end]) + tap.feed(raw[end:]) + tap.flush()
    assert tap.events == 4 and given == [None]
    assert out.endswith(b"data: [DONE]\n\n") and final_event(out.decode())["mesh_timing"] == {"route_ms": 1.0}
    assert tap.usage.prompt_tokens == 31 and tap.usage.completion_tokens == 3 and tap.usage.prompt_ms == 12.5
    # what a peer stamped is handed over and replaced
    again = Tap(stamp)
    assert b'"hop_ms":9' not in again.feed(out.replace(b'"route_ms":1.0', b'"hop_ms":9'))
    assert given[-1] == {"hop_ms": 9}


# --- in process -------------------------------------------------------------------------------------------------------


def test_a_local_answer_carries_its_timing_and_the_sdks_read_the_stamped_stream() -> None:
    async def main() -> None:
        async with fake_llama() as upstream:
            node = serving_node(upstream, ENTRY)
            app = build_api(node)
            async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://n") as c:
                whole = await c.post(CHAT, json={"model": "m", "messages": USER})
                stream = await c.post(CHAT, json={"model": "m", "messages": USER, "stream": True})
            st = server_timing(whole.headers["server-timing"])
            assert set(st) == {"route", "upstream", "queue", "prompt"} and st["prompt"] == 12.5
            assert whole.headers["x-mesh-path"] == ENTRY and whole.json()["usage"]["completion_tokens"] == 3
            assert set(server_timing(stream.headers["server-timing"])) == {"route", "upstream"}  # at the head
            stamped = final_event(stream.text)["mesh_timing"]
            assert stamped["path"] == [ENTRY] and stamped["prompt_ms"] == 12.5
            assert {"route_ms", "upstream_ms", "queue_ms", "ttft_ms"} <= set(stamped)

            http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))  # the SDKs' own HTTP client
            oa = openai.AsyncOpenAI(base_url="http://n/v1", api_key="x", http_client=http, max_retries=0)
            chunks = [c async for c in await oa.chat.completions.create(model="m", messages=MESSAGES, stream=True)]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a b c"
            assert (chunks[-1].model_extra or {})["mesh_timing"]["path"] == [ENTRY]
            an = anthropic.AsyncAnthropic(base_url="http://n", api_key="x", http_client=http, max_retries=0)
            async with an.messages.stream(model="m", max_tokens=8, messages=MESSAGES) as s:
                text = "".join([t async for t in s.text_stream])
                message = await s.get_final_message()
            assert text == "a b c" and message.usage.output_tokens == 3
            async with http.stream(
                "POST", "http://n/v1/messages", json={"model": "m", "max_tokens": 8, "messages": USER, "stream": True}
            ) as r:
                raw = "".join([t async for t in r.aiter_text()])
            assert final_event(raw)["type"] == "message_stop" and final_event(raw)["mesh_timing"]["path"] == [ENTRY]
            await http.aclose()

    anyio.run(main)


class PeerDirectory:
    """One peer serving `remote-model`: its answer is another node's API app run in process (as the tunnel
    does), or the bytes and headers given (a peer that lies)."""

    def __init__(self, app: Any = None, lie: tuple[list[tuple[bytes, bytes]], bytes] | None = None) -> None:
        self.app, self.lie = app, lie

    def remote_models(self) -> list[RemoteModel]:
        return [RemoteModel("m", PEER, "serving", 0)]

    async def open(
        self, node_id: str, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        if self.lie is not None:
            given, raw = self.lie
            head, data = given, raw
        else:
            transport = httpx2.ASGITransport(app=self.app)
            async with httpx2.AsyncClient(transport=transport, base_url="http://peer") as c:
                r = await c.post(target, content=body, headers=[*headers, (b"x-mesh-llm-routed", b"1")])
            head, data = [(k.encode(), v.encode()) for k, v in r.headers.multi_items()], r.content
            head.append((b"server-timing", b"serve;dur=1.0"))  # as tunnel.serve adds it

        async def chunks() -> AsyncIterator[bytes]:
            yield data

        return Response(200, head, chunks())


def test_a_routed_answer_names_both_nodes_and_bounds_what_the_peer_says() -> None:
    async def main() -> None:
        async with fake_llama() as upstream:
            peer_app = build_api(serving_node(upstream, PEER))
            entry = NodeState(node_id=ENTRY, name="e", version="0", api_url="", console_url="")
            app = build_api(entry, PeerDirectory(peer_app))
            async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://n") as c:
                whole = await c.post(CHAT, json={"model": "m", "messages": USER})
                stream = await c.post(CHAT, json={"model": "m", "messages": USER, "stream": True})
        assert whole.headers["x-mesh-path"] == f"{ENTRY},{PEER}" and whole.headers["x-mesh-node"] == PEER
        st = server_timing(whole.headers["server-timing"])
        assert {"route", "hop", "upstream", "queue", "prompt"} <= set(st) and 0 < st["prompt"] <= 12.5
        stamped = final_event(stream.text)["mesh_timing"]
        assert stamped["path"] == [ENTRY, PEER] and {"hop_ms", "queue_ms", "prompt_ms", "ttft_ms"} <= set(stamped)

        # A peer that lies: absurd durations, a flood of entries, a forged path. Clamped to what the entry waited.
        flood = b", ".join([b"upstream;dur=99999999", b"queue;dur=5e7"] + [b"x;dur=1"] * 100)
        lie_head = [(b"content-type", b"text/event-stream"), (b"server-timing", flood), (b"x-mesh-path", b"evil")]
        raw = b"".join(chat_events(["a"])).replace(
            b'"timings"', b'"mesh_timing": {"queue_ms": 1e15, "path": ["evil"]}, "timings"'
        )
        app = build_api(entry, PeerDirectory(lie=(lie_head, raw)))
        t0 = anyio.current_time()
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://n") as c:
            lied = await c.post(CHAT, json={"model": "m", "messages": USER, "stream": True})
        waited_ms = 1e3 * (anyio.current_time() - t0)
        assert lied.headers["x-mesh-path"] == f"{ENTRY},{PEER}"
        assert server_timing(lied.headers["server-timing"])["upstream"] <= waited_ms
        stamped = final_event(lied.text)["mesh_timing"]
        assert stamped["path"] == [ENTRY, PEER] and stamped["queue_ms"] <= waited_ms

    anyio.run(main)


# --- a real mesh ------------------------------------------------------------------------------------------------------


def test_a_real_routed_stream_is_timed_hop_by_hop(host: NodeProcess, spawn: Spawn, tmp_path: Path) -> None:  # noqa: F811
    client = mesh_node(spawn, "c", "127.0.0.4", "--client", "--join", token_of(host))
    client.wait_for("up", lambda s: True, timeout=120)
    wait_models(client, {SMOLLM}, timeout=120)
    host_id, client_id = host.status()["node_id"], client.status()["node_id"]
    body = {"model": SMOLLM, "messages": HELLO, "max_tokens": 8}
    local = httpx2.post(host.api + "/v1/chat/completions", json=body, timeout=120)
    assert local.headers["x-mesh-path"] == host_id and "prompt" in server_timing(local.headers["server-timing"])
    with httpx2.stream("POST", client.api + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        head = server_timing(r.headers["server-timing"])
        assert r.headers["x-mesh-path"] == f"{client_id},{host_id}" and {"route", "hop", "upstream"} <= set(head)
        text = "".join(r.iter_text())
    stamped = final_event(text)["mesh_timing"]
    assert stamped["path"] == [client_id, host_id] and stamped["prompt_ms"] > 0 and stamped["hop_ms"] >= 0
    print(f"routed stream: head {r.headers['server-timing']}; final event {stamped}")
    oa = openai.OpenAI(base_url=client.api + "/v1", api_key="x", max_retries=0, timeout=60)
    chunks = list(oa.chat.completions.create(model=SMOLLM, messages=HELLO, max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert (chunks[-1].model_extra or {})["mesh_timing"]["path"] == [client_id, host_id]

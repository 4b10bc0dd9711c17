"""Issue 18, a stream that outlives its server (api/resume.py), on streams captured from the pinned llama-server
(tests/data/streams/README.md): what the entry node keeps, the request that continues the answer elsewhere, and
the next server's stream spliced so the client sees one answer — the same text as an uninterrupted run.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from starlette.types import Message

from mesh_mcp.api.app import build_api
from mesh_mcp.api.directory import RemoteModel
from mesh_mcp.api.proxy import FAILOVER_WAIT_S, MAX_FAILOVERS
from mesh_mcp.api.resume import MAX_EVENT, Splice, SseEvents, Transcript, continuation, kind_of, parse_event
from mesh_mcp.errors import UpstreamBroken
from mesh_mcp.metrics import metrics_of
from mesh_mcp.response import Response
from mesh_mcp.state import NodeState

STREAMS = Path(__file__).parent / "data" / "streams"
QUESTION = [{"role": "user", "content": "Write three sentences about the sea."}]


def events(name: str) -> list[bytes]:
    cut = SseEvents()
    out = cut.feed((STREAMS / name).read_bytes())
    assert cut.rest() == b""
    return out


def data(event: bytes) -> dict[str, Any] | None:
    _, raw = parse_event(event)
    return None if raw in (None, b"[DONE]") else json.loads(raw)


def chat_text(stream: list[bytes]) -> str:
    out = []
    for e in stream:
        obj = data(e)
        for choice in (obj or {}).get("choices", []):
            out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


def messages_text(stream: list[bytes]) -> str:
    return "".join(
        obj["delta"].get("text", "") for e in stream if (obj := data(e)) and obj.get("type") == "content_block_delta"
    )


def first_tokens(stream: list[bytes], transcript: Transcript, tokens: int) -> list[bytes]:
    """What the client got before the server died: events up to the `tokens`-th content event."""
    sent = []
    for e in stream:
        if transcript.tokens == tokens:
            break
        transcript.see(e)
        sent.append(e)
    return sent


def test_a_chat_cut_after_ten_tokens_continues_to_the_uninterrupted_text() -> None:
    full = events("chat.sse")
    t = Transcript("chat")
    sent = first_tokens(full, t, 10)
    assert t.resumable() is None and t.tokens == 10
    payload = {"model": "m", "messages": QUESTION, "stream": True, "max_tokens": 60, "temperature": 0}
    body = continuation(payload, t)
    assert body is not None and body["max_tokens"] == 50
    assert body["messages"] == [*QUESTION, {"role": "assistant", "content": chat_text(sent)}]
    assert payload["messages"] == QUESTION  # the client's request is not changed

    splice = Splice(t)
    rest = [out for e in events("chat_after_10.sse") if (out := splice.rewrite(e)) is not None]
    client = sent + rest
    assert chat_text(client) == chat_text(full)  # the same answer as the uninterrupted run, nothing repeated
    first_id = data(full[0])["id"]  # type: ignore[index]
    objs = [o for e in client if (o := data(e))]
    assert {o["id"] for o in objs} == {first_id} and len({o["created"] for o in objs}) == 1
    assert sum(1 for o in objs if o["choices"][0]["delta"].get("role")) == 1  # one opening chunk
    assert parse_event(client[-1])[1] == b"[DONE]"
    assert objs[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_message_cut_after_two_tokens_continues_as_one_message() -> None:
    full = events("messages.sse")
    t = Transcript("messages")
    sent = first_tokens(full, t, 2)
    assert messages_text(sent) == "The sea" and t.block_open
    body = continuation({"model": "m", "messages": QUESTION, "max_tokens": 20, "stream": True}, t)
    assert body is not None and body["messages"][-1] == {"role": "assistant", "content": "The sea"}
    assert body["max_tokens"] == 18

    splice = Splice(t)
    rest = [out for e in events("messages_after_2.sse") if (out := splice.rewrite(e)) is not None]
    client = sent + rest
    kinds = [parse_event(e)[0] for e in client]
    assert kinds.count("message_start") == 1 and kinds.count("content_block_start") == 1
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert messages_text(client) == messages_text(events("messages_after_2.sse"))  # "The sea is a vast …"
    assert messages_text(client).startswith(messages_text(full))  # the first answer's 20 tokens, then more
    usage = next(o for e in client if (o := data(e)) and o.get("type") == "message_delta")["usage"]
    assert usage["output_tokens"] == 20 + 2


def test_a_raw_completion_continues_from_its_prompt_and_text() -> None:
    t = Transcript("completion")
    first_tokens(events("completion.sse"), t, 3)
    body = continuation({"model": "m", "prompt": "The sea is", "max_tokens": 10, "stream": True}, t)
    assert body is not None and body["prompt"] == "The sea is" + t.answer and body["max_tokens"] == 7
    assert continuation({"model": "m", "prompt": ["a", "b"], "max_tokens": 10}, t) is None
    splice = Splice(t)
    assert splice._new_text(" a place") == " a place"  # a raw completion repeats nothing: nothing is dropped


def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> bytes:
    obj = {"id": "chatcmpl-x", "created": 1, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


@pytest.mark.parametrize(
    ("event", "why"),
    [
        (chunk({"tool_calls": [{"index": 0, "function": {"name": "f"}}]}), "calls a tool"),
        (chunk({"reasoning_content": "hmm"}), "reasoning"),
        (chunk({}, "stop"), "ended"),
        (b"data: [DONE]\n\n", "ended"),
        (chunk({"content": "x"}, index=1), "more than one choice"),
    ],
)
def test_what_cannot_be_continued(event: bytes, why: str) -> None:
    t = Transcript("chat")
    t.see(chunk({"role": "assistant", "content": None}))
    t.see(chunk({"content": "Hello"}))
    t.see(event)
    assert why in (t.resumable() or "")
    assert continuation({"model": "m", "messages": QUESTION, "max_tokens": 9}, t) is None


def test_a_request_that_cannot_take_a_continuation_is_not_continued() -> None:
    t = Transcript("chat")
    t.see(chunk({"content": "Hel"}))
    t.see(chunk({"content": "lo"}))
    prefilled = [*QUESTION, {"role": "assistant", "content": "Sure:"}]
    assert continuation({"model": "m", "messages": prefilled}, t) is None  # two assistant messages
    assert continuation({"model": "m", "messages": QUESTION, "max_tokens": 2}, t) is None  # at its length
    assert continuation({"model": "m", "messages": QUESTION, "n": 2}, t) is None
    assert continuation({"model": "m", "messages": QUESTION}, t) == {
        "model": "m",
        "messages": [*QUESTION, {"role": "assistant", "content": "Hello"}],
    }
    untouched = Transcript("chat")
    assert continuation({"model": "m", "messages": QUESTION}, untouched) == {"model": "m", "messages": QUESTION}


def test_an_error_event_marks_the_stream_broken_not_ended() -> None:
    t = Transcript("messages")
    t.see(b'event: error\ndata: {"type": "error", "error": {"type": "api_error", "message": "x"}}\n\n')
    assert t.failed and not t.ended and t.resumable() is None


def test_events_are_cut_whole_across_chunks_and_a_huge_one_passes_unparsed() -> None:
    cut = SseEvents(max_event=64)
    assert cut.feed(b"data: {") == [] and cut.feed(b'"a": 1}\n') == []
    assert cut.feed(b"\ndata: 2\r\n\r\ndata: 3") == [b'data: {"a": 1}\n\n', b"data: 2\r\n\r\n"]
    assert cut.rest() == b"data: 3"
    big = b"data: " + b"x" * 100
    assert cut.feed(big) == [big] and cut.passthrough
    assert cut.feed(b"\n\ndata: y\n\n") == [b"\n\ndata: y\n\n"]  # from here on, as it comes


def test_only_generation_paths_are_continued() -> None:
    assert [kind_of(p) for p in ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/embeddings")] == [
        "chat",
        "completion",
        "messages",
        None,
    ]


def test_the_transcript_is_bounded() -> None:
    t = Transcript("chat")
    t.see(chunk({"content": "x" * (4 << 20)}))
    t.see(chunk({"content": "y"}))
    assert "past" in (t.resumable() or "")


# --- through the proxy, in process: servers that break, lie or flood (the in-memory directory twin) ---------------


class StreamTwin:
    """Two remote servers of "remote-model"; the n-th request asked of either is answered with `answers[n]`'s chunks
    (the last answer for every later one), then breaks off (`UpstreamBroken`) unless it ended the stream."""

    def __init__(self, answers: list[list[bytes]]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, dict[str, Any]]] = []

    def remote_models(self) -> list[RemoteModel]:
        return [RemoteModel("remote-model", nid, "serving", 0) for nid in ("a" * 16, "b" * 16)]

    async def open(
        self, node_id: str, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        chunks = self.answers[min(len(self.asked), len(self.answers) - 1)]
        self.asked.append((node_id, json.loads(body)))

        async def body_() -> AsyncIterator[bytes]:
            for piece in chunks:
                yield piece
            if not chunks or b"[DONE]" not in chunks[-1]:
                raise UpstreamBroken(f"{node_id} died")

        return Response(200, [(b"content-type", b"text/event-stream")], body_())


def ask(twin: StreamTwin) -> str:
    async def go() -> str:
        node = NodeState(node_id="0" * 16, name="entry", version="0", api_url="", console_url="")
        app = build_api(node, twin)
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            body = {"model": "remote-model", "messages": QUESTION, "stream": True, "max_tokens": 20}
            with anyio.fail_after(60):
                r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.text

    return anyio.run(go)


def test_a_stream_goes_on_on_the_other_server_in_process() -> None:
    opening = chunk({"role": "assistant", "content": None})
    twin = StreamTwin(
        [
            [opening, chunk({"content": "Hel"}), chunk({"content": "l"})],
            [opening, chunk({"content": "Hello"}), chunk({"content": " sea"}), chunk({}, "stop") + b"data: [DONE]\n\n"],
        ]
    )
    text = ask(twin)
    assert chat_text(SseEvents().feed(text.encode())) == "Hello sea" and text.rstrip().endswith("data: [DONE]")
    (first, _), (second, continued) = twin.asked
    assert first != second and continued["messages"][-1] == {"role": "assistant", "content": "Hell"}
    assert continued["max_tokens"] == 18


def test_servers_that_keep_failing_end_the_stream_with_the_error_event_after_a_bounded_number_of_tries() -> None:
    """A hostile member (or a broken one) answers every continuation with its error event: the entry node tries
    at most MAX_FAILOVERS more times and ends with the error event, it never loops."""
    error = b'data: {"error": {"message": "no", "type": "server_error"}}\n\n'
    opening = [chunk({"role": "assistant", "content": None}), chunk({"content": "Hi"})]
    twin = StreamTwin([[*opening, error], [error]])
    text = ask(twin)
    assert len(twin.asked) == 1 + MAX_FAILOVERS
    assert "upstream_failed" in text and text.count('"error"') == 1  # the servers' own error events are held back
    assert chat_text(SseEvents().feed(text.encode())) == "Hi"


def test_an_event_past_the_parse_limit_passes_through_and_is_not_continued() -> None:
    """A server floods one event with no blank line: the entry node stops holding it past MAX_EVENT (memory bound),
    passes the bytes on, and a break after that is not continued (what was sent cannot be read back)."""
    flood = b"data: " + b"x" * (MAX_EVENT + 10)
    twin = StreamTwin([[chunk({"role": "assistant", "content": None}), flood], []])
    text = ask(twin)
    assert len(twin.asked) == 1 and "upstream_failed" in text


class ComingTwin(StreamTwin):
    """A serves "remote-model" and breaks off mid-stream; then the mesh says a server is coming (a 503 from routing,
    so the proxy waits up to FAILOVER_WAIT_S) until the client has gone away, when B comes up: a proxy that still
    waited would ask B to go on with the answer."""

    def __init__(self, answers: list[list[bytes]]) -> None:
        super().__init__(answers)
        self.broke = False
        self.waiting = anyio.Event()  # the proxy asked for a server while none was serving
        self.client_gone = False

    def remote_models(self) -> list[RemoteModel]:
        if not self.broke:
            return [RemoteModel("remote-model", "a" * 16, "serving", 0)]
        if not self.client_gone:
            self.waiting.set()
            return [RemoteModel("remote-model", "a" * 16, "loading", 0)]
        return [RemoteModel("remote-model", "b" * 16, "serving", 0)]

    async def open(
        self, node_id: str, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        resp = await super().open(node_id, method, target, headers, body)

        async def marked() -> AsyncIterator[bytes]:
            try:
                async for piece in resp.chunks():
                    yield piece
            except UpstreamBroken:
                self.broke = True
                raise

        return Response(resp.status, resp.headers, marked())


def test_a_client_gone_while_the_entry_node_waits_for_a_server_cancels_the_continuation() -> None:
    """The client hangs up while the entry node waits for a server to go on on (the mesh says one is coming): the
    request ends at once and is counted as cancelled; the server that comes up afterwards is never asked."""
    opening = chunk({"role": "assistant", "content": None})
    twin = ComingTwin([[opening, chunk({"content": "Hel"})], [chunk({"content": "lo"}), chunk({}, "stop")]])
    node = NodeState(node_id="0" * 16, name="entry", version="0", api_url="", console_url="")
    body = json.dumps({"model": "remote-model", "messages": QUESTION, "stream": True, "max_tokens": 20}).encode()
    sent: list[bytes] = []
    asked = False

    async def receive() -> Message:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": body, "more_body": False}
        await twin.waiting.wait()
        twin.client_gone = True
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            sent.append(message.get("body", b""))

    path = "/v1/chat/completions"
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"n"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("n", 80),
    }  # fmt: skip

    async def go() -> None:
        with anyio.fail_after(FAILOVER_WAIT_S / 2):  # a bound, not a speed: waiting it out would take twice as long
            await build_api(node, twin)(scope, receive, send)

    anyio.run(go)
    assert twin.broke and twin.client_gone
    assert [n for n, _ in twin.asked] == ["a" * 16], "the server that came up was asked to go on for a gone client"
    assert chat_text(SseEvents().feed(b"".join(sent))) == "Hel" and b"upstream_failed" not in b"".join(sent)
    row = metrics_of(node).summary()["remote-model"]
    assert row.get("cancelled") == 1 and row.get("in_flight") == 0 and not row.get("ok"), row

"""Streams that outlive their server (issue 18): what the entry node keeps of a streamed answer, and how another
server continues it. Pure: events in, events and request bodies out; the proxy does the I/O.

A stream is relayed event by event (`SseEvents` cuts the upstream bytes at blank lines, so a client never gets half
an event), and `Transcript.see` reads each: the ids the client was given, the text so far, how many tokens, whether
it ended. When the server dies mid-answer, `continuation` is the request for the next server: the same request
with the answer so far as a prefilled assistant message (chat and Anthropic messages: llama-server continues a final
assistant message instead of starting a new one; a raw completion: the prompt with the text appended), and
`max_tokens` less what was already generated. `Splice` turns the next server's stream into the rest of the first:
the start events the client already has are dropped, ids, `created`, the content block's index and the usage are
the first stream's. llama-server (the pinned build) streams a continued message from its start — the prefill again,
then the new text, often within one delta — so `Splice` drops content up to the length of the answer so far where it
repeats it (and passes everything when a server does not repeat it). At temperature 0 the client's text equals an
uninterrupted run's: measured with SmolLM2-135M, cut after 1, 10, 20, 35 and 50 of 47 tokens, chat and messages
(greedy decoding from the same prefix, as far as the text re-tokenizes as it was generated).

Not continued (the client gets the in-stream error event, as before): an answer that called a tool or streamed
reasoning (a prefill cannot hold either), more than one choice (`n`), a raw prompt that is not one string, a
transcript past `MAX_TRANSCRIPT`, and an answer that already ended (its end was sent: nothing to continue).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

Flavor = Literal["openai", "anthropic"]
Kind = Literal["chat", "completion", "messages"]

MAX_EVENT = 1 << 20  # one SSE event held until its blank line; past it the stream is passed on unparsed
MAX_TRANSCRIPT = 4 << 20  # answer text kept for a continuation; past it the answer cannot be continued
_DONE = b"[DONE]"
_KINDS: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/messages": "messages"}


def kind_of(path: str) -> Kind | None:
    """The API of `path` as the continuation knows it; None for one that is not continued (embeddings...)."""
    return _KINDS.get(path)


class SseEvents:
    """Server-sent-event bytes cut into whole events (each with its blank line). An event past `MAX_EVENT` ends
    the cutting: it and everything after pass on as they come (`passthrough`), never parsed."""

    def __init__(self, max_event: int = MAX_EVENT) -> None:
        self._buf = bytearray()
        self._max = max_event
        self.passthrough = False

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.passthrough:
            return [chunk] if chunk else []
        self._buf += chunk
        out = []
        while True:
            ends = [i for i in (self._buf.find(b"\n\n"), self._buf.find(b"\r\n\r\n")) if i >= 0]
            if not ends:
                break
            end = min(ends)
            size = end + (4 if self._buf.startswith(b"\r\n\r\n", end) else 2)
            out.append(bytes(self._buf[:size]))
            del self._buf[:size]
        if len(self._buf) > self._max:
            self.passthrough = True
            out.append(bytes(self._buf))
            self._buf.clear()
        return out

    def rest(self) -> bytes:
        """An incomplete last event (the stream ended inside it)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def parse_event(event: bytes) -> tuple[str | None, bytes | None]:
    """(event name, data) of one SSE event; data lines joined; (None, None) for a comment or keep-alive."""
    name, data = None, []
    for line in event.splitlines():
        if line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
        elif line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
    return name, (b"\n".join(data) if data else None)


def _json(data: bytes | None) -> dict[str, Any] | None:
    if data is None or data == _DONE:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _event(data: dict[str, Any], name: str | None = None) -> bytes:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    return (f"event: {name}\n".encode() if name else b"") + b"data: " + body + b"\n\n"


@dataclass
class Transcript:
    """What the client has been sent of one streamed answer."""

    kind: Kind
    text: list[str] = field(default_factory=list)
    size: int = 0  # bytes of `text`
    tokens: int = 0  # content events seen: llama-server streams one token per event
    ids: dict[str, Any] = field(default_factory=dict)  # openai: id, created, model; anthropic: the message's
    started: bool = False  # the stream's opening events reached the client (role chunk / message_start)
    block_open: bool = False  # anthropic: the text block's content_block_start reached the client
    block_index: int = 0
    ended: bool = False  # its end (finish_reason / message_stop / [DONE]) reached the client
    closed: bool = False  # and the stream's last event ([DONE] / message_stop)
    why_not: str | None = None  # set once the answer cannot be continued
    failed: bool = False  # the server said it failed (an error event): the stream is broken, not ended

    def _add(self, text: str) -> None:
        self.text.append(text)
        self.size += len(text.encode())
        self.tokens += 1
        if self.size > MAX_TRANSCRIPT:
            self.why_not = f"the answer so far is past {MAX_TRANSCRIPT} bytes"

    @property
    def answer(self) -> str:
        return "".join(self.text)

    def see(self, event: bytes) -> None:
        """One event the client was sent."""
        name, data = parse_event(event)
        if data == _DONE:
            self.ended = self.closed = True
            return
        obj = _json(data)
        if obj is None:
            return
        if name == "error" or "error" in obj:
            self.failed = True
            return
        if self.kind == "messages":
            self._see_anthropic(name or str(obj.get("type", "")), obj)
        else:
            self._see_openai(obj)

    def _see_openai(self, obj: dict[str, Any]) -> None:
        self.started = True
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in obj and key not in self.ids:
                self.ids[key] = obj[key]
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if choice.get("index", 0) != 0:
                self.why_not = "more than one choice"
            if self.kind == "chat":
                found = choice.get("delta")
                delta: dict[str, Any] = found if isinstance(found, dict) else {}
                if delta.get("tool_calls"):
                    self.why_not = "the answer calls a tool"
                if delta.get("reasoning_content"):
                    self.why_not = "the answer streams reasoning"
                text = delta.get("content")
            else:
                text = choice.get("text")
            if isinstance(text, str) and text:
                self._add(text)
            if choice.get("finish_reason"):
                self.ended = True

    def _see_anthropic(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "message_start":
            self.started = True
            message = obj.get("message")
            if isinstance(message, dict):
                self.ids = {k: message[k] for k in ("id", "model") if k in message}
                usage = message.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("input_tokens"), int):
                    self.ids["input_tokens"] = usage["input_tokens"]
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if not isinstance(block, dict) or block.get("type") != "text":
                self.why_not = f"the answer has a {block.get('type') if isinstance(block, dict) else '?'} block"
            self.block_open = True
            self.block_index = obj.get("index", 0) if isinstance(obj.get("index"), int) else 0
        elif kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                self._add(delta["text"])
            elif isinstance(delta, dict):
                self.why_not = f"the answer streams {delta.get('type')}"
        elif kind == "content_block_stop":
            self.block_open = False
        elif kind == "message_stop":
            self.ended = self.closed = True
        elif kind == "message_delta":
            delta = obj.get("delta")
            self.ended = self.ended or (isinstance(delta, dict) and bool(delta.get("stop_reason")))

    def resumable(self) -> str | None:
        """Why this answer cannot be continued; None when it can."""
        if self.ended:
            return "the answer had ended"
        return self.why_not


def closing(transcript: Transcript) -> bytes:
    """The last event of a stream whose answer ended but whose server broke off before closing it."""
    if transcript.closed:
        return b""
    return (
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
        if transcript.kind == "messages"
        else b"data: [DONE]\n\n"
    )


def continuation(payload: dict[str, Any], transcript: Transcript) -> dict[str, Any] | None:
    """The request that makes another server continue the answer; None when it cannot be continued."""
    if transcript.resumable() is not None:
        return None
    body = dict(payload)
    answer = transcript.answer
    if transcript.kind == "completion":
        prompt = payload.get("prompt")
        if not isinstance(prompt, str) or payload.get("n", 1) != 1:
            return None
        body["prompt"] = prompt + answer
    else:
        messages = payload.get("messages")
        if not isinstance(messages, list) or payload.get("n", 1) != 1:
            return None
        if answer:
            if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
                return None  # the client prefilled already: two assistant messages cannot be continued
            body["messages"] = [*messages, {"role": "assistant", "content": answer}]
    for key in ("max_tokens", "max_completion_tokens", "n_predict"):
        asked = payload.get(key)
        if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0:
            left = asked - transcript.tokens
            if left <= 0:
                return None  # it was at its length: the end is all that is missing
            body[key] = left
    return body


class Splice:
    """The next server's stream as the rest of the first one: its opening events dropped where the client has
    them, ids and indexes the first stream's, usage counting the tokens generated before."""

    def __init__(self, transcript: Transcript) -> None:
        self.t = transcript
        self.before = transcript.tokens  # tokens the first server(s) generated
        # A continued message comes back from its start: the answer so far, to drop where it is repeated.
        self.echo = transcript.answer if transcript.kind != "completion" else ""

    def _new_text(self, text: str) -> str:
        """The part of a content delta the client does not have yet."""
        if not self.echo:
            return text
        if text.startswith(self.echo):
            text, self.echo = text[len(self.echo) :], ""
            return text
        if self.echo.startswith(text):
            self.echo = self.echo[len(text) :]
            return ""
        self.echo = ""  # not a repeat: this server continues without one
        return text

    def rewrite(self, event: bytes) -> bytes | None:
        """The event to send the client in place of `event`; None to drop it."""
        name, data = parse_event(event)
        obj = _json(data)
        if obj is None:
            return event  # [DONE], comments and keep-alives pass as they are
        if self.t.kind == "messages":
            return self._anthropic(name or str(obj.get("type", "")), obj)
        return self._openai(obj)

    def _openai(self, obj: dict[str, Any]) -> bytes | None:
        obj.update(self.t.ids)
        choices = obj.get("choices")
        if self.t.kind == "chat" and isinstance(choices, list):
            for choice in choices:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if not isinstance(delta, dict):
                    continue
                if self.t.started:
                    delta.pop("role", None)
                if isinstance(delta.get("content"), str) and delta["content"]:
                    delta["content"] = self._new_text(delta["content"])
            if all(_empty_choice(c) for c in choices) and "usage" not in obj and "timings" not in obj:
                return None  # the role-only opening chunk (the client has one), or a repeat of the answer so far
        usage = obj.get("usage")
        if isinstance(usage, dict):
            for key, sign in (("completion_tokens", 1), ("prompt_tokens", -1)):
                if isinstance(usage.get(key), int):
                    usage[key] = max(0, usage[key] + sign * self.before)
            if isinstance(usage.get("prompt_tokens"), int) and isinstance(usage.get("completion_tokens"), int):
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return _event(obj)

    def _anthropic(self, kind: str, obj: dict[str, Any]) -> bytes | None:
        if kind == "message_start" and self.t.started:
            return None
        if kind == "content_block_start":
            if self.t.block_open or self.t.text:
                return None  # the text block the client has open goes on
            obj["index"] = self.t.block_index
        elif kind in ("content_block_delta", "content_block_stop"):
            obj["index"] = self.t.block_index
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                delta["text"] = self._new_text(delta["text"])
                if not delta["text"]:
                    return None
        elif kind == "message_delta":
            usage = obj.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("output_tokens"), int):
                usage["output_tokens"] += self.before
                if "input_tokens" in self.t.ids and "input_tokens" in usage:
                    usage["input_tokens"] = self.t.ids["input_tokens"]
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                message.update({k: self.t.ids[k] for k in ("id", "model") if k in self.t.ids})
        return _event(obj, kind)


def _empty_choice(choice: object) -> bool:
    if not isinstance(choice, dict) or choice.get("finish_reason"):
        return False
    delta = choice.get("delta")
    return not isinstance(delta, dict) or not any(v for k, v in delta.items() if k != "role")

"""What a response says about itself, read as it passes: events of a stream, tokens in and out, llama-server's
timings; and the one change made on the way: the stream's final event gets a `mesh_timing` object.

Pure: bytes in, bytes out. `Tap.feed` takes each chunk the client is sent and returns what to send instead:
complete lines pass in the same call (only a trailing incomplete line is held until its newline, at most
`MAX_LINE` bytes; past it the line passes unread), so no token waits for the next one. The final event is the one
llama-server puts its `timings` on (OpenAI's chat and completions streams: the last chunk before `[DONE]`) or
Anthropic's `message_stop`; a `mesh_timing` a peer already put there is handed to `stamp` and replaced by what
`stamp` returns. Lines are parsed only when they can hold usage or timings (`_INTERESTING`), at most
`MAX_PARSED` bytes each. A whole (not streamed) body is read the same way by `Usage.read_body`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_LINE = 1 << 20  # an SSE line held back while incomplete (as api/rewrite.py's streams do)
MAX_PARSED = 256 << 10  # a line or body parsed for usage and timings; a final event is ~600 bytes
MAX_TOKENS = 1 << 40  # a count past this is a broken server, not a count
_INTERESTING = (b'"usage"', b'"timings"', b'"message_stop"')
_DONE = b"[DONE]"

# Given the `mesh_timing` a peer put on the final event (or None) and the event's own data, what to put there.
Stamp = Callable[[object], dict[str, Any]]


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value) if 0 <= value <= MAX_TOKENS else None


def _ms(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


@dataclass
class Usage:
    """Tokens and llama-server's own timings, from `usage` (preferred for counts) or `timings`."""

    tokens_in: int | None = None
    tokens_out: int | None = None
    timing_in: int | None = None  # timings.prompt_n + cache_n
    timing_out: int | None = None  # timings.predicted_n
    prompt_ms: float | None = None
    predicted_ms: float | None = None
    per_token_ms: float | None = None

    @property
    def prompt_tokens(self) -> int | None:
        return self.tokens_in if self.tokens_in is not None else self.timing_in

    @property
    def completion_tokens(self) -> int | None:
        return self.tokens_out if self.tokens_out is not None else self.timing_out

    def read(self, obj: dict[str, Any]) -> None:
        """What one JSON object (a body, an event's data) says: OpenAI's and Anthropic's usage shapes, Anthropic's
        `message_start` (usage under `message`), llama-server's `timings`."""
        message = obj.get("message")
        for usage in (obj.get("usage"), message.get("usage") if isinstance(message, dict) else None):
            if not isinstance(usage, dict):
                continue
            if (n := _count(usage.get("prompt_tokens"))) is not None:
                self.tokens_in = n
            if (n := _count(usage.get("completion_tokens"))) is not None:
                self.tokens_out = n
            if (n := _count(usage.get("input_tokens"))) is not None:
                cached = [_count(usage.get(k)) for k in ("cache_read_input_tokens", "cache_creation_input_tokens")]
                self.tokens_in = n + sum(c for c in cached if c is not None)
            if (n := _count(usage.get("output_tokens"))) is not None and (n or self.tokens_out is None):
                self.tokens_out = n  # message_start says 0, message_delta the count
        timings = obj.get("timings")
        if isinstance(timings, dict):
            prompt_n, cache_n = _count(timings.get("prompt_n")), _count(timings.get("cache_n"))
            if prompt_n is not None:
                self.timing_in = prompt_n + (cache_n or 0)
            self.timing_out = _count(timings.get("predicted_n"))
            self.prompt_ms = _ms(timings.get("prompt_ms"))
            self.predicted_ms = _ms(timings.get("predicted_ms"))
            self.per_token_ms = _ms(timings.get("predicted_per_token_ms"))

    def read_body(self, body: bytes) -> None:
        """A whole JSON body (at most `MAX_PARSED` bytes are parsed; a longer one says nothing)."""
        if len(body) > MAX_PARSED or not any(name in body for name in _INTERESTING[:2]):
            return
        obj = _json(body)
        if obj is not None:
            self.read(obj)


def _finished(choices: object) -> bool:
    """An OpenAI chunk that ends the answer: a finish_reason is set, or (the usage chunk) it has no choices."""
    if not isinstance(choices, list):
        return False
    return not choices or any(isinstance(c, dict) and c.get("finish_reason") is not None for c in choices)


def _json(raw: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


class Tap:
    """Reads an SSE stream as it passes (see the module docstring); `events` counts its data events so far and
    `new_events` those of the last `feed`."""

    def __init__(self, stamp: Stamp) -> None:
        self.stamp = stamp
        self.usage = Usage()
        self.events = 0
        self.new_events = 0
        self.stamped = False
        self._pending = bytearray()
        self._raw_line = False  # the current line outgrew MAX_LINE: the rest of it passes unread

    def feed(self, chunk: bytes) -> bytes:
        self.new_events = 0
        newline = chunk.rfind(b"\n")
        if newline < 0:
            self._pending += chunk
            if len(self._pending) <= MAX_LINE:
                return b""
            out = bytes(self._pending)
            self._pending.clear()
            self._raw_line = True
            return out
        complete = bytes(self._pending) + chunk[: newline + 1]
        self._pending = bytearray(chunk[newline + 1 :])
        return self._lines(complete)

    def flush(self) -> bytes:
        out = bytes(self._pending)
        self._pending.clear()
        return out

    def _lines(self, complete: bytes) -> bytes:
        out = []
        for line in complete.splitlines(keepends=True):
            if self._raw_line:  # the end of a line that passed unread
                self._raw_line = False
                out.append(line)
                continue
            if line.startswith(b"data:"):
                body = line[5:].strip()
                if body != _DONE:
                    self.events += 1
                    self.new_events += 1
                if len(body) <= MAX_PARSED and any(name in body for name in _INTERESTING):
                    line = self._event(line, body)
            out.append(line)
        return b"".join(out)

    def _event(self, line: bytes, body: bytes) -> bytes:
        obj = _json(body)
        if obj is None:
            return line
        self.usage.read(obj)
        final = obj.get("type") == "message_stop" or ("timings" in obj and _finished(obj.get("choices")))
        if not final or self.stamped:
            return line
        self.stamped = True
        obj["mesh_timing"] = self.stamp(obj.pop("mesh_timing", None))
        ending = line[len(line.rstrip(b"\r\n")) :]
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + ending

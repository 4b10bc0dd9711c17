"""What llama-server answers, rewritten where clients of the official APIs expect something else; pure (bytes in,
bytes out), bounded, and idempotent (a response a peer already rewrote passes unchanged through the next hop).

- Anthropic messages: llama-server names them `chatcmpl-…` (Anthropic: `msg_…`) and ends a hit stop sequence with
  `stop_reason: "end_turn"` (Anthropic: `"stop_sequence"`, with `stop_sequence` the one hit). A stop string of the
  chat template (not the client's) is reported as `end_turn` with no `stop_sequence`. Non-streaming bodies are
  rewritten whole; a stream is passed on as it arrives, line by line, and only its `message_start` and
  `message_delta` events are parsed and rewritten (`AnthropicStream`).
- Context overflow: llama-server's `exceed_context_size_error` becomes OpenAI's `context_length_exceeded`
  (`invalid_request_error`, `param`) or Anthropic's "prompt is too long: N tokens > M maximum", the sentences
  clients look for to shorten or compact a conversation.
- Errors on Anthropic's API: llama-server answers them in OpenAI's shape; `anthropic_error_body` gives Anthropic's.
The error shapes themselves are built by `errors`.
"""

from __future__ import annotations

import json
from typing import Any

from mesh_mcp.api.errors import error_body, error_bytes

MAX_LINE = 1 << 20  # an SSE line held back while incomplete; past it, the rest of the line passes unread
MAX_MESSAGE_BODY = 16 << 20  # a non-streaming answer rewritten whole; a longer one passes unchanged
_EVENTS = (b"message_start", b"message_delta")


def _dumps(value: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate (a JSON escape) is not UTF-8: escape everything
        return json.dumps(value, separators=(",", ":")).encode()


def message_id(upstream: str) -> str:
    """An Anthropic message id (`msg_…`) for llama-server's completion id."""
    if upstream.startswith("msg_"):
        return upstream
    return "msg_" + upstream.removeprefix("chatcmpl-")


def fix_stop(fields: dict[str, Any], stop_sequences: tuple[str, ...]) -> None:
    """`stop_reason`/`stop_sequence` of a message (or a message_delta's delta) as Anthropic reports them."""
    hit = fields.get("stop_sequence")
    if hit is None:
        return
    if isinstance(hit, str) and hit in stop_sequences:
        fields["stop_reason"] = "stop_sequence"
    else:  # a stop string of the chat template, not the client's: the model ended its turn
        fields["stop_sequence"] = None
        if fields.get("stop_reason") == "stop_sequence":
            fields["stop_reason"] = "end_turn"


def anthropic_message(body: bytes, stop_sequences: tuple[str, ...]) -> bytes:
    """A non-streaming /v1/messages answer with Anthropic's id and stop fields; anything else unchanged."""
    try:
        message = json.loads(body)
    except ValueError:
        return body
    if not isinstance(message, dict) or message.get("type") != "message":
        return body
    before = dict(message)
    _fix_message(message, stop_sequences)
    return body if message == before else _dumps(message)


def _fix_message(message: dict[str, Any], stop_sequences: tuple[str, ...]) -> None:
    if isinstance(message.get("id"), str):
        message["id"] = message_id(message["id"])
    fix_stop(message, stop_sequences)


def _fix_event(data: bytes, stop_sequences: tuple[str, ...]) -> tuple[str, bytes] | None:
    """The type and rewritten `data:` payload of a message_start or message_delta event, or None to keep it."""
    try:
        event = json.loads(data)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    if event.get("type") == "message_start" and isinstance(event.get("message"), dict):
        _fix_message(event["message"], stop_sequences)
    elif event.get("type") == "message_delta" and isinstance(event.get("delta"), dict):
        fix_stop(event["delta"], stop_sequences)
    else:
        return None
    return event["type"], _dumps(event)


class AnthropicStream:
    """Rewrites an Anthropic SSE stream as it passes: `feed` each upstream chunk and send what it returns at once,
    then `flush` at the end. Complete lines pass through in the same call; only a trailing incomplete line is
    held until its newline (at most `MAX_LINE` bytes). Once the message_delta event has passed, the rest of the
    stream is not looked at."""

    def __init__(self, stop_sequences: tuple[str, ...]) -> None:
        self.stop_sequences = stop_sequences
        self.pending = bytearray()
        self.raw_line = False  # the current line outgrew MAX_LINE: the rest of it passes unread
        self.done = False  # message_delta seen: nothing left to rewrite

    def feed(self, chunk: bytes) -> bytes:
        if self.done and not self.pending:
            return chunk
        newline = chunk.rfind(b"\n")
        if newline < 0:
            self.pending += chunk
            if len(self.pending) <= MAX_LINE:
                return b""
            out = bytes(self.pending)
            self.pending.clear()
            self.raw_line = True
            return out
        complete = bytes(self.pending) + chunk[: newline + 1]
        self.pending = bytearray(chunk[newline + 1 :])
        return self._lines(complete)

    def flush(self) -> bytes:
        out = bytes(self.pending)
        self.pending.clear()
        return out

    def _lines(self, complete: bytes) -> bytes:
        if self.raw_line:
            end = complete.index(b"\n") + 1
            self.raw_line = False
            return complete[:end] + self._lines(complete[end:]) if end < len(complete) else complete
        if self.done or not any(name in complete for name in _EVENTS):
            return complete
        out = []
        for line in complete.splitlines(keepends=True):
            if line.startswith(b"data:") and any(name in line for name in _EVENTS):
                body = line[5:].strip()
                fixed = _fix_event(body, self.stop_sequences)
                if fixed is not None:
                    kind, data = fixed
                    self.done = kind == "message_delta"
                    ending = line[len(line.rstrip(b"\r\n")) :]
                    line = b"data: " + data + ending
            out.append(line)
        return b"".join(out)


def _overflow_counts(raw: bytes) -> tuple[str, int | None, int | None] | None:
    """llama-server's context-overflow error: (its message, prompt tokens, context), or None for any other body."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return None
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(err, dict) or err.get("type") != "exceed_context_size_error":
        return None
    prompt, ctx = err.get("n_prompt_tokens"), err.get("n_ctx")
    return (
        str(err.get("message") or "the request does not fit the model's context"),
        prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else None,
        ctx if isinstance(ctx, int) and not isinstance(ctx, bool) else None,
    )


def openai_context_error(raw: bytes, path: str) -> bytes | None:
    """OpenAI's `context_length_exceeded` error for llama-server's overflow body, or None if `raw` is not one."""
    found = _overflow_counts(raw)
    if found is None:
        return None
    upstream, prompt, ctx = found
    param = {"/v1/completions": "prompt", "/v1/responses": "input"}.get(path, "messages")
    what = {"prompt": "prompt", "input": "input"}.get(param, "messages")
    if prompt is not None and ctx is not None:
        message = (
            f"This model's maximum context length is {ctx} tokens. However, your {what} resulted in {prompt} "
            f"tokens. Please reduce the length of the {what}."
        )
    else:
        message = f"{upstream}. Please reduce the length of the {what}."
    return _dumps(error_body("openai", 400, message, "context_length_exceeded", param=param))


def anthropic_context_message(raw: bytes) -> str | None:
    """Anthropic's "prompt is too long" sentence for llama-server's overflow body, or None if `raw` is not one."""
    found = _overflow_counts(raw)
    if found is None:
        return None
    upstream, prompt, ctx = found
    hint = "shorten the conversation, or serve the model with a larger context: --ctx-size"
    if prompt is not None and ctx is not None:
        return f"prompt is too long: {prompt} tokens > {ctx} maximum ({hint})"
    return f"prompt is too long: {upstream} ({hint})"


def anthropic_error_body(status: int, raw: bytes) -> bytes:
    """An upstream error body in Anthropic's shape; the message is kept. A body already in Anthropic's shape (a
    peer rewrote it) passes unchanged; a context overflow reads as Anthropic's "prompt is too long"."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("type") == "error" and isinstance(parsed.get("error"), dict):
        return raw
    if (overflow := anthropic_context_message(raw)) is not None:
        return error_bytes("anthropic", status, overflow)
    message = raw.decode("utf-8", "replace").strip()[:4096] or f"upstream error {status}"
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"]
        elif isinstance(err, str):
            message = err
        elif isinstance(parsed.get("message"), str):
            message = parsed["message"]
    return error_bytes("anthropic", status, message)

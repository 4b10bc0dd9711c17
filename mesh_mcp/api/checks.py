"""Request validation for the :9337 API, pure: a parsed request body, its API flavor and path, and what is known
of the model it names → None, or the `Rejection` to answer with (400, a sentence naming the field, its `param`).

llama-server accepts much that OpenAI and Anthropic refuse (`messages: []`, `role: "bogus"`, `temperature: -3`,
Anthropic requests without `max_tokens`) and casts some fields to 32 bits (`max_tokens: 10**12` became
"got -727379968"), so clients that rely on the official APIs' errors are answered here, before the request is
routed. Only what the official APIs also refuse is refused, and nothing they accept: fields this module does not
know (Claude Code's `thinking`, `context_management`, `output_config`, `cache_control`, llama.cpp's own
extensions) pass untouched, and `max_tokens` above the model's context is allowed (Claude Code asks for 32000
whatever the model; generation simply ends when the context is full).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Flavor = Literal["openai", "anthropic"]

MAX_MODEL_NAME = 256  # catalog names are < 64 characters; a longer `model` is not a name
MAX_TOKENS_LIMIT = 2**31 - 1  # llama-server keeps n_predict in an int32; beyond it the value wraps around
MAX_N = 16  # choices per request (llama-server also caps it at its slots)
MAX_STOP = 16  # stop sequences; each is searched for after every token
MAX_STOP_CHARS = 1024
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Anthropic's API takes user and assistant turns; "system" too, because Claude Code sends a system message in the
# middle of a conversation and llama-server handles it.
ANTHROPIC_ROLES = ("user", "assistant", "system")


@dataclass(frozen=True)
class ModelFacts:
    """What the servers of the requested model have said about it; None: not known (yet)."""

    name: str
    context: int | None = None  # tokens one request may hold (prompt + answer)
    tools: bool | None = None  # its chat template can call tools


@dataclass(frozen=True)
class Rejection:
    status: int
    message: str
    param: str | None = None
    code: str | None = None


def check_model_field(payload: dict[str, Any]) -> Rejection | None:
    """The `model` field alone (needed before routing): absent, or a string of a sensible length."""
    model = payload.get("model")
    if model is None:
        return None
    if not isinstance(model, str):
        return Rejection(400, "'model' must be a string: a name from /v1/models", "model")
    if len(model) > MAX_MODEL_NAME:
        return Rejection(400, f"'model' must be a name from /v1/models (at most {MAX_MODEL_NAME} characters)", "model")
    return None


def check_request(payload: dict[str, Any], flavor: Flavor, path: str, model: ModelFacts) -> Rejection | None:
    """The first thing wrong with a request for `model` on `path`, or None when it may go to llama-server."""
    checks = _CHECKS.get(path.removeprefix("/v1"))
    if checks is None:
        return None
    for check in checks:
        if (rejection := check(payload, flavor, model)) is not None:
            return rejection
    return None


# ---------------------------------------------------------------------------------------------
# Field checks; each returns the rejection or None. An absent or null optional field is fine.

_Check = Callable[[dict[str, Any], Flavor, ModelFacts], Rejection | None]


def _bad(param: str, message: str) -> Rejection:
    return Rejection(400, message, param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _messages(payload: dict[str, Any], flavor: Flavor, model: ModelFacts) -> Rejection | None:
    messages = payload.get("messages")
    if messages is None:
        return _bad("messages", "'messages' is required: a list of at least one message")
    if not isinstance(messages, list):
        return _bad("messages", "'messages' must be a list of messages")
    if not messages:
        return _bad("messages", "'messages' must contain at least one message")
    roles = ANTHROPIC_ROLES if flavor == "anthropic" else OPENAI_ROLES
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return _bad(f"messages[{i}]", f"messages[{i}] must be an object with a 'role' and a 'content'")
        role = message.get("role")
        if role not in roles:
            allowed = ", ".join(r for r in roles if r != "system") if flavor == "anthropic" else ", ".join(roles)
            return _bad(f"messages[{i}].role", f"messages[{i}].role must be one of {allowed}; got {_shown(role)}")
    return None


def _range(name: str, low: float, high: float) -> _Check:
    def check(payload: dict[str, Any], flavor: Flavor, model: ModelFacts) -> Rejection | None:
        value = payload.get(name)
        if value is None or (_is_number(value) and low <= value <= high):
            return None
        return _bad(name, f"{name} must be a number between {low:g} and {high:g}; got {_shown(value)}")

    return check


def _temperature(payload: dict[str, Any], flavor: Flavor, model: ModelFacts) -> Rejection | None:
    return _range("temperature", 0, 1 if flavor == "anthropic" else 2)(payload, flavor, model)


def _max_tokens(*names: str, required: bool = False) -> _Check:
    def check(payload: dict[str, Any], flavor: Flavor, model: ModelFacts) -> Rejection | None:
        for name in names:
            value = payload.get(name)
            if value is None:
                if required:
                    return _bad(name, f"'{name}' is required: the most tokens the answer may have (at least 1)")
                continue
            if _is_int(value) and 1 <= value <= MAX_TOKENS_LIMIT:
                continue
            context = (
                f" (the model's context holds {model.context} tokens, prompt included, so an answer ends there anyway)"
                if model.context
                else ""
            )
            return _bad(
                name, f"{name} must be a whole number between 1 and {MAX_TOKENS_LIMIT}; got {_shown(value)}" + context
            )
        return None

    return check


def _n(payload: dict[str, Any], flavor: Flavor, model: ModelFacts) -> Rejection | None:
    value = payload.get("n")
    if value is None or (_is_int(value) and 1 <= value <= MAX_N):
        return None
    return _bad("n", f"n (the number of choices) must be a whole number between 1 and {MAX_N}; got {_shown(value)}")


def _top_k(payload: dict[str, Any], flavor: Flavor, model: ModelFacts) -> Rejection | None:
    value = payload.get("top_k")
    if value is None or (_is_int(value) and value >= 0):
        return None
    return _bad("top_k", f"top_k must be a whole number, 0 or more; got {_shown(value)}")


def _stop(name: str) -> _Check:
    def check(payload: dict[str, Any], flavor: Flavor, model: ModelFacts) -> Rejection | None:
        value = payload.get(name)
        if value is None:
            return None
        items = [value] if isinstance(value, str) and name == "stop" else value
        what = f"{name} must be a list of at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters"
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            return _bad(name, f"{what}; got {_shown(value)}")
        if len(items) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in items):
            return _bad(name, f"{what}; got {len(items)}, the longest of {max(map(len, items))} characters")
        return None

    return check


def _stream(payload: dict[str, Any], flavor: Flavor, model: ModelFacts) -> Rejection | None:
    value = payload.get("stream")
    if value is None or isinstance(value, bool):
        return None
    return _bad("stream", f"stream must be true or false; got {_shown(value)}")


def _forced_tool(choice: Any, flavor: Flavor) -> bool:
    """Whether `tool_choice` makes the model call a tool (rather than let it choose, or forbid it)."""
    if flavor == "anthropic":
        return isinstance(choice, dict) and choice.get("type") in ("tool", "any")
    if isinstance(choice, str):
        return choice == "required"
    return isinstance(choice, dict) and choice.get("type") not in (None, "auto", "none")


def _tool_choice(payload: dict[str, Any], flavor: Flavor, model: ModelFacts) -> Rejection | None:
    if model.tools is not False or not _forced_tool(payload.get("tool_choice"), flavor):
        return None
    return _bad(
        "tool_choice",
        f"model '{model.name}' cannot call tools (its chat template has no tool calls), so tool_choice cannot "
        "force a tool call; leave tool_choice out or set it to auto, or pick a model whose capabilities.tools is "
        "true in /v1/models",
    )


_SAMPLING: tuple[_Check, ...] = (_temperature, _range("top_p", 0, 1), _stream)
_CHECKS: dict[str, tuple[_Check, ...]] = {
    "/chat/completions": (
        _messages,
        *_SAMPLING,
        _max_tokens("max_tokens", "max_completion_tokens"),
        _n,
        _stop("stop"),
        _tool_choice,
    ),
    "/completions": (*_SAMPLING, _max_tokens("max_tokens"), _n, _stop("stop")),
    "/responses": (*_SAMPLING, _max_tokens("max_output_tokens"), _tool_choice),
    "/messages": (
        _messages,
        _max_tokens("max_tokens", required=True),
        *_SAMPLING,
        _top_k,
        _stop("stop_sequences"),
        _tool_choice,
    ),
    "/messages/count_tokens": (_messages,),
}

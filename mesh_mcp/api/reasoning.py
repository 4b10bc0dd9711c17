"""Reasoning ("thinking") controls: every way a client asks a model to think, or not, read into one decision and
written the way llama-server reads it. Pure: a parsed request body in, a decision or a `Rejection` out.

Thinking models (Qwen3, GLM-4.x, DeepSeek-R1 distills, gpt-oss) think by default; through an agent that is pages of
reasoning before a one-word answer. So every llama-server of the mesh runs with `--reasoning-format deepseek`
(thinking parsed out of `content` into `reasoning_content`, Anthropic `thinking` blocks, Responses `reasoning`
items), `--reasoning off` (a template with a thinking switch renders it off) and `--reasoning-budget 0` (a model
that thinks whatever its template says is made to end its thinking at once): `inference.llama_server.REASONING_ARGS`.
A request turns thinking on with any of these fields; a later one in this list overrides an earlier one (the reference
implementation's order, so the same request means the same thing on both):

1. `reasoning: {enabled, effort, max_tokens}` (OpenRouter's shape; the Responses API's `reasoning.effort`):
   `enabled: false`, `effort: "none"` or `max_tokens: 0` turn it off, any other of them on;
2. `reasoning_effort` (OpenAI): `"none"` off; `minimal`, `low`, `medium`, `high`, `xhigh`, `max` on;
3. `thinking: {type, budget_tokens}` (Anthropic's; accepted on every path): `enabled` and `adaptive` on,
   `disabled` off;
4. a top-level boolean `enable_thinking` (or one of its aliases, `THINKING_ALIASES`);
5. `thinking_budget`, `reasoning_budget_tokens` or `thinking_budget_tokens`: 0 turns it off;
6. `chat_template_kwargs.enable_thinking` (or an alias there): the template's own switch, the last word.

The budget, in tokens of thinking, is the last of `reasoning.max_tokens`, `thinking.budget_tokens` and the three
budget fields that a request gives; none means unlimited. llama.cpp honours it where the template has thinking end
tags: when it runs out, the end tag is forced and the answer follows.

Written for llama-server (`apply`): `chat_template_kwargs.enable_thinking` always; on the OpenAI paths
`reasoning_budget_tokens` (the budget, `UNLIMITED` when none, 0 when off) and, when on, no effort `"none"` (which
llama-server would read after the switch); on `/v1/messages` (whose Anthropic
reader passes only `chat_template_kwargs` and `thinking` on) `thinking: {type: "enabled", budget_tokens}` when on
and no `thinking` when off. `apply` is idempotent: a request a peer already wrote reads the same. A request that
says nothing is not rewritten: the servers' flags already mean "off".
Raw `/v1/completions` and `/v1/embeddings` have no chat template: nothing is read or written there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh_mcp.api.checks import Rejection

UNLIMITED = 2**31 - 1  # llama.cpp's budget is an int32; a negative budget would mean "the server's default" (0)
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
THINKING_TYPES = ("enabled", "adaptive", "disabled")
# Boolean names clients use for the switch (the reference implementation's list)
THINKING_ALIASES = (
    "enable_thinking",
    "enableThinking",
    "enable_reasoning",
    "use_reasoning",
    "reasoning_enabled",
    "use_thinking",
    "thinking_enabled",
    "enable_think",
    "think_enabled",
)
BUDGET_FIELDS = ("thinking_budget", "reasoning_budget_tokens", "thinking_budget_tokens")
_WRITTEN = ("chat_template_kwargs", "thinking", "reasoning_budget_tokens", "reasoning_effort", "reasoning")
_CHAT_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/messages")


@dataclass(frozen=True)
class Thinking:
    """What a request asked: think or not, and at most how many tokens (None: no limit)."""

    on: bool = False
    budget: int | None = None
    asked: bool = False  # the request said something (else `on` is the default, off)


def applies(path: str) -> bool:
    """Whether requests on `path` go through a chat template (and so can think)."""
    return path in _CHAT_PATHS


def _bad(param: str, message: str) -> Rejection:
    return Rejection(400, message, param)


def _budget(value: object, param: str) -> int | Rejection | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return _bad(param, f"'{param}' must be a non-negative integer (tokens of thinking)")
    return min(value, UNLIMITED)


def _switch(value: object, param: str) -> bool | Rejection | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        return _bad(param, f"'{param}' must be a boolean")
    return value


class _Reading:
    """The decision as the fields are read, in order."""

    def __init__(self) -> None:
        self.on: bool | None = None
        self.budget: int | None = None

    def turn(self, on: bool | None) -> None:
        if on is not None:
            self.on = on

    def result(self) -> Thinking:
        return Thinking(on=bool(self.on), budget=self.budget, asked=self.on is not None or self.budget is not None)


def _read_reasoning(value: object, r: _Reading) -> Rejection | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        return _bad("reasoning", "'reasoning' must be an object: {enabled, effort, max_tokens}")
    enabled = _switch(value.get("enabled"), "reasoning.enabled")
    effort = value.get("effort")
    if effort is not None and effort not in EFFORTS:
        return _bad("reasoning.effort", f"'reasoning.effort' must be one of {', '.join(EFFORTS)}")
    budget = _budget(value.get("max_tokens"), "reasoning.max_tokens")
    for got in (enabled, budget):
        if isinstance(got, Rejection):
            return got
    if enabled is False or effort == "none" or budget == 0:
        r.turn(False)
    elif enabled is True or effort is not None or budget is not None:
        r.turn(True)
    if isinstance(budget, int):
        r.budget = budget
    return None


def _read_thinking(value: object, r: _Reading) -> Rejection | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in THINKING_TYPES:
        return _bad("thinking", f"'thinking' must be an object whose type is one of {', '.join(THINKING_TYPES)}")
    budget = _budget(value.get("budget_tokens"), "thinking.budget_tokens")
    if isinstance(budget, Rejection):
        return budget
    r.turn(value["type"] != "disabled")
    if budget is not None:
        r.budget = budget
    return None


def read(payload: dict[str, Any], path: str) -> Thinking | Rejection:
    """What the request on `path` asks about thinking (the module's order), or why it cannot be read."""
    if not applies(path):
        return Thinking()
    r = _Reading()
    if (bad := _read_reasoning(payload.get("reasoning"), r)) is not None:
        return bad
    effort = payload.get("reasoning_effort")
    if effort is not None:
        if effort not in EFFORTS:
            return _bad("reasoning_effort", f"'reasoning_effort' must be one of {', '.join(EFFORTS)}")
        r.turn(effort != "none")
    if (bad := _read_thinking(payload.get("thinking"), r)) is not None:
        return bad
    for name in THINKING_ALIASES:
        got = _switch(payload.get(name), name)
        if isinstance(got, Rejection):
            return got
        r.turn(got)
    for name in BUDGET_FIELDS:
        budget = _budget(payload.get(name), name)
        if isinstance(budget, Rejection):
            return budget
        if budget is not None:
            r.budget = budget
            if budget == 0:
                r.turn(False)
    kwargs = payload.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            return _bad("chat_template_kwargs", "'chat_template_kwargs' must be an object")
        for name in THINKING_ALIASES:
            got = _switch(kwargs.get(name), f"chat_template_kwargs.{name}")
            if isinstance(got, Rejection):
                return got
            r.turn(got)
    return r.result()


def apply(payload: dict[str, Any], path: str, thinking: Thinking) -> bool:
    """Write `thinking` into `payload` (in place) as llama-server reads it on `path`; whether anything changed."""
    if not applies(path):
        return False
    before = _written(payload)
    kwargs = payload.get("chat_template_kwargs")
    kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
    for name in THINKING_ALIASES[1:]:
        kwargs.pop(name, None)  # one switch, so that no alias contradicts it
    kwargs["enable_thinking"] = thinking.on
    payload["chat_template_kwargs"] = kwargs
    if thinking.on:  # llama-server reads an effort of "none" after the switch: it must not undo the decision
        if payload.get("reasoning_effort") == "none":
            del payload["reasoning_effort"]
        asked = payload.get("reasoning")
        if isinstance(asked, dict) and asked.get("effort") == "none":
            payload["reasoning"] = {k: v for k, v in asked.items() if k != "effort"}
    budget = (UNLIMITED if thinking.budget is None else thinking.budget) if thinking.on else 0
    if path == "/v1/messages":
        if thinking.on:
            payload["thinking"] = {"type": "enabled", "budget_tokens": budget}
        else:
            payload.pop("thinking", None)
    else:
        payload["reasoning_budget_tokens"] = budget
    return _written(payload) != before


def _written(payload: dict[str, Any]) -> str:
    return repr([payload.get(k) for k in _WRITTEN])

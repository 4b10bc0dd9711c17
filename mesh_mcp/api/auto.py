"""`model: "auto"`: which served model of the mesh answers a request that names none. Pure: no I/O.

A request whose `model` is `"auto"` (any case), empty or absent is answered by a model chosen per request among
the models with at least one *serving* server (this node's or, through gossip, another node's), by this rule —
each step only breaks the ties of the one before:

1. what the request is for: `/v1/embeddings` prefers models known to embed, every other path models not known to;
2. tools: a request with a non-empty `tools` (or legacy `functions`) list prefers models whose servers say their
   chat template can call tools (`tools: true`);
   thinking: a request that turns thinking on (api/reasoning.py) prefers thinking models (`reasoning: true`);
3. context: it prefers models whose context (the least any server gives; 0, not known, counts as holding) holds
   the request's estimate — bytes of the request body / 3 (a conservative bytes-per-token) + its max output tokens;
4. strength: the largest GGUF in bytes (a proxy for quality), then the fastest measured decode tok/s;
5. load: the fewest requests in flight per serving server;
6. name, so the choice is deterministic.

The proxy then forwards the request with `model` set to the chosen name (llama-server and the response say the real
model), names it in `x-mesh-model`, and counts the request as demand for it like any request. `"auto"` is reserved:
a model served under that name is reachable only as the pseudo-model. With no serving model at all the request gets
the same 503 (a model is loading) or 404 (none served) as a named model the mesh does not serve.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

from mesh_mcp.api.directory import RemoteModel
from mesh_mcp.state import SERVING, ModelStatus

AUTO = "auto"
# Models one choice looks at: far past any real mesh (members and models per record are bounded by gossip), so
# that a hostile or broken directory costs a bounded pass. Models past it are not considered.
MAX_CANDIDATES = 4096
BYTES_PER_TOKEN = 3  # English averages about 4 bytes per token; 3 over-estimates, so a tight context is avoided
MAX_TOKENS = 1 << 30  # a max output token count past this is treated as this (no context holds more)
DESCRIPTION = (
    "picks a serving model per request: tool-capable when the request has tools, a thinking model when it asks "
    "for thinking, a context that holds the "
    "request, then the largest (then fastest), then the least loaded; the response's model and x-mesh-model name it"
)


@dataclass(frozen=True)
class RequestFacts:
    """What a request needs of the model that answers it."""

    tools: bool = False  # it carries tool definitions
    tokens: int = 0  # estimated prompt + answer tokens
    embeddings: bool = False  # it asks for embeddings, not generation
    thinking: bool = False  # it turns thinking on


@dataclass(frozen=True)
class ModelCandidate:
    """One model as its serving servers describe it (their facts merged: `merge`)."""

    name: str
    servers: int  # serving servers; a model with none is never chosen
    in_flight: int = 0  # requests in flight over all its servers
    tools: bool | None = None  # its chat template can call tools; None: not known
    ctx: int = 0  # tokens one request may hold (the least any server gives); 0: not known
    size_bytes: int = 0  # its GGUF size; 0: not known
    tok_s: float = 0.0  # measured decode tokens/s; 0: not measured
    embeddings: bool | None = None  # an embedding model; None: not known
    thinking: bool | None = None  # a thinking model; None: not known


def is_auto(requested: object) -> bool:
    """The request leaves the model to the mesh: `"auto"` (any case), an empty name or none."""
    return requested is None or (isinstance(requested, str) and (not requested or requested.lower() == AUTO))


def _count(value: object) -> int:
    """A non-negative int from JSON (bools and other types: 0), at most `MAX_TOKENS`."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return min(max(value, 0), MAX_TOKENS)


def request_facts(payload: Mapping[str, Any], body_bytes: int, path: str, thinking: bool = False) -> RequestFacts:
    """What `payload` (the parsed body of `body_bytes` bytes, posted to `path`; `thinking`: it turns thinking on)
    needs of its model."""
    tools = any(isinstance(payload.get(k), list) and payload[k] for k in ("tools", "functions"))
    answer = next(
        (n for k in ("max_tokens", "max_completion_tokens", "max_output_tokens") if (n := _count(payload.get(k)))), 0
    )
    prompt = min(max(body_bytes, 0), MAX_TOKENS) // BYTES_PER_TOKEN
    return RequestFacts(tools=tools, tokens=prompt + answer, embeddings=path.endswith("/embeddings"), thinking=thinking)


def _number(value: float) -> float:
    return value if isinstance(value, int | float) and math.isfinite(value) and value > 0 else 0.0


def _key(want: RequestFacts, c: ModelCandidate) -> tuple[bool, bool, bool, bool, int, float, float, str]:
    """Sort key of the rule (the module's docstring), best first."""
    ctx = max(c.ctx, 0)
    return (
        (c.embeddings is not True) if want.embeddings else (c.embeddings is True),
        want.tools and c.tools is not True,
        want.thinking and c.thinking is not True,
        ctx != 0 and ctx < want.tokens,
        -max(c.size_bytes, 0),
        -_number(c.tok_s),
        max(c.in_flight, 0) / c.servers,
        c.name,
    )


def choose_auto(want: RequestFacts, candidates: Iterable[ModelCandidate], limit: int = MAX_CANDIDATES) -> str | None:
    """The model that answers a request needing `want` (the module's rule); None when no candidate serves. At most
    the first `limit` candidates are looked at."""
    serving = (c for c in islice(candidates, max(limit, 0)) if c.servers > 0 and c.name)
    best = min(serving, key=lambda c: _key(want, c), default=None)
    return best.name if best is not None else None


@dataclass(frozen=True)
class _Server:
    """One serving server of a model, as `merge` reads it."""

    in_flight: int
    tools: bool | None
    ctx: int
    size_bytes: int
    tok_s: float
    embeddings: bool | None
    thinking: bool | None = None


def merge(
    local: Iterable[ModelStatus], remote: Iterable[RemoteModel], limit: int = MAX_CANDIDATES
) -> list[ModelCandidate]:
    """The candidates of the mesh: each model with its serving servers' facts merged — tools (and thinking) true if
    any server says so (false only if one says so and none otherwise), the least known context, the largest known
    size, the mean measured tok/s. A local model serves once it has an upstream. At most `limit` models."""
    servers: dict[str, list[_Server]] = {}

    def add(name: str, server: _Server) -> None:
        if is_auto(name):  # a model served as "auto" is never a choice: `auto` would name itself
            return
        if name in servers or len(servers) < limit:
            servers.setdefault(name, []).append(server)

    for m in local:
        if m.state == SERVING and m.upstream is not None:
            facts = (m.context or 0, m.size_bytes or 0, m.measured_tok_s or 0.0, m.embeddings, m.thinking)
            add(m.name, _Server(m.in_flight, m.tools, *facts))
    for r in remote:
        if r.state == SERVING:  # a remote record does not say whether it embeds
            add(r.name, _Server(r.in_flight, r.tools, r.ctx, r.size_bytes, r.tok_s, None, r.thinking))
    out = []
    for name, rows in servers.items():
        said = [s.tools for s in rows if s.tools is not None]
        contexts = [s.ctx for s in rows if s.ctx > 0]
        speeds = [v for s in rows if (v := _number(s.tok_s))]
        embeds = [s.embeddings for s in rows if s.embeddings is not None]
        thinks = [s.thinking for s in rows if s.thinking is not None]
        out.append(
            ModelCandidate(
                name=name,
                servers=len(rows),
                in_flight=sum(max(s.in_flight, 0) for s in rows),
                tools=any(said) if said else None,
                ctx=min(contexts) if contexts else 0,
                size_bytes=max(max(s.size_bytes for s in rows), 0),
                tok_s=sum(speeds) / len(speeds) if speeds else 0.0,
                embeddings=any(embeds) if embeds else None,
                thinking=any(thinks) if thinks else None,
            )
        )
    return out

"""Choosing the server for a request: pure functions over what gossip says is served where.

- Requests of one session (the OpenAI `user` field, Anthropic `metadata.user_id`, or a hash of the
  conversation's first messages) go to the same server while it is up, so its KV cache is reused:
  rendezvous hashing keeps that stable as servers come and go, moving only the sessions of a
  server that left.
- Requests without a session go to the server with the fewest requests in flight; ties prefer
  this node (no network hop), then the node id, so the choice is deterministic.
- `ranked` gives the fallback order: if the first choice fails before sending anything, the
  caller tries the next.
- Which *model*: the one the request names (`match_model`: exact, case-insensitive, unique prefix). A request
  naming `"auto"`, or no model, gets one chosen per request among the models serving (`api/auto.py`'s rule:
  tool-capable when it has tools, a context that holds it, then the largest, fastest, least loaded, by name);
  the servers of that model are then ranked as above.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Candidate:
    node_id: str
    in_flight: int
    local: bool = False


def session_key(payload: Mapping[str, Any]) -> str | None:
    """The session a request belongs to, or None when it carries nothing to tell."""
    user = payload.get("user")
    if isinstance(user, str) and user:
        return "user:" + user
    meta = payload.get("metadata")
    if isinstance(meta, Mapping) and isinstance(meta.get("user_id"), str) and meta["user_id"]:
        return "user:" + meta["user_id"]
    head: list[Any] = []
    if isinstance(payload.get("system"), str | list):
        head.append(payload["system"])
    messages = payload.get("messages")
    if isinstance(messages, list) and messages:
        # The system prompt and the first user turn identify a conversation as it grows.
        for m in messages:
            head.append(m)
            if not isinstance(m, Mapping) or m.get("role") not in ("system", "developer"):
                break
    elif isinstance(payload.get("prompt"), str):
        head.append(payload["prompt"][:512])
    if not head:
        return None
    digest = hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode()).hexdigest()
    return "conv:" + digest[:32]


def _score(session: str, node_id: str) -> bytes:
    return hashlib.sha256(f"{session}|{node_id}".encode()).digest()


def ranked(candidates: Iterable[Candidate], session: str | None) -> list[Candidate]:
    """Every candidate, best first."""
    pool = list(candidates)
    if session is not None:
        return sorted(pool, key=lambda c: _score(session, c.node_id), reverse=True)
    return sorted(pool, key=lambda c: (c.in_flight, not c.local, c.node_id))


def match_model(requested: str | None, names: list[str]) -> str | None:
    """The model a request names: exact id, then case-insensitive, then a unique prefix.

    No name at all means the first model (like llama-server)."""
    if not names:
        return None
    if not requested:
        return names[0]
    if requested in names:
        return requested
    low = requested.lower()
    for name in names:
        if name.lower() == low:
            return name
    prefixed = [n for n in names if n.lower().startswith(low)]
    return prefixed[0] if len(prefixed) == 1 else None

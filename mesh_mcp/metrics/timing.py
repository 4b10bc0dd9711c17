"""Per-hop timing of one API request, in the forms a client reads: the standard `Server-Timing` header and the
`mesh_timing` object added to a stream's final event (where the header was sent before the timing was known).

Pure: durations in, header values and dicts out; and the other way, what a peer sent, parsed within bounds.

The names, each a duration in milliseconds:
    route     the entry node's routing: reading and checking the request, choosing a server
    hop       the tunnel to the serving node and back: the entry's wait for the head less the peer's `serve`
    serve     (between nodes only) the serving node's time from the request's body to the response head
    upstream  the serving node's wait for its llama-server's response head (for a non-streamed answer: all of it)
    queue     the serving node's estimate of the wait in llama-server's queue: the time to the first token (or the
              whole answer) less llama-server's own prompt and decode times
    prompt    llama-server's prompt processing (`timings.prompt_ms`)
    ttft      (streams, final event only) the time to the first event, as this node saw it

A peer's values are not trusted blindly: only these names are read, from a bounded header, and each is clamped
to what the entry node itself waited (`clamp`): nothing a peer did for this request took longer than that.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

SERVER_TIMING = b"server-timing"
MESH_PATH = b"x-mesh-path"  # response header: the nodes that served the request, entry first
NAMES = ("route", "hop", "serve", "upstream", "queue", "prompt", "ttft")
MAX_HEADER_BYTES = 1024  # a peer's Server-Timing header read at most; ours is ~100 bytes
MAX_ENTRIES = 16  # entries of a peer's header looked at
MAX_PATH = 8  # nodes named in a path (a request crosses two today: entry, server)
MAX_MS = 24 * 3600 * 1000.0  # a duration past a day is a broken clock, not a measurement
_NODE_ID = re.compile(r"^[0-9a-f]{16}$")
_DUR = re.compile(r"^\s*dur\s*=\s*([0-9]+(?:\.[0-9]+)?)\s*$")

Timing = dict[str, float]  # name (one of NAMES) -> milliseconds


def clamp(timing: Mapping[str, object], most_ms: float) -> Timing:
    """The known names of `timing` whose values are finite numbers, each within [0, `most_ms`]."""
    out: Timing = {}
    bound = max(0.0, min(most_ms, MAX_MS))
    for name in NAMES:
        value = timing.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out[name] = round(min(max(float(value), 0.0), bound), 1)
    return out


def header_value(timing: Mapping[str, float]) -> bytes:
    """`route;dur=0.4, hop;dur=2.1, ...` in `NAMES` order (unknown names and bad values dropped)."""
    fine = clamp(timing, MAX_MS)
    return ", ".join(f"{name};dur={fine[name]:.1f}" for name in NAMES if name in fine).encode()


def parse_header(values: Iterable[bytes]) -> Timing:
    """The known names of one or more Server-Timing header values (a peer's), within `MAX_HEADER_BYTES` in all and
    `MAX_ENTRIES` entries; what is malformed is skipped. Not yet clamped: see `clamp`."""
    found: dict[str, object] = {}
    budget, entries = MAX_HEADER_BYTES, 0
    for raw in values:
        text = raw[:budget].decode("latin-1")
        budget -= len(raw)
        for entry in text.split(","):
            entries += 1
            if entries > MAX_ENTRIES:
                return clamp(found, MAX_MS)
            name, *params = entry.strip().split(";")
            if name not in NAMES or name in found:
                continue
            for param in params:
                if m := _DUR.match(param):
                    found[name] = float(m.group(1))
                    break
        if budget <= 0:
            break
    return clamp(found, MAX_MS)


def path_value(path: Iterable[str]) -> bytes:
    return ",".join(path).encode()


def event_object(timing: Mapping[str, float], path: Iterable[str]) -> dict[str, Any]:
    """The `mesh_timing` object of a stream's final event: `{"route_ms": ..., ..., "path": [entry, server]}`."""
    fine = clamp(timing, MAX_MS)
    out: dict[str, Any] = {f"{name}_ms": fine[name] for name in NAMES if name in fine}
    out["path"] = [n for n in path if _NODE_ID.match(n)][:MAX_PATH]
    return out


def parse_event_object(value: object) -> Timing:
    """A peer's `mesh_timing` object as a `Timing` (its `path` is ignored: the entry node knows whom it asked).
    Not yet clamped: see `clamp`."""
    if not isinstance(value, dict) or len(value) > MAX_ENTRIES:
        return {}
    return clamp({name: value.get(f"{name}_ms") for name in NAMES}, MAX_MS)

"""One API request as the proxy sees it, from the request in to the last byte out: the times it passes each point
(routed, server asked, head, first and later events), what the response said of itself (`sse`), what the serving
peer said of its own part (`timing`), and, once closed, the request counted in the node's `NodeMetrics`.

No I/O: the proxy calls these at clear points (`routed`, `opening`, `answered`, `body` or `feed`/`flush`,
`finish`/`failed`, `close`) and sends what `headers` and `feed` return. The clock is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from mesh_mcp.metrics import timing
from mesh_mcp.metrics.families import ITL_EVENTS_PER_CHUNK, OTHER, NodeMetrics, Result, Route
from mesh_mcp.metrics.sse import Tap, Usage

Headers = list[tuple[bytes, bytes]]


def result_of(status: int) -> Result:
    return "ok" if status < 400 else "client_error" if status < 500 else "upstream_error"


class Trace:
    """See the module docstring. `node_id` is this node."""

    def __init__(self, metrics: NodeMetrics, node_id: str, clock: Callable[[], float] = time.perf_counter) -> None:
        self.metrics, self.node_id, self.clock = metrics, node_id, clock
        self.t0 = clock()
        self.model = OTHER
        self.route: Route = "none"
        self.result: Result | None = None
        self.served_by: str | None = None
        self.usage = Usage()
        self.peer: timing.Timing = {}  # what the serving peer said of its part (not yet clamped)
        self.t_routed: float | None = None
        self.t_open: float | None = None
        self.t_head: float | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None
        self._tap: Tap | None = None
        self._fed_at: float | None = None  # the last chunk of a stream fed, while its final event is stamped
        self._closed = False
        self._own_failed = False  # this node's own server failed it (counted once, as its error)

    # --- the points the proxy passes -------------------------------------------------------------------

    def routed(self, model: str, tunnelled: bool) -> None:
        """Routing chose `model`'s servers (`tunnelled`: for a peer's client): the request is in flight from here."""
        self.t_routed = self.clock()
        self.model = self.metrics.model_label(model)
        self._move("tunnelled" if tunnelled else "local")

    def opening(self) -> None:
        """A server is about to be asked."""
        self.t_open = self.clock()

    def skipped(self) -> None:
        """The server asked failed before answering; the next one will be."""
        self.metrics.failover(self.model, "before_answer")

    def server_failed(self, node_id: str) -> None:
        """`node_id`'s server failed this request: it could not be reached, or it broke off mid-answer (the request
        may go on elsewhere). An error of that server: counted here when it is this node's own (a peer counts its
        own), once, whatever serves the rest."""
        if node_id == self.node_id and not self._own_failed:
            self._own_failed = True
            self.metrics.served_here(self.model, "upstream_error")

    def answered(self, node_id: str, headers: Iterable[tuple[bytes, bytes]]) -> Headers:
        """The response head of `node_id`'s server arrived; its headers less the timing ones (this node
        re-derives them: `headers`)."""
        self.t_head = self.clock()
        self.served_by = node_id
        given = list(headers)
        if node_id != self.node_id:
            self._move("remote")
            self.peer = timing.parse_header(v for k, v in given if k == timing.SERVER_TIMING)
        return [(k, v) for k, v in given if k not in (timing.SERVER_TIMING, timing.MESH_PATH)]

    def body(self, raw: bytes) -> None:
        """A whole (not streamed) body, or its first bytes."""
        self.t_last = self.clock()
        self.usage.read_body(raw)

    def feed(self, chunk: bytes) -> bytes:
        """A chunk of a stream on its way to the client: what to send instead (see `sse.Tap`)."""
        if self._tap is None:
            self._tap = Tap(self._stamp)
            self._tap.usage = self.usage
        now = self._fed_at = self.clock()
        out = self._tap.feed(chunk)
        events = min(self._tap.new_events, ITL_EVENTS_PER_CHUNK)
        if events:
            if self.t_first is None:
                self.t_first = now
                events -= 1
            if events and self.t_last is not None:
                child = self.metrics.itl.labels(self.model, self.route)
                for _ in range(events):
                    child.observe((now - self.t_last) / events)
            self.t_last = now
        return out

    def flush(self) -> bytes:
        return self._tap.flush() if self._tap is not None else b""

    def finish(self, result: Result) -> None:
        self.result = result

    def failed(self, status: int) -> None:
        self.result = result_of(status)

    def close(self) -> None:
        """Count the request (once): a request that never finished was cancelled (its client went away)."""
        if self._closed:
            return
        self._closed = True
        result = self.result or "cancelled"
        m, labels = self.metrics, (self.model, self.route)
        m.requests.labels(*labels, result).inc()
        if self.served_by == self.node_id and not self._own_failed:  # this node's own llama-server answered it
            m.served_here(self.model, result)
        if self.route != "none":
            m.in_flight.labels(*labels).dec()
        if self.t_first is not None:
            m.ttft.labels(*labels).observe(self.t_first - self.t0)
        if result == "ok":
            if (n := self.usage.prompt_tokens) is not None:
                m.tokens_in.labels(*labels).inc(n)
            if (n := self.usage.completion_tokens) is not None:
                m.tokens_out.labels(*labels).inc(n)
            if self.route != "remote" and (queue := self._queue_ms()) is not None:
                m.queue_wait.labels(self.model).observe(queue / 1000)

    # --- what the client is told -----------------------------------------------------------------------

    def path(self) -> list[str]:
        """The nodes that served the request: this one, then the peer it went to."""
        return [self.node_id] + ([self.served_by] if self.served_by and self.served_by != self.node_id else [])

    def timings(self) -> timing.Timing:
        """Per-hop durations in ms, what is known so far (`timing` names them)."""
        now = self.clock()
        out: timing.Timing = {}
        if self.t_routed is not None:
            out["route"] = 1e3 * (self.t_routed - self.t0)
        if self.t_open is not None and self.t_head is not None:
            waited = 1e3 * (self.t_head - self.t_open)
            if self.route == "remote":
                peer = timing.clamp(self.peer, 1e3 * (now - self.t_open))
                if "serve" in peer:
                    out["hop"] = max(0.0, waited - peer["serve"])
                out.update({k: v for k, v in peer.items() if k in ("upstream", "queue", "prompt")})
            else:
                out["upstream"] = waited
                if (queue := self._queue_ms()) is not None:
                    out["queue"] = queue
        if (prompt := self.usage.prompt_ms) is not None and self.t_open is not None:
            # llama-server's own number: this node's is trusted, a peer's bounded like the rest of what it says
            out["prompt"] = prompt if self.route != "remote" else min(prompt, 1e3 * (now - self.t_open))
        first = self.t_first if self.t_first is not None else self._fed_at
        if first is not None:
            out["ttft"] = 1e3 * (first - self.t0)
        return timing.clamp(out, timing.MAX_MS)

    def headers(self) -> Headers:
        """`Server-Timing` and `x-mesh-path` for the response head."""
        value = timing.header_value(self.timings())
        return [(timing.SERVER_TIMING, value), (timing.MESH_PATH, timing.path_value(self.path()))]

    # --- inside ------------------------------------------------------------------------------------------

    def _stamp(self, given: object) -> dict[str, Any]:
        """The final event's `mesh_timing`: a peer's (`given`) merged in, then this node's view of it."""
        if self.route == "remote":
            self.peer.update(timing.parse_event_object(given))
        return timing.event_object(self.timings(), self.path())

    def _queue_ms(self) -> float | None:
        """On the serving node: the time to the first token (a stream) or to the answer, less llama-server's own
        prompt processing and decoding of it; None without llama-server's timings."""
        u, start = self.usage, self.t_open
        if u.prompt_ms is None or start is None:
            return None
        if self.t_first is not None:
            decode = u.per_token_ms or 0.0
            return max(0.0, 1e3 * (self.t_first - start) - u.prompt_ms - decode)
        if self.t_head is not None and u.predicted_ms is not None:
            return max(0.0, 1e3 * (self.t_head - start) - u.prompt_ms - u.predicted_ms)
        return None

    def _move(self, route: Route) -> None:
        if self.route != "none":
            self.metrics.in_flight.labels(self.model, self.route).dec()
        self.route = route
        self.metrics.in_flight.labels(self.model, route).inc()

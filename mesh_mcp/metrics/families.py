"""The node's own metric families, updated as requests run, in a `CollectorRegistry` of the node's own (never
prometheus_client's global one: tests run many nodes in one process).

Per model and route (labels `model`, `route`):
    mesh_llm_requests_total{result}               ok | client_error | upstream_error | cancelled
    mesh_llm_requests_in_flight
    mesh_llm_time_to_first_token_seconds          streams: request in to first event out, as this node saw it
    mesh_llm_inter_token_latency_seconds          streams: between events (a chunk of n events counts n gaps)
    mesh_llm_prompt_tokens_total / mesh_llm_completion_tokens_total   usage of the answer (else llama's timings)
Per model:
    mesh_llm_queue_wait_seconds                   on the serving node only (see timing.py's `queue`)
    mesh_llm_failovers_total{stage}               a request went on on another server after its server failed:
                                                  `before_answer` (counted here) or `mid_stream` (a stream continued)

`route` is `local` (this node's llama-server served this node's client), `remote` (a peer served it),
`tunnelled` (this node served a peer's client) or `none` (refused before a server was chosen). A request crossing
two nodes is counted on both, once as `remote` and once as `tunnelled`: a mesh-wide sum leaves one of them out.

Besides the families, `served()` tallies per model the requests this node's own llama-server answered last (the
response head came from it: `Trace.close`), whichever node they entered by: ok, and errors (`client_error` or
`upstream_error`). The node's signed record carries them (`ServedModel.ok`/`err`, mesh/records.py) so every node's
`top` and console show each server's errors; `metrics_of(node)` gives the node's state the reader (`NodeState.served`),
so the mesh layer reads them without importing this module.

Label cardinality is bounded: a `model` label is only ever a name routing resolved (one the mesh serves, never one
a client made up), at most `MAX_MODEL_LABELS` of them; any other is `other`.
"""

from __future__ import annotations

import threading
import weakref
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Route = Literal["local", "remote", "tunnelled", "none"]
Result = Literal["ok", "client_error", "upstream_error", "cancelled"]
Stage = Literal["before_answer", "mid_stream"]
RESULTS: tuple[Result, ...] = ("ok", "client_error", "upstream_error", "cancelled")
OTHER = "other"
MAX_MODEL_LABELS = 64  # distinct model labels a node ever exports (a node serves a handful; a mesh lists dozens)
MAX_MODEL_NAME = 128  # characters of a model name in a label (gossip carries at most this many)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)
ITL_EVENTS_PER_CHUNK = 64  # a chunk holding more events than this counts this many gaps


class NodeMetrics:
    """One node's request metrics (see the module docstring). `metrics_of(node)` finds a node's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg, by_route = self.registry, ["model", "route"]
        self.requests = Counter(
            "mesh_llm_requests", "API requests answered, by model, route, result", [*by_route, "result"], registry=reg
        )
        self.in_flight = Gauge("mesh_llm_requests_in_flight", "API requests being answered", by_route, registry=reg)
        self.ttft = Histogram(
            "mesh_llm_time_to_first_token_seconds",
            "Streams: from the request to the first event sent, as this node saw it",
            by_route,
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.itl = Histogram(
            "mesh_llm_inter_token_latency_seconds",
            "Streams: time between events sent",
            by_route,
            buckets=ITL_BUCKETS,
            registry=reg,
        )
        self.tokens_in = Counter("mesh_llm_prompt_tokens", "Prompt tokens of answered requests", by_route, registry=reg)
        self.tokens_out = Counter(
            "mesh_llm_completion_tokens", "Generated tokens of answered requests", by_route, registry=reg
        )
        self.queue_wait = Histogram(
            "mesh_llm_queue_wait_seconds",
            "Serving node: estimated wait in llama-server's queue (time to first token less prompt and decode)",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=reg,
        )
        self.failovers = Counter(
            "mesh_llm_failovers",
            "Requests that went on on another server after theirs failed (before_answer | mid_stream)",
            ["model", "stage"],
            registry=reg,
        )
        self._models: set[str] = set()
        self._served: dict[str, tuple[int, int]] = {}  # model label -> (ok, errors) answered by this node's server
        self._lock = threading.Lock()

    def model_label(self, name: str | None) -> str:
        """`name` as a `model` label: a name routing resolved, while fewer than `MAX_MODEL_LABELS` are in use (or
        it is one of them); `other` for anything else."""
        if not name:
            return OTHER
        name = name[:MAX_MODEL_NAME]
        with self._lock:
            if name in self._models:
                return name
            if len(self._models) >= MAX_MODEL_LABELS:
                return OTHER
            self._models.add(name)
            return name

    def failover(self, model: str | None, stage: Stage) -> None:
        """A request of `model` went on on another server (`stage`: before it answered, or mid-stream)."""
        self.failovers.labels(self.model_label(model), stage).inc()

    def served_here(self, label: str, result: Result) -> None:
        """A request this node's own llama-server answered ended with `result` (`label`: a `model_label`)."""
        if result == "cancelled":
            return
        with self._lock:
            ok, err = self._served.get(label, (0, 0))
            self._served[label] = (ok + 1, err) if result == "ok" else (ok, err + 1)

    def served(self) -> dict[str, tuple[int, int]]:
        """Per model label: (ok, errors) of the requests this node's own llama-server answered since it started."""
        with self._lock:
            return dict(self._served)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per model label: requests by result, in flight and tokens out, summed over routes but `tunnelled` (so a
        request is counted once per node it entered): the data of a `top`-like view."""
        out: dict[str, dict[str, float]] = {}
        for metric in (*self.requests.collect(), *self.in_flight.collect(), *self.tokens_out.collect()):
            for sample in metric.samples:
                if sample.labels.get("route") == "tunnelled" or sample.name.endswith("_created"):
                    continue
                row = out.setdefault(sample.labels["model"], {})
                key = sample.labels.get("result") or ("in_flight" if metric.type == "gauge" else "tokens_out")
                row[key] = row.get(key, 0.0) + sample.value
        return out


_BY_NODE: dict[int, NodeMetrics] = {}


def metrics_of(node: object) -> NodeMetrics:
    """The `NodeMetrics` of one node (its `NodeState`), made on first use and forgotten with the node."""
    found = _BY_NODE.get(id(node))
    if found is None:
        found = _BY_NODE[id(node)] = NodeMetrics()
        weakref.finalize(node, _BY_NODE.pop, id(node), None)
        if hasattr(node, "served"):  # a NodeState: its record reads what its servers answered from here
            node.served = found.served
    return found

"""The node's metrics: `GET /metrics` on the console (Prometheus' text format) and per-hop timing on every API
response (`Server-Timing`, `x-mesh-path`, a stream's final `mesh_timing`).

    families   the request metrics the proxy updates (`NodeMetrics`, one per node: `metrics_of`)
    trace      one request's points and timings (`Trace`), counted into `NodeMetrics` when closed
    timing     Server-Timing and `mesh_timing`: formatted, and a peer's parsed within bounds
    sse        what a response says of itself (usage, llama-server's timings), the final event stamped
    live       families read from the node's state at scrape time (models, peers, traffic, blackboard), with the
               bytes of the data-plane relays it runs as a split's host (dataplane/relay.py `host_bytes`)
    llamacpp   llama-server's own /metrics folded in under a `model` label

`scrape` is the one entry point of the console's route: the node's registry and the live families, rendered by
prometheus_client's `generate_latest` (no hand-written exposition).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from mesh_mcp.dataplane.relay import host_bytes
from mesh_mcp.metrics import live, llamacpp
from mesh_mcp.metrics.families import NodeMetrics, metrics_of
from mesh_mcp.metrics.trace import Trace
from mesh_mcp.state import NodeState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

__all__ = ["CONTENT_TYPE", "NodeMetrics", "Trace", "metrics_of", "scrape"]


class _Given(Collector):
    """Families made for one scrape."""

    def __init__(self, found: list[Metric]) -> None:
        self.found = found

    def collect(self) -> list[Metric]:
        return self.found


async def scrape(node: NodeState, blackboard_posts: int | None = None) -> bytes:
    """The node's metrics in Prometheus' text format: its request metrics, its live state, its llama-servers'."""
    folded = llamacpp.fold(await llamacpp.read(node))
    now = CollectorRegistry(auto_describe=False)
    now.register(_Given([*live.families(node, blackboard_posts, host_bytes(node.node_id)), *folded]))
    return generate_latest(metrics_of(node).registry) + generate_latest(now)

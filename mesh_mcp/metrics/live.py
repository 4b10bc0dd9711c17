"""Metric families read from the node's live state at scrape time (nothing kept between scrapes): its models
and their processes, its peers and the mesh's traffic, the blackboard. Pure: a `NodeState` (and the blackboard's
post count, and the bytes of the relays it runs as a split's host) in, families out.

    mesh_llm_node_info{node_id,version}                    1
    mesh_llm_model_state{model,state}                      1 for each model this node serves or loads
    mesh_llm_model_decode_tokens_per_second{model}         llama-server's measured decode speed
    mesh_llm_process_restarts_total{model,process}         restarts by their supervisors: llama-server (this
                                                           node's models), rpc-server (split workers lent to peers)
    mesh_llm_mesh_members                                  members alive, this node included
    mesh_llm_gossip_rounds_total                           gossip rounds this node ran
    mesh_llm_peer_rtt_seconds{peer}                        round trip to each peer measured here
    mesh_llm_traffic_bytes_total{plane,direction}          quic (gossip, control, tunnelled API) and dataplane
                                                           (llama.cpp RPC of splits, as worker and as host) bytes,
                                                           this node's totals
    mesh_llm_peer_traffic_bytes_total{peer,plane,direction}   the same by peer: QUIC datagrams of its connections,
                                                           RPC bytes of splits the peer hosts on this worker, and
                                                           of splits this node hosts on the peer (its relays)
    mesh_llm_blackboard_posts                              posts stored, on a node that carries the blackboard
    mesh_llm_blackboard_sync_age_seconds{peer}             since the last blackboard sync exchange with a peer
    mesh_llm_blackboard_newest_post_age_seconds            since the newest post this node holds was written
                                                           (at most the posts' 48 h life; absent while none)

The per-peer numbers come from the rows of `node.peers()` (`Mesh.peer_table`: the mesh and the planes above count,
this module only reads); this node's own row carries `gossip_rounds`, `rpc_server_restarts` and
`blackboard_newest_post_age_s`.

Bounded: models are this node's own (a handful) plus rpc-server models (at most 64: serving/rpc_worker.py), peers
at most `MAX_PEERS` (live members, the first by id), model names cut to `MAX_MODEL_NAME` characters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from mesh_mcp.metrics.families import MAX_MODEL_NAME
from mesh_mcp.state import NodeState

MAX_PEERS = 1000  # as many as the console shows (api/console_view.py MAX_MEMBERS)
_TRAFFIC = {  # NodeState.traffic() key -> (plane, direction)
    "quic_bytes_in": ("quic", "in"),
    "quic_bytes_out": ("quic", "out"),
    "rpc_bytes_in": ("dataplane", "in"),
    "rpc_bytes_out": ("dataplane", "out"),
}
_PEER_TRAFFIC = {"quic_bytes": "quic", "dataplane_bytes": "dataplane"}  # peer row key ({in, out}) -> plane
MAX_POST_AGE_S = 48 * 3600  # a blackboard post lives 48 h (blackboard/post.py TTL_S): an older age is not one
MAX_RPC_MODELS = 64  # rpc-server models a node counts restarts of (serving/rpc_worker.py MAX_RESTART_MODELS)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def families(
    node: NodeState, blackboard_posts: int | None = None, relayed: Mapping[str, tuple[int, int]] | None = None
) -> Iterator[Metric]:
    """`relayed`: the data-plane bytes (in, out) this node moved as a split's host, by worker (dataplane/relay.py
    `host_bytes`), added to the worker's side the node's traffic and peer rows already count."""
    info = GaugeMetricFamily("mesh_llm_node_info", "This node", labels=["node_id", "version"])
    info.add_metric([node.node_id, node.version], 1)
    yield info
    peers, traffic = node.peers(), node.traffic()
    if relayed:
        peers, traffic = _with_relayed(peers, traffic, relayed)
    own = next((p for p in peers if p.get("self")), {})
    yield from _models(node, own.get("rpc_server_restarts"))
    yield from _mesh(peers, traffic)
    yield from _per_peer(peers)
    if blackboard_posts is not None:
        yield GaugeMetricFamily("mesh_llm_blackboard_posts", "Blackboard posts stored here", value=blackboard_posts)
    if (age := _number(own.get("blackboard_newest_post_age_s"))) is not None and 0 <= age <= MAX_POST_AGE_S:
        yield GaugeMetricFamily(
            "mesh_llm_blackboard_newest_post_age_seconds",
            "Time since the newest blackboard post this node holds was written",
            value=age,
        )


def _with_relayed(
    peers: list[dict[str, Any]], traffic: dict[str, int], relayed: Mapping[str, tuple[int, int]]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The peer rows and the node's traffic with the host side's data-plane bytes added (copies)."""
    traffic = dict(traffic)
    for key, index in (("rpc_bytes_in", 0), ("rpc_bytes_out", 1)):
        traffic[key] = int(_number(traffic.get(key)) or 0) + sum(v[index] for v in relayed.values())
    rows = []
    for row in peers:
        got = None if row.get("self") else relayed.get(str(row.get("node_id")))
        if got is not None:
            had = row.get("dataplane_bytes")
            had = had if isinstance(had, dict) else {}
            row = {
                **row,
                "dataplane_bytes": {d: (_number(had.get(d)) or 0) + n for d, n in zip(("in", "out"), got, strict=True)},
            }
        rows.append(row)
    return rows, traffic


def _models(node: NodeState, rpc_restarts: object) -> Iterator[Metric]:
    state = GaugeMetricFamily("mesh_llm_model_state", "Models of this node by state", labels=["model", "state"])
    speed = GaugeMetricFamily(
        "mesh_llm_model_decode_tokens_per_second", "Decode speed llama-server reports", labels=["model"]
    )
    restarts = CounterMetricFamily(
        "mesh_llm_process_restarts", "Restarts of a model's server process", labels=["model", "process"]
    )
    for m in list(node.models.values()):
        name = m.name[:MAX_MODEL_NAME]
        state.add_metric([name, m.state], 1)
        if m.measured_tok_s is not None:
            speed.add_metric([name], m.measured_tok_s)
        restarts.add_metric([name, "llama-server"], m.restarts)
    if isinstance(rpc_restarts, dict):
        for model, n in list(rpc_restarts.items())[:MAX_RPC_MODELS]:
            if (count := _number(n)) is not None:
                restarts.add_metric([str(model)[:MAX_MODEL_NAME], "rpc-server"], count)
    yield from (state, speed, restarts)


def _mesh(peers: list[dict[str, Any]], traffic: dict[str, int]) -> Iterator[Metric]:
    members = GaugeMetricFamily("mesh_llm_mesh_members", "Members of the mesh alive, this node included")
    members.add_metric([], len(peers))
    rounds = CounterMetricFamily("mesh_llm_gossip_rounds", "Gossip rounds this node ran")
    own = next((p for p in peers if p.get("self")), {})
    if (n := _number(own.get("gossip_rounds"))) is not None:
        rounds.add_metric([], n)
    rtt = GaugeMetricFamily("mesh_llm_peer_rtt_seconds", "Round trip to a peer, measured here", labels=["peer"])
    for peer in _others(peers):
        ms = _number(peer.get("rtt_ms"))
        if ms is not None:
            rtt.add_metric([str(peer.get("node_id"))[:64]], ms / 1000)
    moved = CounterMetricFamily(
        "mesh_llm_traffic_bytes", "Bytes this node moved to and from peers", labels=["plane", "direction"]
    )
    for key, (plane, direction) in _TRAFFIC.items():
        if (n := _number(traffic.get(key))) is not None:
            moved.add_metric([plane, direction], n)
    yield from (members, rounds, rtt, moved)


def _per_peer(peers: list[dict[str, Any]]) -> Iterator[Metric]:
    moved = CounterMetricFamily(
        "mesh_llm_peer_traffic_bytes",
        "Bytes this node moved to and from a peer: QUIC datagrams, and llama.cpp RPC of splits the peer hosts here",
        labels=["peer", "plane", "direction"],
    )
    age = GaugeMetricFamily(
        "mesh_llm_blackboard_sync_age_seconds", "Time since the last blackboard sync with a peer", labels=["peer"]
    )
    for row in _others(peers):
        peer = str(row.get("node_id"))[:64]
        for key, plane in _PEER_TRAFFIC.items():
            counted = row.get(key)
            for direction in ("in", "out"):
                if isinstance(counted, dict) and (n := _number(counted.get(direction))) is not None:
                    moved.add_metric([peer, plane, direction], n)
        if (seconds := _number(row.get("blackboard_sync_age_s"))) is not None:
            age.add_metric([peer], seconds)
    yield from (moved, age)


def _others(peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of peers (not this node), the first `MAX_PEERS` by node id."""
    return sorted((p for p in peers if not p.get("self")), key=lambda p: str(p.get("node_id")))[:MAX_PEERS]

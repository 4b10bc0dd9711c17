"""The console's picture of the mesh (`/api/status` and `/api/events` carry it as `mesh`): who is in it, where every
model runs, and the links between members with their round trips.

`mesh_view` is pure: the members' signed records (alive, and those that died or left within the last minute, so a
page can fade them out), this node's id, its own RTT measurements, the demand rows the status already shows and the
placements of the models this node runs in; out comes one JSON-ready dict. Everything is bounded by construction
(members, models per member, models, links), so a 1000-member mesh costs milliseconds. `provider` is the thin glue
the node hands `NodeState.mesh`: it reads the running `Mesh` and calls `mesh_view`.

The shape (the contract the front end codes against):
`{"members": [{"node_id", "name", "role", "self", "state", "since", "capacity_bytes", "addresses", "rtt_ms",
"models": [{"name", "state", "in_flight", "slots", "ctx", "size_bytes", "tok_s", "predicted_tok_s", "ok", "err",
"stage"?}]}],
"models": [{"name", "servers", "loading", "failed", "mode", "ctx", "tools", "reasoning", "measured_tok_s",
"predicted_tok_s", "demand_rate_per_min", "stages", "shards"}], "links": [{"a", "b", "rtt_ms", "over_cap"}]}`.

A member holding a stage of a split lists that model with `"state": "stage"`, `"stage": [first, last]` and the
stage's share of the model's bytes (layers are near enough equal in size), and the split's host lists its own
stage's share, not the whole model: a capacity bar adds up what each node really holds.

A member's `ok` and `err` per model are the requests its own server answered since it started, well and in an error,
whichever node they entered by (its signed record's counts; this node's own are live): `mesh-llm top` shows them
per node. A stage entry has none (`null`): its requests are the split host's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from mesh_mcp.mesh.records import NodeRecord, ServedModel
from mesh_mcp.mesh.runtime import served_models

if TYPE_CHECKING:
    from mesh_mcp.mesh.runtime import Mesh
    from mesh_mcp.state import NodeState

SPLIT_RTT_CAP_MS = 80.0  # placement's cap on a split stage's round trip to its host (inference/placement.py)
MAX_MEMBERS = 1000  # members shown (alive first, then the recently gone); a mesh past it shows the first by id
MAX_CLIENTS = 64  # connected clients shown (they publish no record: only their node id is known)
MAX_MEMBER_MODELS = 32  # models listed per member
MAX_MODELS = 256  # models of the mesh listed
MAX_LINKS = 4096  # links listed, shortest first (each record gossips at most its 32 nearest peers)
LOADING = frozenset({"downloading", "loading"})

Mode = Literal["solo", "replicas", "split", "shards", "none"]


@dataclass(frozen=True)
class Gone:
    """A member that died or left `since` (unix s): shown for a minute with its last record."""

    record: NodeRecord
    state: Literal["dead", "left"]
    since: float


def _member(
    r: NodeRecord, self_id: str, state: str, since: float | None, rtt: Mapping[str, float], role: str
) -> dict[str, Any]:
    return {
        "node_id": r.node_id,
        "name": r.name,
        "role": role,
        "self": r.node_id == self_id,
        "state": state,
        "since": since,
        "capacity_bytes": r.capacity_bytes,
        "addresses": list(r.addresses),
        "rtt_ms": {peer: round(ms, 1) for peer, ms in sorted(rtt.items())},
        "models": [
            {
                "name": m.name,
                "state": m.state,
                "in_flight": m.in_flight,
                "slots": m.slots or None,
                "ctx": m.ctx or None,
                "size_bytes": m.size_bytes or None,
                "tok_s": m.tps / 10 if m.tps else None,
                "predicted_tok_s": m.ptps / 10 if m.ptps else None,
                "ok": m.ok,
                "err": m.err,
            }
            for m in r.models_served[:MAX_MEMBER_MODELS]
        ],
    }


def _stages(placement: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if not placement or placement.get("kind") != "split":
        return []
    return [{"node_id": s["node_id"], "layers": list(s["layers"])} for s in placement.get("stages", [])][:64]


def _shards(placement: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if not placement or placement.get("kind") != "expert-shards":
        return []
    out = []
    for s in placement.get("shards", [])[:64]:
        shard = {"node_id": s["node_id"], "experts": placement.get("experts_per_shard")}
        shard |= {k: s[k] for k in ("quality", "passed") if k in s}
        out.append(shard)
    return out


def _record_shard(node_id: str, experts: int, agreement_milli: int, gate: int) -> dict[str, Any]:
    shard: dict[str, Any] = {"node_id": node_id, "experts": experts}
    if agreement_milli >= 0:
        shard["quality"] = {"agreement": agreement_milli / 1000}
    if gate >= 0:
        shard["passed"] = bool(gate)
    return shard


def _shard_nodes(placements: Mapping[str, Mapping[str, Any] | None], self_id: str) -> set[str]:
    """Nodes lending an expert shard, as this node knows it: those of its own sharded models and itself."""
    out: set[str] = set()
    for p in placements.values():
        if p and p.get("kind") == "expert-shards":
            out.update(s["node_id"] for s in p.get("shards", [])[1:])  # shard 0 is the coordinator's own
        elif p and p.get("kind") == "expert-shard":
            out.add(self_id)
    return out


def _models(
    alive: Sequence[NodeRecord],
    demand: Sequence[Mapping[str, Any]],
    placements: Mapping[str, Mapping[str, Any] | None],
    shard_nodes: set[str],
) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str) -> dict[str, Any]:
        if name not in rows:
            rows[name] = {"name": name, "servers": [], "loading": [], "failed": [], "ctxs": [], "tools": [], "tps": [],
                          "ptps": [], "think": []}  # fmt: skip
        return rows[name]

    for r in alive:
        for m in r.models_served[:MAX_MEMBER_MODELS]:
            if r.node_id in shard_nodes and m.state != "serving":
                continue
            found = row(m.name)
            if m.state == "serving":
                found["servers"].append(r.node_id)
                found["ctxs"].append(m.ctx)
                found["tools"].append(m.tools)
                found["think"].append(m.think)
                found["tps"] += [m.tps] if m.tps else []
                found["ptps"] += [m.ptps] if m.ptps else []
                if m.stages:  # a split hosted there: its record says where each stage runs
                    found["stages"] = [{"node_id": n, "layers": [a, b]} for n, a, b in m.stages[:64]]
                if m.shards:  # an expert-sharded model coordinated there: its record says where each shard runs
                    found["shards"] = [_record_shard(*sh) for sh in m.shards[:64]]
            elif m.state in LOADING:
                found["loading"].append(r.node_id)
            elif m.state == "failed":
                found["failed"].append(r.node_id)
    rates = {str(d.get("model")): d.get("rate_per_min") for d in demand}
    for name in rates:
        row(name)
    out = []
    for name, found in sorted(rows.items()):
        placement = placements.get(name)
        stages, shards = _stages(placement) or found.get("stages", []), _shards(placement) or found.get("shards", [])
        # A shard node's "model" is its slice: the coordinator serves the model, the rest lend.
        lending = shard_nodes | {sh["node_id"] for sh in shards[1:]}
        servers = [n for n in found["servers"] if n not in lending or not shards]
        mode: Mode
        if stages:
            mode = "split"
        elif shards:
            mode = "shards"
        elif not servers:
            mode = "none"
        else:
            mode = "solo" if len(servers) == 1 else "replicas"
        tools, tps, ptps = found["tools"], found["tps"], found["ptps"]
        out.append(
            {
                "name": name,
                "servers": sorted(servers),
                "loading": sorted(found["loading"]),
                "failed": sorted(found["failed"]),
                "mode": mode,
                "ctx": max((c for c in found["ctxs"] if c), default=None),
                "tools": _said(tools),
                "reasoning": _said(found["think"]),  # a thinking model (thinking off unless a request asks)
                "measured_tok_s": round(sum(tps) / len(tps) / 10, 1) if tps else None,  # the mean of its servers
                "predicted_tok_s": max(ptps) / 10 if ptps else None,
                "demand_rate_per_min": rates.get(name),
                "stages": stages,
                "shards": shards,
            }
        )
    return out[:MAX_MODELS]


def _said(answers: list[bool | None]) -> bool | None:
    """True if any server says so, False if every one says not, else None (not known)."""
    return True if any(answers) else (False if answers and all(a is False for a in answers) else None)


def _links(members: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One link per pair of live members either side measured: the smaller round trip of the two."""
    alive = {m["node_id"] for m in members if m["state"] == "alive"}
    best: dict[tuple[str, str], float] = {}
    for m in members:
        if m["state"] != "alive":
            continue
        for peer, ms in m["rtt_ms"].items():
            if peer in alive and peer != m["node_id"]:
                key = (m["node_id"], peer) if m["node_id"] < peer else (peer, m["node_id"])
                best[key] = min(ms, best.get(key, ms))
    ordered = sorted(best.items(), key=lambda kv: (kv[1], kv[0]))[:MAX_LINKS]
    return [{"a": a, "b": b, "rtt_ms": ms, "over_cap": ms > SPLIT_RTT_CAP_MS} for (a, b), ms in ordered]


def mesh_view(
    *,
    self_id: str,
    alive: Sequence[NodeRecord],
    gone: Sequence[Gone] = (),
    since: Mapping[str, float] | None = None,
    rtt_here: Mapping[str, float] | None = None,
    clients: Sequence[str] = (),
    demand: Sequence[Mapping[str, Any]] = (),
    placements: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """The `mesh` field of the status (see the module docstring); pure and bounded."""
    since = since or {}
    placements = placements or {}
    shard_nodes = (
        _shard_nodes(placements, self_id)
        | {  # and those a coordinator's record names (shard 0 is its own)
            sh[0] for r in alive[:MAX_MEMBERS] for m in r.models_served[:MAX_MEMBER_MODELS] for sh in m.shards[1:]
        }
    )
    alive = sorted(alive, key=lambda r: (r.node_id != self_id, r.node_id))[:MAX_MEMBERS]
    alive_ids = {r.node_id for r in alive}

    # A member holding a stage of a split hosted elsewhere (its record says "standby": it lends, it serves nothing).
    stage_holders = {node for r in alive for m in r.models_served for node, _, _ in m.stages if node != r.node_id} | {
        s["node_id"] for p in placements.values() for s in _stages(p) if s["node_id"] != self_id
    }

    def role(r: NodeRecord) -> str:
        if r.role == "client":
            return r.role
        if r.node_id in shard_nodes:
            return "shard"
        return "worker" if r.node_id in stage_holders and r.role == "standby" else r.role

    members = []
    for r in alive:
        rtt = dict(rtt_here or {}) if r.node_id == self_id else {peer: tenths / 10 for peer, tenths in r.rtt}
        members.append(_member(r, self_id, "alive", since.get(r.node_id), rtt, role(r)))
    for g in sorted(gone, key=lambda g: (-g.since, g.record.node_id))[: MAX_MEMBERS - len(members)]:
        if g.record.node_id not in alive_ids:
            members.append(_member(g.record, self_id, g.state, g.since, {}, role(g.record)))
    known = {m["node_id"] for m in members}
    for client in sorted(set(clients) - known)[:MAX_CLIENTS]:
        members.append(
            {
                "node_id": client,
                "name": client,  # a client publishes no record: its id is all this node knows
                "role": "client",
                "self": False,
                "state": "alive",
                "since": since.get(client),
                "capacity_bytes": 0,
                "addresses": [],
                "rtt_ms": {},
                "models": [],
            }
        )
    models = _models(alive, demand, placements, shard_nodes)
    _stage_shares(members, models)
    return {"members": members, "models": models, "links": _links(members)}


def _stage_shares(members: list[dict[str, Any]], models: Sequence[dict[str, Any]]) -> None:
    """What each node of a split holds: its stage's share of the model's bytes (the host's entry is cut to its own
    stage; a worker gains a `"stage"` entry). Layers are taken as equal in size, near enough for a capacity bar."""
    by_id = {m["node_id"]: m for m in members}
    for model in models:
        stages = model["stages"]
        if not stages:
            continue
        total_layers = max(st["layers"][1] for st in stages) + 1
        size = max(
            (x["size_bytes"] or 0 for n in model["servers"] if n in by_id for x in by_id[n]["models"]
             if x["name"] == model["name"]),
            default=0,
        )  # fmt: skip
        if not size or total_layers <= 0:
            continue
        for st in stages:
            first, last = st["layers"]
            member = by_id.get(st["node_id"])
            if member is None or last < first:
                continue
            share = size * (last - first + 1) // total_layers
            entry = next((x for x in member["models"] if x["name"] == model["name"]), None)
            if entry is None:
                if len(member["models"]) >= MAX_MEMBER_MODELS:
                    continue
                entry = {"name": model["name"], "state": "stage", "in_flight": 0, "slots": None, "ctx": None,
                         "tok_s": None, "predicted_tok_s": None, "ok": None, "err": None}  # fmt: skip
                member["models"].append(entry)
            entry["size_bytes"], entry["stage"] = share, [first, last]


def provider(mesh: Mesh, state: NodeState) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]:
    """`NodeState.mesh` for a node in a mesh: reads the running mesh (its records, who died or left within the last
    minute, this node's RTTs, connected clients) and builds the view with the demand rows the snapshot already has."""

    def view(demand: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        now = mesh.clock.time()
        records = mesh.gossip.record if mesh.gossip is not None else (lambda node_id: None)
        since = dict(mesh.member_since)
        since.setdefault(state.node_id, state.started_at)
        # This node's own models from its live state, not its last signed record (which trails by a gossip tick).
        alive = [
            replace(r, models_served=_served_now(state)) if r.node_id == state.node_id else r for r in mesh.members()
        ]
        return mesh_view(
            self_id=state.node_id,
            alive=alive,
            gone=[Gone(rec, "left" if how == "left" else "dead", at) for rec, how, at in mesh.recently_gone()],
            since=since,
            rtt_here=mesh.rtt.measured(now),
            clients=[n for n in list(mesh.transport.connections)[: 4 * MAX_CLIENTS] if records(n) is None],
            demand=demand,
            placements={m.name: m.placement for m in state.models.values() if m.state != "stopped"},
        )

    return view


def _served_now(state: NodeState) -> tuple[ServedModel, ...]:
    """This node's models as its record would say, from its live state."""
    return served_models(state, MAX_MEMBER_MODELS)


def standalone(state: NodeState, role: str) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]:
    """`NodeState.mesh` for a node in no mesh: itself alone, described from its own state."""

    def view(demand: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        served = _served_now(state)
        me = NodeRecord(
            node_id=state.node_id,
            public_key=b"",
            name=state.name,
            addresses=(),
            role=role,
            capacity_bytes=int(state.hardware.get("capacity_bytes", 0)),
            models_served=served,
        )
        return mesh_view(
            self_id=state.node_id,
            alive=[me],
            since={state.node_id: state.started_at},
            demand=demand,
            placements={m.name: m.placement for m in state.models.values() if m.state != "stopped"},
        )

    return view

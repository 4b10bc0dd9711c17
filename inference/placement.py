"""Placement: which node serves a model, alone or as a pipeline split — a pure function of gossiped state.

Every node computes `plan()` from the same gossip and gets the same answer: no I/O, no clocks, no randomness;
input order does not matter (nodes are sorted by id first) and every tie is broken by node id.

Rules:
- **Need** = `memory_need` (weights + f16 KV cache for slots × ctx tokens + compute buffers; see gguf_facts).
  Clients and nodes offering no capacity serve nothing.
- **Solo** when the need fits one node. Preference: the requester, then a node that has the file, then the most
  capacity, then node id.
- **Split** otherwise (or when `force_split=N` asks for exactly N nodes). Host = the node with the most capacity
  (then one with the file, then node id): it runs llama-server, needs the whole GGUF, and keeps the input
  embeddings (llama.cpp keeps them on the host CPU) and the last layers with the output layer. Workers are added
  by lowest RTT to the host (ties: node id); a node whose RTT exceeds `rtt_cap_ms`, or has none measured, is
  skipped with a reason, and so is a node whose llama.cpp build (`llama_cpp`, gossiped) differs from the
  host's — all nodes of a split run the same build. An empty identity on either side (a node that
  does not report one) counts as compatible: the host still HELLOs each worker's rpc-server before launch
  and names a protocol mismatch there. Workers are added until the group's capacity reaches
  `headroom` × need and every stage fits; at most 15 devices (llama.cpp's scheduler limit) and one layer per
  stage at least.
- **Layers** go in proportion to capacity (largest remainder, each stage ≥ 1, sum = n_layers), contiguous, in
  device order: workers by RTT, host last — llama.cpp puts the output layer on the last device, so only hidden
  states cross the network. Each stage also pays its own compute buffer. A stage whose share does not fit its
  node gives layers to the stage with the most room, one at a time, while the total overflow shrinks.
- **None** when nothing fits: `missing_bytes` says how much more capacity (within the RTT cap) is needed.
- **Predicted tokens/s** (an estimate, not a measurement): decode is memory-bandwidth bound and each worker costs
  one blocking round trip per token, so 1 / (Σ stage weight bytes / node bandwidth + Σ worker RTT). It ignores
  compute, KV reads and MoE sparsity (every expert counted as read: pessimistic for MoE).

`Plan.tensor_split` holds one `-ts` value per node in device order (workers, then host) chosen so llama.cpp
reproduces the stages exactly: it puts layer il (the output is il = n_layers) on the first device whose cumulative
share exceeds il / (n_layers + 1), so the values are the layer counts with each split point half a layer before
its boundary (first − 0.5, last + 1 for the output + 0.5): float rounding cannot move a layer. A node with
several GPUs is one stage here: its launcher divides that stage's value among its devices. A CPU-only host is not
a llama.cpp device: it runs a local rpc-server listed last so that it holds the host stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mesh_mcp.errors import ConfigError

from .hardware import CPU_BANDWIDTH
from .memory_model import ModelShape, memory_need, stage_memory

MAX_STAGES = 15  # llama.cpp's scheduler takes 16 backends, one of them the host CPU
GiB = 1 << 30


@dataclass(frozen=True)
class NodeCap:
    node_id: str
    capacity_bytes: int  # what the node can still give to this model
    rtt_ms: Mapping[str, float] = field(default_factory=dict)  # measured RTT to other nodes, by id
    has_file: bool = False
    client: bool = False
    bandwidth_bytes_s: float = CPU_BANDWIDTH
    llama_cpp: str = ""  # build identity (mesh_llamacpp Pin.identity); "" = not reported


@dataclass(frozen=True)
class Stage:
    node_id: str
    first_layer: int
    last_layer: int  # inclusive
    bytes: int  # memory this stage needs on its node: weights + KV + compute (+ host extras)
    fraction: float  # share of the model's layers
    output: bool = False  # holds the output layer (the host stage)

    @property
    def n_layers(self) -> int:
        return self.last_layer - self.first_layer + 1


@dataclass(frozen=True)
class Plan:
    model: str
    kind: Literal["solo", "split", "none"]
    host: str | None
    stages: tuple[Stage, ...]  # device order; the host stage is last
    tensor_split: tuple[float, ...]  # llama-server -ts values, device order (workers, then host); () when solo
    reasons: tuple[str, ...]
    predicted_tok_s: float | None
    missing_bytes: int = 0

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(s.node_id for s in self.stages[:-1]) if self.kind == "split" else ()


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _names(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def rtt_between(a: NodeCap, b: NodeCap) -> float | None:
    """The larger of the two measured directions (both sides gossip theirs), None if neither measured."""
    seen = [v for v in (a.rtt_ms.get(b.node_id), b.rtt_ms.get(a.node_id)) if v is not None and v >= 0 and v == v]
    return max(seen) if seen else None


def proportional_counts(n_layers: int, capacities: Sequence[int]) -> list[int]:
    """n_layers split in proportion to capacities: largest remainder (ties: earlier stage), each ≥ 1."""
    k = len(capacities)
    if not 1 <= k <= n_layers:
        raise ValueError(f"cannot give {k} stages at least one of {n_layers} layers each")
    weights = [max(c, 0) for c in capacities] if any(c > 0 for c in capacities) else [1] * k
    ideal = [n_layers * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in ideal]
    by_remainder = sorted(range(k), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in by_remainder[: n_layers - sum(counts)]:
        counts[i] += 1
    for i in range(k):
        while counts[i] < 1:
            donor = max(range(k), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def split_values(counts: Sequence[int]) -> tuple[float, ...]:
    """-ts values that make llama.cpp give device d exactly counts[d] layers and the last device the output."""
    ts = [float(c) for c in counts]
    ts[0] -= 0.5
    ts[-1] += 1.5
    return tuple(ts)


@dataclass(frozen=True)
class _Layout:
    counts: tuple[int, ...]
    needs: tuple[int, ...]
    overflow: int  # Σ max(0, need − capacity)
    moved: int  # layers moved off their proportional stage


class _Model:
    """The facts plus the context, with prefix sums so a stage's need costs O(1)."""

    def __init__(self, facts: ModelShape, ctx_tokens: int, slots: int) -> None:
        self.facts, self.ctx_tokens, self.slots = facts, ctx_tokens, slots
        self.weights, self.kv = [0], [0]
        for w, e in zip(facts.layer_bytes, facts.kv_elements_per_token, strict=True):
            self.weights.append(self.weights[-1] + w)
            self.kv.append(self.kv[-1] + e)

    def need(self, first: int, end: int, host: bool) -> int:
        """Memory of the stage holding layers [first, end)."""
        w, kv = self.weights[end] - self.weights[first], self.kv[end] - self.kv[first]
        return stage_memory(self.facts, self.ctx_tokens, self.slots, layer_bytes=w, kv_elements=kv, host=host).total

    def needs(self, counts: Sequence[int]) -> tuple[int, ...]:
        out, first = [], 0
        for i, c in enumerate(counts):
            out.append(self.need(first, first + c, host=i == len(counts) - 1))
            first += c
        return tuple(out)

    def read_bytes(self, first: int, last: int, host: bool) -> int:
        """Weight bytes one decoded token reads on a stage (dense: all of them; the host adds the output)."""
        return self.weights[last + 1] - self.weights[first] + (self.facts.output_bytes if host else 0)


def _layout(m: _Model, caps: Sequence[int]) -> _Layout:
    counts = proportional_counts(m.facts.n_layers, caps)
    moved = 0

    def overflow(needs: Sequence[int]) -> int:
        return sum(max(0, n - c) for n, c in zip(needs, caps, strict=True))

    needs = m.needs(counts)
    for _ in range(m.facts.n_layers * len(caps)):
        over = overflow(needs)
        if over == 0:
            break
        worst = max(range(len(caps)), key=lambda i: (needs[i] - caps[i], -i))
        if counts[worst] <= 1:
            break
        best: tuple[int, int, int] | None = None
        for j in range(len(caps)):
            if j == worst:
                continue
            trial = list(counts)
            trial[worst] -= 1
            trial[j] += 1
            key = (overflow(m.needs(trial)), abs(j - worst), j)
            best = key if best is None or key < best else best
        if best is None or best[0] >= over:
            break
        counts[worst] -= 1
        counts[best[2]] += 1
        moved += 1
        needs = m.needs(counts)
    return _Layout(tuple(counts), needs, overflow(needs), moved)


def _predict(m: _Model, stages: Sequence[Stage], nodes: Mapping[str, NodeCap], rtts: Sequence[float]) -> float | None:
    seconds = sum(rtts) / 1000
    for s in stages:
        bw = nodes[s.node_id].bandwidth_bytes_s
        seconds += m.read_bytes(s.first_layer, s.last_layer, s.output) / bw if bw > 0 else math.inf
    return 1 / seconds if 0 < seconds < math.inf else None


def _solo(model: str, m: _Model, node: NodeCap, need: int, why: str, reasons: list[str]) -> Plan:
    stage = Stage(node.node_id, 0, m.facts.n_layers - 1, need, 1.0, output=True)
    tok_s = _predict(m, (stage,), {node.node_id: node}, ())
    reasons.append(f"solo on {node.node_id} ({why}): needs {_gib(need)} of its {_gib(node.capacity_bytes)}")
    return Plan(model, "solo", node.node_id, (stage,), (), tuple(reasons), tok_s)


def _none(model: str, reasons: list[str], missing: int) -> Plan:
    return Plan(model, "none", None, (), (), tuple(reasons), None, missing)


def _solo_choice(servers: Sequence[NodeCap], need: int, requester: str | None) -> tuple[NodeCap, str] | None:
    fits = [n for n in servers if need <= n.capacity_bytes]
    if not fits:
        return None
    best = min(fits, key=lambda n: (n.node_id != requester, not n.has_file, -n.capacity_bytes, n.node_id))
    if best.node_id == requester:
        return best, "the requester"
    if best.has_file:
        return best, "has the file"
    return best, "most capacity" if len(fits) > 1 else "the only node it fits"


def _same_build(host: NodeCap, servers: Sequence[NodeCap], reasons: list[str]) -> list[NodeCap]:
    """The servers whose llama.cpp build matches the host's (an unreported build counts as matching:
    the host's HELLO probe still checks the RPC protocol before launch)."""
    other = [n for n in servers if n.llama_cpp and host.llama_cpp and n.llama_cpp != host.llama_cpp]
    for n in other:
        reasons.append(f"left out: {n.node_id} runs llama.cpp {n.llama_cpp}, host runs {host.llama_cpp}")
    return [n for n in servers if n not in other]


def _by_rtt(
    host: NodeCap, servers: Sequence[NodeCap], cap_ms: float, reasons: list[str]
) -> list[tuple[float, NodeCap]]:
    """The other servers within `cap_ms` of the host, nearest first (ties: node id); the rest named in reasons."""
    near: list[tuple[float, str, NodeCap]] = []
    far: list[str] = []
    unmeasured: list[str] = []
    for n in servers:
        if n is host:
            continue
        r = rtt_between(host, n)
        if r is None:
            unmeasured.append(n.node_id)
        elif r > cap_ms:
            far.append(f"{n.node_id} ({r:.0f} ms)")
        else:
            near.append((r, n.node_id, n))
    if far:
        reasons.append(f"skipped, RTT to host {host.node_id} above {cap_ms:.0f} ms: {_names(far)}")
    if unmeasured:
        reasons.append(f"skipped, no RTT to host {host.node_id} measured: {_names(unmeasured)}")
    return [(r, n) for r, _, n in sorted(near, key=lambda t: (t[0], t[1]))]


def _split(
    model: str, m: _Model, host: NodeCap, workers: Sequence[tuple[float, NodeCap]], reasons: Sequence[str]
) -> tuple[Plan | None, int]:
    """The split over `workers` (in device order) + `host`, or (None, bytes by which the stages overflow)."""
    group = [n for _, n in workers] + [host]
    caps = [n.capacity_bytes for n in group]
    lay = _layout(m, caps)
    if lay.overflow:
        return None, lay.overflow
    n_layers, stages, first = m.facts.n_layers, [], 0
    for i, (n, c, b) in enumerate(zip(group, lay.counts, lay.needs, strict=True)):
        stages.append(Stage(n.node_id, first, first + c - 1, b, c / n_layers, output=i == len(group) - 1))
        first += c
    tok_s = _predict(m, stages, {n.node_id: n for n in group}, [r for r, _ in workers])
    text = ", ".join(f"{s.node_id} layers {s.first_layer}–{s.last_layer}" for s in stages)
    notes = [f"split over {len(group)} nodes ({_gib(sum(caps))}), host {host.node_id} last with the output: {text}"]
    if lay.moved:
        notes.append(f"moved {lay.moved} layer(s) off stages whose proportional share did not fit")
    if tok_s is not None:
        notes.append(f"predicted {tok_s:.1f} tok/s (estimate: bandwidth-bound decode + one RTT per worker)")
    plan_ = Plan(model, "split", host.node_id, tuple(stages), split_values(lay.counts), (*reasons, *notes), tok_s)
    return plan_, 0


def plan(
    model: str,
    facts: ModelShape,
    nodes: Sequence[NodeCap],
    *,
    requester: str | None,
    ctx_tokens: int,
    slots: int,
    force_split: int | None = None,
    rtt_cap_ms: float = 80.0,
    headroom: float = 1.1,
    host: str | None = None,
) -> Plan:
    """Where to serve `model` with `slots` × `ctx_tokens` of context (see the module rules). `host` pins
    the host of a split (the node a user asked to serve the model: it has the file and runs llama-server)."""
    ordered = sorted(nodes, key=lambda n: n.node_id)
    ids = [n.node_id for n in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate node ids in {ids}")
    if force_split is not None and force_split < 2:
        raise ConfigError(f"--split {force_split}: a split needs at least 2 nodes")
    m = _Model(facts, ctx_tokens, slots)
    need = memory_need(facts, ctx_tokens, slots)
    target = math.ceil(headroom * need.total)
    reasons = [
        f"{model} needs {_gib(need.total)}: weights {_gib(need.weights)} + KV {_gib(need.kv)} "
        f"({slots} × {ctx_tokens} tokens) + compute {_gib(need.compute)}"
    ]
    clients = [n.node_id for n in ordered if n.client]
    if clients:
        reasons.append(f"clients serve nothing: {_names(clients)}")
    servers = [n for n in ordered if not n.client and n.capacity_bytes > 0]
    if not servers:
        reasons.append("no node offers capacity")
        return _none(model, reasons, target)

    if force_split is None:
        solo = _solo_choice(servers, need.total, requester)
        if solo:
            return _solo(model, m, solo[0], need.total, solo[1], reasons)
        biggest = max(n.capacity_bytes for n in servers)
        reasons.append(f"no node fits it alone (largest offers {_gib(biggest)}): split")
    else:
        reasons.append(f"split forced over {force_split} nodes")

    pinned = [n for n in servers if n.node_id == host]
    if pinned:
        chosen = pinned[0]
        reasons.append(f"host {chosen.node_id}: asked to serve it")
    else:
        chosen = min(servers, key=lambda n: (-n.capacity_bytes, not n.has_file, n.node_id))
    near = _by_rtt(chosen, _same_build(chosen, servers, reasons), rtt_cap_ms, reasons)
    max_stages = min(MAX_STAGES, facts.n_layers)
    if max_stages < 2:
        reasons.append(f"a model of {facts.n_layers} layer(s) cannot be split")
        return _none(model, reasons, 0 if force_split else max(target - chosen.capacity_bytes, 1))
    usable = near[: max_stages - 1]
    if len(near) > len(usable):
        reasons.append(f"at most {max_stages} stages ({facts.n_layers} layers, llama.cpp's {MAX_STAGES} devices)")

    if force_split is not None:
        if force_split - 1 > len(usable):
            reasons.append(f"--split {force_split} impossible: {len(usable) + 1} node(s) usable")
            return _none(model, reasons, 0)
        found, over = _split(model, m, chosen, usable[: force_split - 1], reasons)
        if found:
            return found
        reasons.append(f"the {force_split} nodes lack {_gib(over)} for their stages")
        return _none(model, reasons, over)

    over = 0
    for k in range(1, len(usable) + 1):
        if chosen.capacity_bytes + sum(n.capacity_bytes for _, n in usable[:k]) < target:
            continue
        found, over = _split(model, m, chosen, usable[:k], reasons)
        if found:
            return found
    reachable = chosen.capacity_bytes + sum(n.capacity_bytes for _, n in usable)
    missing = max(target - reachable, over, 1)
    reasons.append(
        f"nothing fits: {len(usable) + 1} node(s) within {rtt_cap_ms:.0f} ms offer {_gib(reachable)}, "
        f"{headroom:g} × need is {_gib(target)}; missing {_gib(missing)}"
    )
    return _none(model, reasons, missing)

"""Replicas and releases (issue 14, item 5, the acting half), and what a watching node remembers between looks.

`Watch` is the memory one view cannot hold, kept on the injected clock from the records a node sees look after
look: since when each (node, model) has been loading — a load past `load_deadline_s(size)` is void however often its
loader re-signs its record, so a hostile or hung member cannot announce "loading X" forever and keep X unserved —,
since when each model has had requests queued on every server (`sustained` after `SUSTAIN_S`: a burst is not a
trend) and since when it could spare a server (`spare` after `SPARE_S`: one quiet snapshot is no trend either), and
when each node and each model last changed what it serves (the hysteresis of `assign.plan_moves`:
`Recent`). Every node sees the same gossip, so their memories agree to within a gossip round or two, and the rules'
intervals are minutes. The tables hold live members and their models only: they are bounded by the mesh.

`ReplicaWatcher` is the actor on a node that serves a model it was not asked to serve (it promoted itself or added
a replica): every `CHECK_S` it asks `assign.release` (no request within the demand TTL and another server keeps
it) and `assign.rebalance` (a hotter model pulls this node over); a `Release` or a move of its model that holds
for `CONFIRM_CHECKS` looks in a row is returned to the supervisor, which drops the model (and serves the move's
target). A look that fails is logged and the next one runs. An operator's `--model` is never released or moved:
only models served unpinned are watched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from mesh_mcp.clock import Clock
from mesh_mcp.mesh.records import NodeRecord
from mesh_mcp.serving import assign
from mesh_mcp.serving.assign import Demand, Recent, Release, Rules, Serve, Stay

log = logging.getLogger("mesh_llm.serving")

SUSTAIN_S = 6.0  # requests queued on every server this long (3 looks) before a replica is added
SPARE_S = 60.0  # a model gives a server up only after it could spare one on every look this long (30 looks)
LOAD_BASE_S = 300.0  # a load may take this long plus its size at LOAD_FLOOR_BYTES_S (start-up, a slow disk)
LOAD_FLOOR_BYTES_S = 5e6  # 40 Mbit/s: a download slower than this is hopeless for a mesh waiting on it
MAX_MOVES = 4096  # models whose last move is remembered (a mesh serves tens; the rest is a hostile member's noise)
LOAD_FORGET_S = 600.0  # a (node, model) not seen loading this long starts a fresh deadline if it loads again
LOADING_STATES = frozenset({"downloading", "loading"})


def load_deadline_s(size: int | None) -> float:
    """How long a member may announce loading a model of `size` bytes before the mesh treats its load as failed:
    SmolLM2 (0.1 GB) 5 min, a 7B Q4 (4.4 GB) 20 min, a 70B Q4 (40 GB) 2.4 h."""
    return LOAD_BASE_S + (size or 0) / LOAD_FLOOR_BYTES_S


@dataclass
class Watch:
    """What a watching node has seen of the mesh over time (see the module doc). `see` each look, then read."""

    loading_since: dict[tuple[str, str], float] = field(default_factory=dict)  # (node, model) → first seen loading
    _loading_seen: dict[tuple[str, str], float] = field(default_factory=dict)  # (node, model) → last seen loading
    queued_since: dict[str, float] = field(default_factory=dict)  # model → first look its servers were all queued
    spare_since: dict[str, float] = field(default_factory=dict)  # model → first look it could spare a server
    node_moved_at: dict[str, float] = field(default_factory=dict)
    model_moved_at: dict[str, float] = field(default_factory=dict)
    _holds: dict[str, frozenset[str]] = field(default_factory=dict)  # node → models it serves or loads

    def see(self, records: Iterable[NodeRecord], now: float) -> None:
        records = list(records)
        live = {r.node_id for r in records}
        loading: set[tuple[str, str]] = set()
        servers: dict[str, list[tuple[int, int]]] = {}  # model → (in flight, slots) of each server
        for r in records:
            holds = frozenset(m.name for m in r.models_served if m.state in LOADING_STATES | {"serving"})
            before = self._holds.get(r.node_id)
            if before is not None and holds != before:
                self.node_moved_at[r.node_id] = now
                for name in holds ^ before:
                    self.model_moved_at[name] = now
            self._holds[r.node_id] = holds
            for m in r.models_served:
                if m.state in LOADING_STATES:
                    loading.add((r.node_id, m.name))
                elif m.state == "serving":
                    servers.setdefault(m.name, []).append((m.in_flight, m.slots or assign.DEFAULT_SLOTS))
        for gone in set(self._holds) - live:  # a member that died or left: its models lost a server
            for name in self._holds.pop(gone):
                self.model_moved_at[name] = now
            self.node_moved_at.pop(gone, None)
        # A load's clock stops only when its node serves the model or leaves, or after LOAD_FORGET_S without it: a
        # member that drops its intent for a moment and announces it again does not restart its deadline.
        serving = {(r.node_id, m.name) for r in records for m in r.models_served if m.state == "serving"}
        for key in loading:
            self._loading_seen[key] = now
        kept = sorted(
            (t, key)
            for key, t in self._loading_seen.items()
            if key[0] in live and key not in serving and now - t < LOAD_FORGET_S
        )
        self._loading_seen = {key: t for t, key in kept[-MAX_MOVES:]}  # bounded, as model_moved_at is
        self.loading_since = {key: self.loading_since.get(key, now) for key in sorted(self._loading_seen)}
        queued = {name for name, s in servers.items() if all(flight > slots for flight, slots in s)}
        self.queued_since = {name: self.queued_since.get(name, now) for name in sorted(queued)}
        spare = {name for name, s in servers.items() if can_spare(s)}
        self.spare_since = {name: self.spare_since.get(name, now) for name in sorted(spare)}
        held = {name for models in self._holds.values() for name in models}
        recent = [(t, n) for n, t in self.model_moved_at.items() if n in held or now - t < 3600]
        # A hostile member renaming what it serves each re-sign cannot grow this: the newest MAX_MOVES are kept.
        self.model_moved_at = {n: t for t, n in sorted(recent)[-MAX_MOVES:]}

    def recent(self, now: float) -> Recent:
        sustained = {name: now - since >= SUSTAIN_S for name, since in self.queued_since.items()}
        spare = {name: now - since >= SPARE_S for name, since in self.spare_since.items()}
        return Recent(sustained, dict(self.node_moved_at), dict(self.model_moved_at), spare)

    def overdue(self, now: float, sizes: Callable[[str], int | None]) -> dict[str, list[str]]:
        """Node → models it has announced loading for longer than `load_deadline_s` allows."""
        out: dict[str, list[str]] = {}
        for (node, name), since in self.loading_since.items():
            if now - since >= load_deadline_s(sizes(name)):
                out.setdefault(node, []).append(name)
        return out


def can_spare(servers: list[tuple[int, int]]) -> bool:
    """(in flight, slots) of a model's servers: two or more, and what is in flight fits all but the largest."""
    return len(servers) >= 2 and sum(f for f, _ in servers) <= sum(sorted(s for _, s in servers)[:-1])


Look = Callable[[], tuple[assign.View, Recent]]


@dataclass
class ReplicaWatcher:
    """Watches one model this node serves unpinned until it should be released or this node moved; `run` returns
    that decision (the supervisor acts on it). `look()` gives the view and the watch's `Recent` now."""

    node_id: str
    model: str
    look: Look
    clock: Clock
    check_s: float = 2.0
    confirm_checks: int = 2
    rules: Rules = field(default_factory=Rules)
    decision: Release | Serve | Stay | None = None
    _streak: tuple[tuple[str, str] | None, int] = (None, 0)
    _said: str = ""

    async def run(self) -> Release | Serve:
        while True:
            if (done := self.check()) is not None:
                return done
            await self.clock.sleep(self.check_s)

    def decide(self, view: assign.View, recent: Recent) -> Release | Serve | Stay:
        now = self.clock.time()
        mine = next((m for m in view.members if m.node_id == self.node_id), None)
        if mine is None or not any(s.model == self.model and s.state == assign.SERVING for s in mine.served):
            return Stay((f"{self.model} is not serving here yet",))
        gone = assign.release(view, self.node_id, self.model, now, self.rules)
        if isinstance(gone, Release):
            return gone
        move = assign.rebalance(view, self.node_id, now, recent, self.rules)
        if isinstance(move, Serve) and move.replaces == self.model:
            return move
        return gone

    def check(self) -> Release | Serve | None:
        """One look; the decision once it held `confirm_checks` looks in a row, else None."""
        try:
            view, recent = self.look()
            decision = self.decide(view, recent)
        except Exception as exc:  # a watcher that died would never release: log, look again
            log.warning("replica check for %s failed (%s: %s)", self.model, type(exc).__name__, exc)
            return None
        self.decision = decision
        said = "; ".join(decision.reasons)
        if decision.kind != "stay" and said != self._said:
            log.info("%s", said)
        self._said = said if decision.kind != "stay" else ""
        if isinstance(decision, Stay):
            self._streak = (None, 0)
            return None
        want = (decision.kind, decision.model)
        count = self._streak[1] + 1 if self._streak[0] == want else 1
        self._streak = (want, count)
        return decision if count >= self.confirm_checks else None

    def status(self) -> dict[str, object]:
        d = self.decision
        return {
            "model": self.model,
            "decision": None if d is None else d.kind,
            "reasons": [] if d is None else list(d.reasons),
        }


def requested(wanted_at: float, now: float, ttl_s: float) -> bool:
    """A request named the model within the TTL (`wanted_at` 0: never requested, pinned only)."""
    return bool(wanted_at) and now - wanted_at < ttl_s


def demand_view(wanted: Iterable[tuple[str, float, float]], now: float, ttl_s: float) -> Mapping[str, Demand]:
    """The rules' demand from the map's wanted entries (name, rate, last wanted)."""
    return {name: Demand(rate, True, requested(at, now, ttl_s)) for name, rate, at in wanted}

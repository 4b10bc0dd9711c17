"""The standby runner (issue 14, items 2–3, the acting half): a node with no model watches the mesh and, when the
assignment rules say so, starts serving a model once.

Decide, then do. The pure half is here too, small: `member` maps a gossiped `NodeRecord` to `assign.Member`,
`build_view` assembles `assign.View` from the members and the providers, and `decide` picks the rule — on joining
`pick_on_join`, after that `promotion`. `decide` also keeps joiners from racing: a pick of an *unserved* model by a
standby defers to the election (`assign.elect`) that every node computes the same way, so two standbys joining
together never both load one model; a pick of an underserved model (queued on every server) stands as it is.

`StandbyRunner.run` is the actor: after the mesh is joined it looks every `CHECK_S` seconds on the injected clock,
logs the decision once each time it changes, and on a `Serve` that held for `CONFIRM_CHECKS` looks in a row calls
`promote(model, source)` once and returns (the supervisor serves the model; the node is no longer a standby). A
check that fails (a bad record, a provider that raised) is logged and the next one runs: the watcher never dies.
A `promote` that raises a `MeshLLMError` marks the model failed here (never elected for it again by this node) and
the watch goes on, so the job passes to another standby.

Timing. The decision comes at most `CONFIRM_CHECKS × CHECK_S` = 4 s after this node's membership drops the last
server (death, leaving): the check after the drop sees `Serve`, the next confirms it. The target is 10 s; the
second look costs 2 s and buys steadiness: a view seen twice 2 s apart is not a join half-gossiped or a heartbeat
at the edge of `fail_after`, which would otherwise start a multi-GB load for nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mesh_mcp.clock import Clock
from mesh_mcp.errors import MeshLLMError
from mesh_mcp.mesh.records import NodeRecord
from mesh_mcp.serving import assign
from mesh_mcp.serving.assign import Decision, Demand, Member, Recent, Rules, Serve, Served, Stay, View
from mesh_mcp.serving.replicas import Watch, load_deadline_s

log = logging.getLogger("mesh_llm.serving")

CHECK_S = 2.0  # seconds between looks: 2 looks (CONFIRM_CHECKS) = 4 s, well inside the 10 s decision target
CONFIRM_CHECKS = 2  # a Serve acted on only when this many looks in a row agree (model and source)
# Another standby elected for a model that has not announced loading it within this long is passed over: a hostile
# or broken member that always wins the election (huge claimed capacity, the file "on disk") cannot keep a wanted
# model unserved. Its own confirmation takes CONFIRM_CHECKS × CHECK_S; the margin covers gossip on a busy mesh.
ELECTED_GRACE_S = 20.0

ROLES = {"standby": assign.STANDBY, "client": assign.CLIENT, "host": assign.HOST, "worker": assign.HOST}
STATES = {"serving": assign.SERVING, "loading": assign.LOADING, "downloading": assign.LOADING, "failed": assign.FAILED}


class Membership(Protocol):
    """What the runner reads of the mesh (`mesh.runtime.Mesh` is one): the live members, this node included, and
    whether this node has joined."""

    @property
    def joined(self) -> Any: ...  # an anyio.Event

    def members(self) -> Sequence[NodeRecord]: ...


def member(record: NodeRecord, failed_here: Iterable[str] = (), overdue: Iterable[str] = ()) -> Member:
    """`record` as the rules see it. Roles: "standby", "client", "host" as named; a "worker" (lends its capacity to
    a split) is not idle, so it counts as a host. States: "downloading" and "loading" are loading intents,
    "stopped" is dropped. Records carry no per-model timestamp, so a loading intent's `since` is the record's
    `version` / 1000 (wall-clock ms of its last re-sign): an intent is fresh while its loader re-signs its record.
    `failed_here`: models this node failed to start, added as failed when `record` is this node's; `overdue`:
    models it has announced loading past their deadline (`replicas.load_deadline_s`), counted as failed. Its
    pinned models are the pins of its published demand view (its operator's `--model`)."""
    late = frozenset(overdue)
    served = [
        Served(
            m.name,
            assign.FAILED if m.name in late and STATES[m.state] == assign.LOADING else STATES[m.state],
            m.in_flight,
            m.slots or assign.DEFAULT_SLOTS,
            since=record.version / 1000,
        )
        for m in record.models_served
        if m.state in STATES
    ]
    served += [Served(name, assign.FAILED) for name in sorted(failed_here)]
    role = ROLES.get(record.role, assign.HOST)
    pins = frozenset(item[0] for item in record.demand if item[4])
    return Member(record.node_id, record.capacity_bytes, role, tuple(served), frozenset(record.models_on_disk), pins)


def build_view(
    records: Iterable[NodeRecord],
    me: str,
    demand: Mapping[str, Demand],
    sizes: Callable[[str], int | None],
    catalog: Mapping[str, int],
    failed_here: Iterable[str] = (),
    silent: Mapping[str, Iterable[str]] = {},
    overdue: Mapping[str, Iterable[str]] = {},
) -> View:
    """The view every rule reads: the members, the sizes of the demanded models (this node's measure), the demand
    and the catalog. `silent`: node id → models it was elected for and never announced loading (counted as failed
    there, so the election passes them on); `overdue`: node id → models it has been loading past their deadline."""
    failed = {me: tuple(failed_here)} | {n: tuple(models) for n, models in silent.items() if n != me}
    members = tuple(member(r, failed.get(r.node_id, ()), overdue.get(r.node_id, ())) for r in records)
    return View(members, {name: sizes(name) for name in sorted(demand)}, dict(demand), dict(catalog))


RULES = Rules()
NOTHING_RECENT = Recent()


def decide(
    view: View, me: str, now: float, joining: bool, rules: Rules = RULES, recent: Recent = NOTHING_RECENT
) -> Decision:
    """This node's decision: `pick_on_join` while joining, else `promotion`, else a replica `rebalance` gives it (a
    model queued on every server, sustained, as `recent` says). A joining standby's pick of an unserved model defers
    to the election (the same on every node): it serves what the election gives it, or stays; its pick of an
    underserved one stands only once the queue is sustained."""
    if not joining:
        won = assign.promotion(view, me, now, rules)
        if isinstance(won, Serve):
            return won
        extra = assign.rebalance(view, me, now, recent, rules)
        return extra if isinstance(extra, Serve) and extra.replaces is None else won
    pick = assign.pick_on_join(view, me, now, rules)
    mine = next((m for m in view.members if m.node_id == me), None)
    if not isinstance(pick, Serve) or mine is None or mine.role != assign.STANDBY:
        return pick
    elections = assign.elect(view, now, rules)
    if pick.model not in elections:  # underserved, not unserved: a replica for a model queued on every server
        if recent.sustained.get(pick.model):
            return pick
        return Stay(
            (
                f"staying standby: joining would add a replica of {pick.model}, queued on every server, but the "
                "queue has not lasted yet (a burst is not a trend); the replica rule watches it from here",
            )
        )
    won = assign.promotion(view, me, now, rules)
    if isinstance(won, Serve):
        return won
    winner = elections[pick.model].winner
    to = f"node {winner}" if winner else "another standby"
    return Stay(
        (
            f"staying standby: joining would serve {pick.model}, but the election every node computes gives it to "
            f"{to}, so two nodes do not load it",
            *won.reasons,
        )
    )


def describe(decision: Decision) -> str:
    """The log line for a decision: "promoting to serve X from disk: ..." or "staying standby: ..."."""
    reasons = "; ".join(decision.reasons)
    if isinstance(decision, Serve):
        reasons = re.sub(r"^promoting node \S+ to serve .+?: ", "", reasons)  # the election's own words for it
        return f"promoting to serve {decision.model} from {decision.source}: {reasons}"
    return reasons if reasons.startswith("staying standby") else f"staying standby: {reasons}"


def _shape(decision: Decision) -> tuple[str, ...]:
    """What makes two decisions the same for logging: kind, model, and the reasons without their numbers (a decaying
    demand rate changes every look; the decision does not)."""
    model = decision.model if isinstance(decision, Serve) else ""
    return (decision.kind, model, *(re.sub(r"\d+(?:\.\d+)?", "#", r) for r in decision.reasons))


@dataclass
class StandbyRunner:
    """Watches the mesh as a standby until it promotes itself (once) or is cancelled.

    `demand(now)`: the mesh's demand map (`now` is wall-clock seconds); `sizes(name)`: bytes this node needs to
    serve a model (None: unknown); `catalog()`: catalog models this node could download, name → bytes;
    `promote(model, source)`: starts serving it (the supervisor's `serve`), source "disk", "peer" or "catalog"."""

    mesh: Membership
    node_id: str
    demand: Callable[[float], Mapping[str, Demand]]
    sizes: Callable[[str], int | None]
    catalog: Callable[[], Mapping[str, int]]
    promote: Callable[[str, str], Awaitable[None]]
    clock: Clock
    check_s: float = CHECK_S
    confirm_checks: int = CONFIRM_CHECKS
    rules: Rules = field(default_factory=Rules)
    decision: Decision | None = None  # the latest, for /api/status
    promoted: tuple[str, str] | None = None  # (model, source) once promoted
    failed: set[str] = field(default_factory=set)  # models `promote` failed for here
    watch: Watch = field(default_factory=Watch)  # loads under way, queues, moves: what one view cannot say
    _joining: bool = True
    _elected: dict[tuple[str, str], float] = field(default_factory=dict)  # (other winner, model) → first seen
    _passed_over: set[tuple[str, str]] = field(default_factory=set)  # winners that never started: counted failed
    _late_logged: set[tuple[str, str]] = field(default_factory=set)  # overdue loads already logged
    _seen: tuple[str, ...] = ()
    _streak: tuple[tuple[str, str] | None, int] = (None, 0)

    async def run(self) -> None:
        """Look every `check_s` after joining; return once `promote` started a model."""
        await self.mesh.joined.wait()
        while not await self.check():
            await self.clock.sleep(self.check_s)

    def look(self) -> Decision:
        """One decision on the view now (no acting); raises whatever a provider or a bad record raises."""
        now = self.clock.time()
        demand, records, catalog = self.demand(now), self.mesh.members(), self.catalog()
        self.watch.see(records, now)
        overdue = self._overdue(now)

        def view_now() -> View:
            failed = self.failed
            return build_view(records, self.node_id, demand, self.sizes, catalog, failed, self._silent(), overdue)

        view = view_now()
        if self._note_elected(view, now):  # a winner went silent past its grace: elect again without it
            view = view_now()
        return decide(view, self.node_id, now, self._joining, self.rules, self.watch.recent(now))

    def _overdue(self, now: float) -> dict[str, list[str]]:
        """Loads announced past their deadline (logged once each): counted as failed, so the job passes on."""
        overdue = self.watch.overdue(now, self.sizes)
        for node, names in overdue.items():
            for name in names:
                if (node, name) not in self._late_logged:
                    self._late_logged.add((node, name))
                    since = self.watch.loading_since[(node, name)]
                    log.warning(
                        "node %s has announced loading %s for %.0f s, past its deadline of %.0f s: passing it over",
                        node,
                        name,
                        now - since,
                        load_deadline_s(self.sizes(name)),
                    )
        self._late_logged &= {(n, m) for n, names in overdue.items() for m in names}
        return overdue

    def _note_elected(self, view: View, now: float) -> bool:
        """Remember since when each other standby has been elected for a model without announcing it; True when one
        passed `ELECTED_GRACE_S` (first noticed now)."""
        elected = {
            (e.winner, model)
            for model, e in assign.elect(view, now, self.rules).items()
            if e.winner is not None and e.winner != self.node_id
        }
        self._elected = {key: self._elected.get(key, now) for key in elected}
        newly = {key for key, since in self._elected.items() if now - since >= ELECTED_GRACE_S} - self._passed_over
        for winner, model in sorted(newly):
            log.warning(
                "node %s was elected to serve %s %.0f s ago and has not started: passing it over",
                winner,
                model,
                now - self._elected[(winner, model)],
            )
        self._passed_over |= newly
        return bool(newly)

    def _silent(self) -> dict[str, list[str]]:
        """Node id → models it was passed over for."""
        out: dict[str, list[str]] = {}
        for winner, model in sorted(self._passed_over):
            out.setdefault(winner, []).append(model)
        return out

    async def check(self) -> bool:
        """One look, logged when it changed, acted on when confirmed; True once promoted."""
        try:
            decision = self.look()
        except Exception as exc:  # a watcher that died would leave the model unserved: log, look again
            log.warning("standby check failed (%s: %s); checking again in %g s", type(exc).__name__, exc, self.check_s)
            return False
        self.decision = decision
        if (shape := _shape(decision)) != self._seen:
            self._seen = shape
            log.info("%s", describe(decision))
        if not isinstance(decision, Serve):
            self._joining = False  # the join rule had its say: from now on, promotion
            self._streak = (None, 0)
            return False
        want = (decision.model, decision.source)
        count = self._streak[1] + 1 if self._streak[0] == want else 1
        self._streak = (want, count)
        if count < self.confirm_checks:
            return False
        try:
            await self.promote(*want)
        except MeshLLMError as exc:
            self.failed.add(decision.model)
            self._streak, self._seen = (None, 0), ()
            log.warning("promoting to serve %s failed (%s): handing the job on and watching again", want[0], exc)
            return False
        self.promoted = want
        return True

    def status(self) -> dict[str, object]:
        """What `/api/status` can show: the latest decision and its reasons."""
        d = self.decision
        return {
            "role": "standby" if self.promoted is None else "promoted",
            "decision": None if d is None else d.kind,
            "model": d.model if isinstance(d, Serve) else None,
            "reasons": [] if d is None else list(d.reasons),
            "failed": sorted(self.failed),
        }

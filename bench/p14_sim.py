"""Issue 14 at scale: the assignment rules (`serving/assign.py`) driving a simulated mesh of 200 nodes, in memory.

A discrete-time simulation, one step per standby look (`STEP_S` = `standby.CHECK_S` = 2 s). Nothing but the pure
rules decides: every step the nodes read one shared view, `lag` steps old (gossip and failure detection), and act as
the runners do — an idle node that just joined asks `pick_on_join` (a pick of an unserved model defers to
`elect`, as `standby.decide` does), an idle node after that asks `elect` (promotion) and then `plan_moves` (a replica
for a queued model), a server asks `plan_moves` (a move gives up its model). A decision is acted on once it held for
`CONFIRM` looks in a row; acting starts a load (LOADING, `load_s`: size over disk, LAN or download speed, + 3 s),
then SERVING. `Recent` is kept as a node keeps it: a model's queue is `sustained` once queued on consecutive looks
for `SUSTAIN_S`; `node_moved_at` is when a node last started serving anything; `model_moved_at` when a move or a
replica last changed a model's servers.

The world. Node capacities log-uniform over 4–80 GB, model sizes log-uniform over 0.3–40 GB, each node holds a
model that fits it on disk with probability 0.15, every model is in the catalog. Demand is Zipf-skewed over the
wanted models (`never` of them are never asked for): requests arrive as Poisson streams and each model's rate is
the demand map's own estimator (`serving/demand.py`: +`PER_REQUEST` per request, half-life `HALF_LIFE_S`; wanted
within `TTL_S`, or served). Requests in flight per model: Little's law, Poisson(rate × service time), service time
1 s + 0.5 s per GB, spread evenly over its servers (4 slots each). Churn: nodes die and fresh standbys join as
Poisson processes; at `shift_at` the demand ranking is permuted (hot models go cold, unwanted ones are wanted).

Measured: every gap (a demanded model that fits some live node with no server), from its cause (first wanted, last
server died, ranking shift) to a decision (a loader) and to serving; moves per hour (rebalancing moves: a server
gives up its model; replicas: a standby adds one), per model; flaps (a node moving A→B and back within an hour; a
model gaining a server then losing one to a move, or losing one to a move then gaining one by rebalancing, within
10 min); hysteresis violations (a node moving within `min_dwell_s` of its last start, a model changed by two moves
within `model_interval_s`); double loads (a promotion or join for a model that already had a server or loader);
demanded models unserved at the end.

    python -m bench.p14_sim                          # 200 nodes, 20 models, 2 hours, seed 1
    python -m bench.p14_sim --nodes 30 --models 6 --hours 0.33 --seed 3
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from mesh_mcp.serving import assign
from mesh_mcp.serving.assign import HOST, LOADING, SERVING, STANDBY, Demand, Member, Recent, Rules, Serve, Served, View
from mesh_mcp.serving.demand import HALF_LIFE_S, PER_REQUEST, TTL_S
from mesh_mcp.serving.replicas import SPARE_S, can_spare

GB = 10**9
STEP_S = 2.0  # standby.CHECK_S: one look per node per step
CONFIRM = 2  # standby.CONFIRM_CHECKS: a decision acted on once it held this many looks in a row
END_GRACE_S = 60.0  # at the end, a gap younger than this counts as closing, not as a model left unserved
SUSTAIN_S = 6.0  # a queue counts as sustained after consecutive looks spanning this long
SLOTS = 4
SPEED = {"disk": 1.0 * GB, "peer": 0.5 * GB, "catalog": 0.1 * GB}  # bytes/s a load reads or fetches
NODE_FLAP_S, MODEL_FLAP_S = 3600.0, 600.0


@dataclass(frozen=True)
class Config:
    nodes: int = 200
    models: int = 20
    hours: float = 2.0
    seed: int = 1
    total_rate: float = 600.0  # req/min over the whole mesh
    zipf_s: float = 1.1
    never: float = 0.3  # fraction of the models nobody asks for
    deaths_per_hour: float = 30.0
    joins_per_hour: float = 30.0
    shift_at: float | None = 0.5  # fraction of the run at which the demand ranking is permuted; None: never
    lag: int = 2  # steps the shared view lags the truth (gossip + failure detection: 4 s)
    rules: Rules = field(default_factory=Rules)
    spare_s: float = SPARE_S  # how long a donor must have been able to spare a server (serving/replicas.py)


@dataclass
class Node:
    node_id: str
    capacity: int
    on_disk: frozenset[str]
    model: str | None = None
    state: str = ""  # "" idle, LOADING, SERVING
    ready_at: float = 0.0
    joining: bool = True
    streak: tuple[tuple[str, str, str | None] | None, int] = (None, 0)


@dataclass
class Report:
    config: Config
    gaps: list[tuple[str, str, float | None, float | None]] = field(default_factory=list)  # cause, model, decide, serve
    moves: list[tuple[float, str, str, str]] = field(default_factory=list)  # t, node, from, to
    replicas: list[tuple[float, str, str]] = field(default_factory=list)  # t, node, model
    starts: dict[str, int] = field(default_factory=dict)  # how: count
    node_flaps: list[str] = field(default_factory=list)
    model_flaps: list[str] = field(default_factory=list)
    shift_flaps: list[str] = field(default_factory=list)  # model flaps with the demand shift in between
    dwell_violations: list[str] = field(default_factory=list)
    interval_violations: list[str] = field(default_factory=list)
    double_loads: list[str] = field(default_factory=list)
    all_served_at: float | None = None  # first time every demanded model that fits was served
    queued_steps: int = 0  # steps with some model queued on every server, sustained
    steps: int = 0
    unserved_end: list[str] = field(default_factory=list)
    closing_end: list[str] = field(default_factory=list)  # unserved at the end, the gap younger than END_GRACE_S
    queued_end: list[str] = field(default_factory=list)
    deaths: int = 0
    joins: int = 0
    live_end: int = 0
    servers_end: int = 0
    runtime_s: float = 0.0


def poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 30:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k, p = k + 1, p * rng.random()
    return k


class Sim:
    def __init__(self, cfg: Config) -> None:
        self.cfg, self.rng = cfg, random.Random(cfg.seed)
        rng = self.rng
        self.names = [f"model-{i:02d}" for i in range(cfg.models)]
        self.size = {n: int(math.exp(rng.uniform(math.log(0.3), math.log(40))) * GB) for n in self.names}
        wanted = rng.sample(self.names, cfg.models - round(cfg.models * cfg.never))
        self.true_rate = self._zipf(wanted)
        self.est = dict.fromkeys(self.names, 0.0)
        self.last_wanted: dict[str, float] = {}
        self.nodes: dict[str, Node] = {}
        self.serial = 0
        self.history: deque[tuple[View, frozenset[str]]] = deque(maxlen=cfg.lag + 1)
        self.queued_since: dict[str, float] = {}
        self.spare_since: dict[str, float] = {}  # as serving/replicas.py's Watch keeps it
        self.node_moved_at: dict[str, float] = {}
        self.model_moved_at: dict[str, float] = {}
        self.gained: dict[str, list[tuple[float, str]]] = {n: [] for n in self.names}  # t, how
        self.lost_by_move: dict[str, list[float]] = {n: [] for n in self.names}
        self.node_moves: dict[str, list[tuple[float, str, str]]] = {}
        self.gap: dict[str, tuple[float, str, float | None]] = {}  # model → (start, cause, decided)
        self.had_server: set[str] = set()
        self.shifted: float | None = None
        self.report = Report(cfg)
        for _ in range(cfg.nodes):
            self._join()

    def _zipf(self, wanted: list[str]) -> dict[str, float]:
        weights = [1 / (rank + 1) ** self.cfg.zipf_s for rank in range(len(wanted))]
        total = sum(weights)
        out = dict.fromkeys(self.names, 0.0)
        for name, w in zip(wanted, weights, strict=True):
            out[name] = self.cfg.total_rate * w / total
        return out

    def _join(self) -> None:
        self.serial += 1
        cap = int(math.exp(self.rng.uniform(math.log(4), math.log(80))) * GB)
        disk = frozenset(n for n in self.names if self.size[n] <= cap and self.rng.random() < 0.15)
        nid = f"n{self.serial:04d}"
        self.nodes[nid] = Node(nid, cap, disk)

    # -- the truth, and the view the nodes read -------------------------------------------------------------------

    def _demand(self, t: float) -> None:
        decay = 2.0 ** (-STEP_S / HALF_LIFE_S)
        for n in self.names:
            arrivals = poisson(self.rng, self.true_rate[n] * STEP_S / 60)
            self.est[n] = self.est[n] * decay + arrivals * PER_REQUEST
            if arrivals:
                self.last_wanted[n] = t

    def _served(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for node in self.nodes.values():
            if node.model and node.state == SERVING:
                out.setdefault(node.model, []).append(node.node_id)
        return out

    def _active(self, name: str, t: float, served: dict[str, list[str]]) -> bool:
        return name in served or t - self.last_wanted.get(name, -math.inf) <= TTL_S

    def _snapshot(self, t: float) -> tuple[View, frozenset[str]]:
        served = self._served()
        flight: dict[str, int] = {}
        queued = set()
        for name, ids in served.items():
            total = poisson(self.rng, self.true_rate[name] / 60 * (1 + 0.5 * self.size[name] / GB))
            for i, nid in enumerate(sorted(ids, key=lambda _: self.rng.random())):
                flight[nid] = total // len(ids) + (i < total % len(ids))
            if all(flight[nid] > SLOTS for nid in ids):
                queued.add(name)
        members = []
        for node in sorted(self.nodes.values(), key=lambda n: n.node_id):
            served_t: tuple[Served, ...] = ()
            if node.model and node.state:
                served_t = (Served(node.model, node.state, flight.get(node.node_id, 0), SLOTS, since=t),)
            role = HOST if node.state else STANDBY
            members.append(Member(node.node_id, node.capacity, role, served_t, node.on_disk))
        demand = {n: Demand(self.est[n], True) for n in self.names if self._active(n, t, served)}
        return View(tuple(members), dict(self.size), demand, dict(self.size)), frozenset(queued)

    # -- one step ---------------------------------------------------------------------------------------------------

    def step(self, t: float) -> None:
        cfg, rep = self.cfg, self.report
        p_death, p_join = cfg.deaths_per_hour * STEP_S / 3600, cfg.joins_per_hour * STEP_S / 3600
        for _ in range(poisson(self.rng, p_death)):
            if self.nodes:
                victim = self.rng.choice(sorted(self.nodes))
                del self.nodes[victim]
                rep.deaths += 1
        for _ in range(poisson(self.rng, p_join)):
            self._join()
            rep.joins += 1
        if cfg.shift_at is not None and t == round(cfg.shift_at * cfg.hours * 3600 / STEP_S) * STEP_S:
            wanted = list(self.names)
            self.rng.shuffle(wanted)
            self.true_rate = self._zipf(wanted[: sum(1 for r in self.true_rate.values() if r)])
            self.shifted = t
        self._demand(t)
        for node in self.nodes.values():
            if node.state == LOADING and node.ready_at <= t:
                node.state = SERVING
        self.history.append(self._snapshot(t))
        view, queued = self.history[0]
        for name in self.names:
            if name not in queued:
                self.queued_since.pop(name, None)
            else:
                self.queued_since.setdefault(name, t)
        sustained = {n: t - since >= SUSTAIN_S for n, since in self.queued_since.items()}
        servers: dict[str, list[tuple[int, int]]] = {}
        for m in view.members:
            for s in m.served:
                if s.state == SERVING:
                    servers.setdefault(s.model, []).append((s.in_flight, s.slots))
        spare = {name for name, srv in servers.items() if can_spare(srv)}
        self.spare_since = {name: self.spare_since.get(name, t) for name in sorted(spare)}
        recent = Recent(
            sustained,
            dict(self.node_moved_at),
            dict(self.model_moved_at),
            {n: t - since >= cfg.spare_s for n, since in self.spare_since.items()},
        )
        self._decide(view, t, recent)
        self._measure(t, sustained)

    def _decide(self, view: View, t: float, recent: Recent) -> None:
        in_view = {m.node_id for m in view.members}
        elections = assign.elect(view, t, self.cfg.rules)
        won = {e.winner: e.model for e in elections.values() if e.winner}
        moves = {mv.node_id: mv for mv in assign.plan_moves(view, t, recent, self.cfg.rules)}
        source = {m.node_id: m for m in view.members}
        for nid in sorted(self.nodes):
            node = self.nodes[nid]
            if nid not in in_view or node.state == LOADING:
                continue  # not joined yet (not in its own view), or busy loading
            want: tuple[str, str, str | None] | None = None
            how = ""
            if not node.model and node.joining:
                pick = assign.pick_on_join(view, nid, t, self.cfg.rules)
                if isinstance(pick, Serve) and pick.model not in elections and recent.sustained.get(pick.model):
                    want, how = (pick.model, pick.source, None), "join (underserved)"
                elif isinstance(pick, Serve) and nid in won:
                    want, how = (won[nid], self._source(source[nid], won[nid]), None), "join (elected)"
                else:
                    node.joining = False  # the join rule had its say (standby.StandbyRunner.check)
            elif not node.model and nid in won:
                want, how = (won[nid], self._source(source[nid], won[nid]), None), "promotion"
            if want is None and nid in moves:
                mv = moves[nid]
                if mv.replaces == (node.model if node.state == SERVING else None):
                    want, how = (mv.model, mv.source, mv.replaces), "move" if mv.replaces else "replica"
            count = node.streak[1] + 1 if want is not None and node.streak[0] == want else 1
            node.streak = (want, count) if want is not None else (None, 0)
            if want is not None and count >= CONFIRM:
                self._act(node, want, how, t)

    def _source(self, member: Member, name: str) -> str:
        return "disk" if name in member.on_disk else "catalog"

    def _act(self, node: Node, want: tuple[str, str, str | None], how: str, t: float) -> None:
        model, source, gives = want
        rep = self.report
        if how in ("promotion", "join (elected)") and any(
            n.model == model and n.state for n in self.nodes.values() if n is not node
        ):
            rep.double_loads.append(f"t={t:.0f} s: node {node.node_id} loads {model} ({how}), already served/loading")
        if how in ("move", "replica"):
            for name in (model, gives) if gives else (model,):
                last = self.model_moved_at.get(name)
                if last is not None and t - last < self.cfg.rules.model_interval_s:
                    rep.interval_violations.append(f"t={t:.0f} s: {name} changed by moves {t - last:.0f} s apart")
                self.model_moved_at[name] = t
            last_start = self.node_moved_at.get(node.node_id)
            if last_start is not None and t - last_start < self.cfg.rules.min_dwell_s:
                rep.dwell_violations.append(f"t={t:.0f} s: node {node.node_id} moves {t - last_start:.0f} s after")
        if gives:
            rep.moves.append((t, node.node_id, gives, model))
            self.lost_by_move[gives].append(t)
            for t0, how0 in self.gained[gives]:
                if t - t0 <= MODEL_FLAP_S:
                    line = f"{gives} gained a server ({how0}) at {t0:.0f} s, lost one to a move at {t:.0f} s"
                    self._flap(t0, t, line)
            history = self.node_moves.setdefault(node.node_id, [])
            for t0, a, b in history:
                if (a, b) == (model, gives) and t - t0 <= NODE_FLAP_S:
                    rep.node_flaps.append(f"node {node.node_id}: {a}→{b} at {t0:.0f} s, back at {t:.0f} s")
            history.append((t, gives, model))
        elif how == "replica":
            rep.replicas.append((t, node.node_id, model))
        if how in ("move", "replica"):
            for t0 in self.lost_by_move[model]:
                if t - t0 <= MODEL_FLAP_S:
                    self._flap(t0, t, f"{model} lost a server to a move at {t0:.0f} s, gained one ({how}) at {t:.0f} s")
        self.gained[model].append((t, how))
        rep.starts[how] = rep.starts.get(how, 0) + 1
        node.model, node.state, node.joining, node.streak = model, LOADING, False, (None, 0)
        speed = SPEED["peer" if source == "peer" else source] if source in SPEED else SPEED["catalog"]
        node.ready_at = t + 3.0 + self.size[model] / speed
        self.node_moved_at[node.node_id] = t

    def _flap(self, t0: float, t: float, line: str) -> None:
        """A model flap, counted apart when the demand ranking shifted in between (then the reverse is the point)."""
        if self.shifted is not None and t0 <= self.shifted <= t:
            self.report.shift_flaps.append(line + " (across the demand shift)")
        else:
            self.report.model_flaps.append(line)

    # -- measuring ----------------------------------------------------------------------------------------------------

    def _measure(self, t: float, sustained: dict[str, bool]) -> None:
        rep = self.report
        rep.steps += 1
        rep.queued_steps += any(sustained.values())
        served = self._served()
        loading = {n.model for n in self.nodes.values() if n.state == LOADING}
        biggest = max((n.capacity for n in self.nodes.values()), default=0)
        for name in self.names:
            need = self._active(name, t, served) and self.size[name] <= biggest
            if need and name not in served and name not in self.gap:
                cause = "died" if name in self.had_server else "shift" if self.shifted == t else "wanted"
                self.gap[name] = (t, cause, None)
            if name in self.gap:
                start, cause, decided = self.gap[name]
                if decided is None and name in loading:
                    self.gap[name] = (start, cause, t)
                if name in served or not need:
                    rep.gaps.append((cause, name, None if decided is None else decided - start, t - start))
                    del self.gap[name]
        self.had_server = set(served)
        if (
            rep.all_served_at is None
            and not self.gap
            and all(self._active(n, t, served) for n in self.names if self.true_rate[n] > 0)
        ):
            rep.all_served_at = t

    def run(self) -> Report:
        began = time.process_time()
        steps = round(self.cfg.hours * 3600 / STEP_S)
        t = 0.0
        for i in range(steps):
            t = i * STEP_S
            self.step(t)
        rep = self.report
        # A gap that opened in the last minute (a server died just before the end) is still being closed.
        rep.unserved_end = sorted(n for n, (start, _, _) in self.gap.items() if t - start > END_GRACE_S)
        rep.closing_end = sorted(n for n, (start, _, _) in self.gap.items() if t - start <= END_GRACE_S)
        rep.queued_end = sorted(self.queued_since)
        rep.live_end = len(self.nodes)
        rep.servers_end = sum(1 for n in self.nodes.values() if n.state)
        rep.runtime_s = time.process_time() - began
        return rep


def simulate(cfg: Config) -> Report:
    return Sim(cfg).run()


def _dist(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):.0f} / {max(values):.0f} s (n={len(values)})"


def table(rep: Report) -> str:
    c, hours = rep.config, rep.config.hours
    lines = [
        f"{c.nodes} nodes, {c.models} models ({c.models - round(c.models * c.never)} wanted, Zipf s={c.zipf_s}, "
        f"{c.total_rate:g} req/min), {hours:g} h, seed {c.seed}, view lag {c.lag * STEP_S:g} s; "
        f"churn {rep.deaths} deaths, {rep.joins} joins; demand shift at {c.shift_at} of the run",
        f"  all demanded models served after      {rep.all_served_at} s",
    ]
    for cause in ("wanted", "died", "shift"):
        gaps = [g for g in rep.gaps if g[0] == cause]
        decided = [g[2] for g in gaps if g[2] is not None]
        served = [g[3] for g in gaps if g[3] is not None]
        lines.append(f"  gap '{cause}': decision {_dist(decided):22s} serving {_dist(served)}")
    per_model: dict[str, int] = {}
    for _, _, a, b in rep.moves:
        for name in (a, b):
            per_model[name] = per_model.get(name, 0) + 1
    busiest = max(per_model.values(), default=0)
    lines += [
        f"  moves (server gives up its model)    {len(rep.moves)} = {len(rep.moves) / hours:.1f}/h; "
        f"most on one model {busiest} = {busiest / hours:.1f}/h",
        f"  replicas added by standbys           {len(rep.replicas)} = {len(rep.replicas) / hours:.1f}/h",
        f"  starts by rule                       {dict(sorted(rep.starts.items()))}",
        f"  flaps: node A→B→A ≤ 1 h              {len(rep.node_flaps)}",
        f"  flaps: model gain/lose ≤ 10 min      {len(rep.model_flaps)} (+ {len(rep.shift_flaps)} across the shift)",
        f"  hysteresis violations dwell/interval {len(rep.dwell_violations)} / {len(rep.interval_violations)}",
        f"  double loads                         {len(rep.double_loads)}",
        f"  time with a model queued (sustained) {100 * rep.queued_steps / max(1, rep.steps):.1f} %",
        f"  at the end: {rep.live_end} nodes, {rep.servers_end} serving/loading; demanded unserved "
        f"{rep.unserved_end or 'none'} (closing: {rep.closing_end or 'none'}); queued {rep.queued_end or 'none'}",
        f"  simulation CPU time                  {rep.runtime_s:.1f} s",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=600.0, help="req/min over the mesh")
    ap.add_argument("--deaths", type=float, default=30.0, help="node deaths per hour")
    ap.add_argument("--joins", type=float, default=30.0, help="standbys joining per hour")
    ap.add_argument("--lag", type=int, default=2, help="steps (2 s) the view lags the truth")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every flap and violation")
    args = ap.parse_args()
    cfg = Config(
        args.nodes,
        args.models,
        args.hours,
        args.seed,
        args.rate,
        deaths_per_hour=args.deaths,
        joins_per_hour=args.joins,
        lag=args.lag,
    )
    rep = simulate(cfg)
    print(table(rep))
    if args.verbose:
        for line in [
            *rep.node_flaps,
            *rep.model_flaps,
            *rep.shift_flaps,
            *rep.dwell_violations,
            *rep.interval_violations,
            *rep.double_loads,
        ]:
            print("   ", line)


if __name__ == "__main__":
    main()

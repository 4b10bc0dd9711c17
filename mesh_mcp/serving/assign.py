"""Which model each node serves: the mesh's assignment rules (issue 14), pure functions over the gossiped view.

Every node runs the same three rules on the same `View` (members, model sizes, demand, the catalog) and `now`, and
reads off its own line, so nodes agree without talking: the view is sorted before use and every tie is broken by
`_rank(node id, model)` (a sha256), never by list order.

- `pick_on_join`: a node with no model takes, in order, an unserved demanded model on its disk that fits; the most
  underserved model; an unserved demanded model it can fetch (catalog or a peer's disk); else it stays standby and
  says why. Within the unserved tiers every model is equally urgent (nobody can answer it), so the rendezvous hash
  alone picks — nodes joining together spread over them.
- `promotion` (via `elect`): each demanded model with no server and no fresh "loading" intent gets exactly one
  standby, the best by (on disk, headroom, hash); models in order of demand, a standby wins at most one. An intent
  with no progress for `Rules.loading_stale_s` is void and its node is no longer a candidate (a standby that fails
  to load hands the job on); a node that announced "failed" for a model is not elected for it again.
- `rebalance` (via `plan_moves`): a demanded model with no server that no idle standby can hold takes a spare
  server of another model; a model queued beyond the slots of every server, sustained, gets one more replica
  (a standby, else a server of a model that can spare one); a model whose demand per server is ≥ `hot_ratio` × the
  coldest's and ≥ `hot_min_rate` pulls a server from the coldest. Hysteresis: a node moves at most once per
  `min_dwell_s`, a model gains or loses at most one server per `model_interval_s`, and a donor model must keep a
  server and not queue after giving one up, and have been able to spare it for a while (`Recent.spare`); a model
  that could spare a server is never the hot one (another server buys it nothing); a server its operator pinned
  (`--model`) is never a donor.
- `release`: a server of a model it was not asked to serve (a promotion or a replica) gives it up once no request
  named the model for the demand TTL and another server keeps it: an operator's pinned server first, else the
  unpinned server with the highest hash, so exactly one stays.

Only models that fit one node solo are assigned here (as replicas); a model that fits no single node is the split
planner's (`plan.decide`). No I/O, no clock: the caller passes `now` and acts on the decision.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

SERVING, LOADING, FAILED = "serving", "loading", "failed"
STANDBY, HOST, CLIENT = "standby", "host", "client"
DEFAULT_SLOTS = 4  # a server's request slots when its record does not say (llama-server's --parallel default here)


@dataclass(frozen=True)
class Served:
    """One model a member announces: serving (with requests in flight over `slots`), loading, or failed."""

    model: str
    state: str  # SERVING | LOADING | FAILED
    in_flight: int = 0
    slots: int = DEFAULT_SLOTS  # requests the server runs at once (llama-server's parallel slots)
    since: float = 0.0  # LOADING: when the loader last gossiped progress (wall clock, the loader's)


@dataclass(frozen=True)
class Member:
    node_id: str
    capacity_bytes: int  # what the node can give one model (a server's includes the model it serves)
    role: str = STANDBY  # HOST | STANDBY | CLIENT
    served: tuple[Served, ...] = ()
    on_disk: frozenset[str] = frozenset()
    pinned: frozenset[str] = frozenset()  # models its operator asked for (--model): never released or moved


@dataclass(frozen=True)
class Demand:
    rate: float  # requests per minute (decaying)
    active: bool  # wanted within its TTL (or pinned by a --model)
    requested: bool = True  # a request named it within its TTL (a pin alone does not count)


@dataclass(frozen=True)
class View:
    members: tuple[Member, ...]
    sizes: Mapping[str, int | None]  # bytes a model needs with this node's settings; None: unknown
    demand: Mapping[str, Demand]
    catalog: Mapping[str, int] = field(default_factory=dict)  # catalog models that fit somewhere: name → bytes


@dataclass(frozen=True)
class Rules:
    loading_stale_s: float = 90.0  # a loader refreshes its intent at least every 30 s; three misses void it
    hot_ratio: float = 3.0  # > 2 makes a move never trigger its own reverse (see rebalance)
    hot_min_rate: float = 10.0  # req/min per server: below this nobody waits, so a move buys nothing
    min_dwell_s: float = 600.0  # a node serves what it moved to at least this long (a load costs ~minutes)
    model_interval_s: float = 120.0  # one server gained or lost per model per interval: demand re-settles first


@dataclass(frozen=True)
class Recent:
    """What rebalancing remembers between rounds (the caller keeps it): which models' queues lasted (`sustained`),
    when each node last moved and when each model last gained or lost a server (wall clock)."""

    sustained: Mapping[str, bool] = field(default_factory=dict)
    node_moved_at: Mapping[str, float] = field(default_factory=dict)
    model_moved_at: Mapping[str, float] = field(default_factory=dict)
    # Models that could spare a server on every look for a while (None: not tracked, every snapshot counts): a donor
    # judged on one noisy snapshot of in-flight requests gives a server up, queues again, and gets it back — a flap.
    spare: Mapping[str, bool] | None = None


@dataclass(frozen=True)
class Serve:
    """This node should serve `model`, fetched from `source` ("disk", "peer" or "catalog")."""

    model: str
    source: str
    reasons: tuple[str, ...]
    replaces: str | None = None  # the model it stops serving (a rebalancing move)
    kind: str = field(default="serve", init=False)


@dataclass(frozen=True)
class Stay:
    reasons: tuple[str, ...]
    kind: str = field(default="stay", init=False)


@dataclass(frozen=True)
class Move:
    node_id: str
    model: str
    source: str
    replaces: str | None
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Release:
    """This node should stop serving `model` and be a standby again."""

    model: str
    reasons: tuple[str, ...]
    kind: str = field(default="release", init=False)


Decision = Serve | Stay


def _rank(node_id: str, model: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{node_id}\x00{model}".encode()).digest()[:8], "big")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


@dataclass(frozen=True)
class _Model:
    """What the view says about one model: its servers, its fresh and stale loaders, who failed it."""

    servers: tuple[tuple[str, Served], ...] = ()
    loaders: tuple[tuple[str, Served], ...] = ()
    stale: tuple[tuple[str, Served], ...] = ()
    failed: frozenset[str] = frozenset()

    @property
    def queued(self) -> int:
        """Requests waiting beyond slots, summed; 0 unless *every* server has a queue (the router sends each request
        to the server with the fewest in flight, so a free slot anywhere means nobody waits for long)."""
        if not self.servers or any(s.in_flight <= s.slots for _, s in self.servers):
            return 0
        return sum(s.in_flight - s.slots for _, s in self.servers)

    def can_spare(self) -> bool:
        """Two servers or more, and what is in flight fits the slots of all but one."""
        if len(self.servers) < 2:
            return False
        slots = sorted(s.slots for _, s in self.servers)[1:]  # losing the largest server, the worst case
        return sum(s.in_flight for _, s in self.servers) <= sum(slots)


class _Facts:
    """The view, sorted and indexed once: members by id, each model's servers and loaders, the models some node holds
    (on disk or serving: a server has the file), sizes, sources."""

    def __init__(self, view: View, now: float, rules: Rules) -> None:
        self.view, self.now, self.rules = view, now, rules
        self.members = {m.node_id: m for m in sorted(view.members, key=lambda m: m.node_id)}
        acc: dict[str, dict[str, list[tuple[str, Served]]]] = {}
        self.models: dict[str, _Model] = {}
        for m in self.members.values():
            for s in sorted(m.served, key=lambda s: (s.model, s.state)):
                kind = s.state if s.state != LOADING or now - s.since < rules.loading_stale_s else "stale"
                acc.setdefault(s.model, {}).setdefault(kind, []).append((m.node_id, s))
        self.held = {n for m in self.members.values() for n in m.on_disk} | {n for n, m in acc.items() if SERVING in m}
        for name, d in acc.items():
            got = [tuple(d.get(k, [])) for k in (SERVING, LOADING, "stale", FAILED)]
            self.models[name] = _Model(got[0], got[1], got[2], frozenset(n for n, _ in got[3]))

    def model(self, name: str) -> _Model:
        return self.models.get(name, _Model())

    def size(self, name: str) -> int | None:
        size = self.view.sizes.get(name)
        return size if size is not None else self.view.catalog.get(name)

    def rate(self, name: str) -> float:
        d = self.view.demand.get(name)
        return d.rate if d is not None and d.active else 0.0

    def demanded(self) -> list[str]:
        return sorted(name for name, d in self.view.demand.items() if d.active)

    def unserved(self, name: str) -> bool:
        m = self.model(name)
        return not m.servers and not m.loaders

    def source(self, node_id: str, name: str) -> str | None:
        if name in self.members[node_id].on_disk:
            return "disk"
        if name in self.held:
            return "peer"
        return "catalog" if name in self.view.catalog else None

    def standbys(self, name: str) -> list[str]:
        """Idle standbys (serving and loading nothing) that can fetch and hold `name` and did not fail it, best first:
        on disk, then the most headroom, then the hash."""
        ok = [
            nid
            for nid, m in self.members.items()
            if m.role == STANDBY
            and not any(s.state in (SERVING, LOADING) for s in m.served)
            and nid not in self.model(name).failed
            and self.fit(nid, name) is None
            and self.source(nid, name)
        ]
        size = self.size(name) or 0

        def key(n: str) -> tuple[bool, int, int]:
            return self.source(n, name) == "disk", self.members[n].capacity_bytes - size, _rank(n, name)

        return sorted(ok, key=key, reverse=True)

    def fit(self, node_id: str, name: str) -> str | None:
        """None when `name` fits this node solo, else why not (a sentence)."""
        size, cap = self.size(name), self.members[node_id].capacity_bytes
        if size is None:
            return f"{name}'s size is not known (no GGUF facts or catalog entry), so its fit cannot be checked"
        if size > cap:
            return f"{name} needs {_gb(size)} and node {node_id} offers {_gb(cap)}"
        return None

    def load(self, name: str) -> float:
        """Demand per server, req/min."""
        return self.rate(name) / max(1, len(self.model(name).servers))

    def rested(self, node_id: str, moved_at: Mapping[str, float]) -> bool:
        return self.now - moved_at.get(node_id, float("-inf")) >= self.rules.min_dwell_s

    def settled(self, name: str, model_moved_at: Mapping[str, float]) -> bool:
        return self.now - model_moved_at.get(name, float("-inf")) >= self.rules.model_interval_s


def _facts_line(f: _Facts, node_id: str, name: str, source: str) -> str:
    m, size = f.model(name), f.size(name) or 0
    where = {"disk": "on disk", "peer": "fetched from a peer", "catalog": "downloaded from the catalog"}[source]
    return (
        f"{len(m.servers)} server(s), demand {f.rate(name):.1f} req/min, {where}, "
        f"fits {_gb(size)} of {_gb(f.members[node_id].capacity_bytes)}"
    )


def pick_on_join(view: View, me: str, now: float, rules: Rules = Rules()) -> Decision:
    """What node `me` (in `view`, serving nothing yet) serves on joining, or Stay and why."""
    f = _Facts(view, now, rules)
    if me not in f.members:
        return Stay((f"node {me} is not in the view yet: staying standby until gossip lists it",))
    if f.members[me].role == CLIENT:
        return Stay(("a client: this node serves no model",))
    misfits: list[str] = []

    def fits(name: str) -> bool:
        why = f.fit(me, name)
        if why is None and not f.source(me, name):
            why = f"{name} is on no node's disk and not in the catalog, so this node cannot fetch it"
        if why is not None:
            misfits.append(why)
        return why is None

    wanted = [n for n in f.demanded() if f.unserved(n) or (f.model(n).queued and not f.model(n).loaders)]
    usable = [n for n in wanted if me not in f.model(n).failed and fits(n)]
    unserved = [n for n in usable if f.unserved(n)]
    on_disk = sorted((n for n in unserved if f.source(me, n) == "disk"), key=lambda n: -_rank(me, n))
    under = sorted(
        (n for n in usable if f.model(n).queued and not f.model(n).loaders),
        key=lambda n: (-f.model(n).queued, -_rank(me, n)),
    )
    fetch = sorted((n for n in unserved if f.source(me, n) != "disk"), key=lambda n: -_rank(me, n))
    tiers = (
        ("an unserved demanded model on this node's disk", on_disk),
        ("the most underserved model: every server has requests queued beyond its slots", under),
        ("an unserved demanded model this node can fetch", fetch),
    )
    for rule, names in tiers:
        if names:
            name, source = names[0], f.source(me, names[0]) or ""
            reasons = [f"joining to serve {name} ({rule}): {_facts_line(f, me, name, source)}"]
            if names is under:
                reasons.append(f"{f.model(name).queued} requests are queued beyond the slots of its servers")
            elif len(names) > 1:
                others = ", ".join(names[1:4])
                reasons.append(f"picked over {others} by the join hash, so nodes joining together spread out")
            return Serve(name, source, tuple(reasons))
    want = f.demanded()
    why = (
        f"staying standby: {len(want)} demanded model(s), none unserved or queued that this node can serve"
        if want
        else "staying standby: the mesh wants no model yet"
    )
    cap = f.members[me].capacity_bytes
    return Stay((f"{why}; lending {_gb(cap)} to splits", *sorted(set(misfits))[:3]))


@dataclass(frozen=True)
class Election:
    model: str
    winner: str | None
    reasons: tuple[str, ...]


def elect(view: View, now: float, rules: Rules = Rules()) -> dict[str, Election]:
    """Every demanded model that needs a server, and the one standby elected to load it (None when none can)."""
    f = _Facts(view, now, rules)
    needed = sorted((n for n in f.demanded() if f.unserved(n)), key=lambda n: (-f.rate(n), n))
    taken: set[str] = set()
    out: dict[str, Election] = {}
    for name in needed:
        m = f.model(name)
        notes = [
            f"node {nid} announced loading {name} {now - s.since:.0f} s ago with no progress since "
            f"(more than {rules.loading_stale_s:.0f} s): handing the job on"
            for nid, s in m.stale
        ]
        notes += [f"node {nid} failed to load {name}: handing the job on" for nid in sorted(m.failed)]
        size = f.size(name)
        cands = [n for n in f.standbys(name) if n not in taken]
        if not cands:
            why = "no idle standby can hold it" if size is None else f"no idle standby can fetch and hold {_gb(size)}"
            head = f"{name} has demand {f.rate(name):.1f} req/min and 0 servers: {why}"
            out[name] = Election(name, None, (head, *notes))
            continue
        win = cands[0]
        taken.add(win)
        line = f"promoting node {win} to serve {name}: {_facts_line(f, win, name, f.source(win, name) or '')}"
        tail = f"elected over {len(cands) - 1} other standby(s) by (on disk, headroom, hash)" if len(cands) > 1 else ""
        out[name] = Election(name, win, (line, *([tail] if tail else []), *notes))
    return out


def promotion(view: View, me: str, now: float, rules: Rules = Rules()) -> Decision:
    """Whether standby `me` should start serving an unserved demanded model now (the election's answer for it)."""
    elections = elect(view, now, rules)
    for e in elections.values():
        if e.winner == me:
            f = _Facts(view, now, rules)
            return Serve(e.model, f.source(me, e.model) or "", e.reasons)
    if not elections:
        f = _Facts(view, now, rules)
        loading = [f"{n} (node {f.model(n).loaders[0][0]})" for n in f.demanded() if f.model(n).loaders]
        base = "not promoting: every demanded model has a server"
        return Stay((base + (f" or a loader: {', '.join(loading)}" if loading else ""),))
    lost = [f"{e.model} goes to node {e.winner}" if e.winner else e.reasons[0] for e in elections.values()]
    return Stay((f"not promoting: {'; '.join(lost)}",))


def _hotter(hot: float, cold: float, rules: Rules) -> bool:
    return hot >= rules.hot_min_rate and hot >= rules.hot_ratio * cold


def plan_moves(view: View, now: float, recent: Recent = Recent(), rules: Rules = Rules()) -> tuple[Move, ...]:
    """The mesh's rebalancing moves this round: replicas for models queued on every server (sustained), then nodes
    pulled from the coldest model to the hottest. Each node and each model takes part in at most one move."""
    f = _Facts(view, now, rules)
    moved_at, model_moved_at = recent.node_moved_at, recent.model_moved_at
    used: set[str] = set()
    touched: set[str] = set()
    moves: list[Move] = []
    served = sorted(n for n, m in f.models.items() if m.servers)

    def free(nid: str, to: str) -> bool:
        return nid not in used and f.rested(nid, moved_at) and f.fit(nid, to) is None and bool(f.source(nid, to))

    def donors(to: str, after_to: float) -> Iterable[tuple[str, str]]:
        """(node, model it gives up) that could serve `to`, best first: spare servers of the coldest models."""
        out = []
        for d in served:
            md = f.model(d)
            if d == to or d in touched or not f.settled(d, model_moved_at) or not md.can_spare():
                continue
            if recent.spare is not None and not recent.spare.get(d):
                continue  # spare in this snapshot, not for long enough
            if _hotter(f.rate(d) / (len(md.servers) - 1), after_to, rules):
                continue  # the donor would become the hot one: the reverse move would follow
            for nid, s in md.servers:
                if free(nid, to) and d not in f.members[nid].pinned:  # an operator's --model never moves
                    key = (f.load(d), s.in_flight, f.source(nid, to) != "disk", -_rank(nid, to))
                    out.append((key, nid, d))
        return [(nid, d) for _, nid, d in sorted(out)]

    def add(nid: str, to: str, gives: str | None, why: str) -> None:
        used.add(nid)
        touched.update({to} | ({gives} if gives else set()))
        source = f.source(nid, to) or ""
        line = f"{why}: {_facts_line(f, nid, to, source)}"
        if gives:
            line += f"; giving up {gives} ({len(f.model(gives).servers)} servers, {f.load(gives):.1f} req/min each)"
        moves.append(Move(nid, to, source, gives, (f"node {nid} {line}",)))

    stranded = [n for n in f.demanded() if f.unserved(n) and f.rate(n) > 0 and not f.standbys(n)]
    for to in sorted(stranded, key=lambda n: (-f.rate(n), n)):  # no idle standby can hold it: a spare server can
        if to in touched or not f.settled(to, model_moved_at):
            continue
        for nid, gives in donors(to, f.rate(to)):
            add(nid, to, gives, f"serves {to}, demanded with no server, which no idle standby can hold")
            break

    queued = [n for n in served if f.model(n).queued and recent.sustained.get(n) and f.rate(n) > 0]
    for to in sorted(queued, key=lambda n: (-f.model(n).queued, n)):
        m = f.model(to)
        if to in touched or m.loaders or not f.settled(to, model_moved_at):
            continue
        why = f"adds a replica of {to} ({m.queued} requests queued beyond the slots of all {len(m.servers)} servers)"
        standbys = [n for n in f.standbys(to) if free(n, to)]
        if standbys:
            add(standbys[0], to, None, why)
            continue
        for nid, gives in donors(to, f.rate(to) / (len(m.servers) + 1)):
            add(nid, to, gives, why)
            break

    while True:  # hotness: per-server demand, the hottest against the coldest that can spare a server
        hot = [n for n in served if n not in touched and f.settled(n, model_moved_at) and not f.model(n).loaders]
        if not hot:
            break
        to = max(hot, key=lambda n: (f.load(n), n))
        after = f.rate(to) / (len(f.model(to).servers) + 1)
        pick = next(((nid, d) for nid, d in donors(to, after) if _hotter(f.load(to), f.load(d), rules)), None)
        if pick is None:
            break
        nid, gives = pick
        add(nid, to, gives, f"moves to {to}, {f.load(to):.1f} req/min per server, ≥ {rules.hot_ratio:g}× {gives}'s")
    return tuple(moves)


def rebalance(view: View, me: str, now: float, recent: Recent = Recent(), rules: Rules = Rules()) -> Decision:
    """This node's part of `plan_moves`: Serve (with `replaces` when it gives a model up) or Stay."""
    moves = plan_moves(view, now, recent, rules)
    for mv in moves:
        if mv.node_id == me:
            return Serve(mv.model, mv.source, mv.reasons, mv.replaces)
    if moves:
        return Stay((f"not moving: this round's {len(moves)} move(s) fall to other nodes",))
    return Stay(("not moving: no model is queued on every server or hot enough to pull a node",))


def release(view: View, me: str, model: str, now: float, rules: Rules = Rules()) -> Release | Stay:
    """Whether node `me`, serving `model` unpinned (it promoted itself or added a replica), should give it up: no
    request named it within the demand TTL and another server keeps it — one its operator pinned, else the unpinned
    server with the highest `_rank`, so exactly one server stays. A replica of a model still wanted stays."""
    f = _Facts(view, now, rules)
    d = view.demand.get(model)
    if d is not None and d.requested:
        return Stay((f"keeping {model}: requests still name it ({d.rate:.1f} req/min within the demand TTL)",))
    busy = sum(s.in_flight for nid, s in f.model(model).servers if nid == me)
    if busy:
        return Stay((f"keeping {model}: {busy} request(s) in flight here",))
    servers = [nid for nid, _ in f.model(model).servers]
    others = [nid for nid in servers if nid != me]
    if not others:
        return Stay((f"keeping {model}: no request for it within the demand TTL, but this node is its only server",))
    pinned = [nid for nid in servers if model in f.members[nid].pinned]
    if pinned:
        keeper = pinned[0]
        why = f"node {keeper} was started to serve it"
    else:
        keeper = max(servers, key=lambda nid: _rank(nid, model))
        why = f"node {keeper} keeps it (the replicas' hash picks one)"
    if keeper == me:
        return Stay((f"keeping {model}: no request for it within the demand TTL; this node is the replica that stays",))
    return Release(
        model,
        (
            f"releasing {model}: no request named it within the demand TTL and it has {len(servers)} servers; {why}, "
            "so this node is a standby again",
        ),
    )

"""Blackboard propagation at 100 nodes, on simulated time, with the real blackboard code.

Every node is a real `Mesh` (membership gossip, liveness pings, authenticated connections) on
`mesh_mcp.testing.MemoryNetwork`, carrying a real `Board` over an in-memory SQLite `Store`, linked by
the real `BoardLink` (eager push and the anti-entropy sync of blackboard/sync.py). Time is a `FakeClock`:
each pair of nodes gets a one-way latency drawn uniformly from `--latency` (ms) and each write on a
stream is lost with probability `--loss` (memnet's model: a lost write fails its whole stream both
ways, which is harsher than QUIC, where a lost packet is sent again).

Two things differ from a node process, both because the fake clock cannot see into a worker thread:
`SimBoard` runs the store and the scrubber in the event loop instead of worker threads, and charges
each call's measured duration (or nothing, with `--cpu zero`) to the simulated clock while it holds
that node's lock, as a node would be busy for that long. `Board.run` (its hourly expiry) is not
started. The scrubber is the real one (`--scrubber real`: built once, ~2 s, and shared, since one
per node would take minutes and gigabytes) or none (`--scrubber none`: posts pass unchanged).

Measured, after membership converged and a quiet minute:

- propagation: `--posts` posts are written at `--rate` per second mesh-wide, each on a random node,
  each with a unique word; a post's time is from the call to `Board.post` until the last node stored
  it (stored is searchable: the store commits before it returns); p50 / p99 / max over posts, and
  over single deliveries. After the run every node is searched for every post's word.
- traffic: bytes and streams (messages) sent, per node and second, on `bb` (eager push), `bb-sync`
  (anti-entropy) and the mesh's own streams, counted on the memnet links: while idle and while posting.

    python -m bench.blackboard_prop --nodes 100 --posts 200 --loss 0.01 --latency 10-50 [--write]
    python -m bench.blackboard_prop --nodes 20 --posts 20 --scrubber none   # a quick look

`--write` replaces the block between the blackboard_prop markers in bench/BLACKBOARD.md.
"""

from __future__ import annotations

import argparse
import contextvars
import datetime
import logging
import math
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blackboard.board import Board, Scrubs
from blackboard.post import Post
from blackboard.scrub import Scrubbed
from blackboard.store import Store
from mesh_mcp.mesh import meshfile, tokens
from mesh_mcp.mesh.board_link import BoardLink
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.mesh.runtime import Mesh, MeshSettings
from mesh_mcp.state import NodeState
from mesh_mcp.testing import FakeClock, MemoryConnection, MemoryNetwork, settle

REPORT = Path(__file__).resolve().parent / "BLACKBOARD.md"
BEGIN, END = "<!-- blackboard_prop results: begin -->", "<!-- blackboard_prop results: end -->"
QUANTUM_S = 0.001  # the simulation's time resolution: sleepers due within 1 ms of each other wake together
KINDS = ("bb", "bb-sync")  # the blackboard's streams; all others count as the mesh's
_HEADER = re.compile(rb'"t":"([\w-]{1,32})"')
_via_push: contextvars.ContextVar[bool] = contextvars.ContextVar("via_push", default=False)

WORDS = (
    "refactor billing tests fail on the arm64 runner cache miss llama.cpp build layer split offload rpc "
    "worker quantized model gguf tokenizer context window throughput latency regression fixed merged branch "
    "review deploy rollback config timeout retry queue shard replica gossip membership digest sync"
).split()


# --- the network, counted ------------------------------------------------------------------------------


class CountingNetwork(MemoryNetwork):
    """A `MemoryNetwork` that counts, per stream type and node, the bytes and writes it carries and the
    streams opened (a stream's type is the `t` of the header its opener writes first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kinds: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self.bytes: Counter[tuple[str, str]] = Counter()  # (sending node, kind) -> bytes
        self.writes: Counter[tuple[str, str]] = Counter()
        self.streams: Counter[tuple[str, str]] = Counter()  # (opening node, kind) -> streams

    def carry(self, src: MemoryConnection, end: Any, item: bytes | None) -> None:
        kind = self._kinds.get(end)
        if kind is None:
            match = _HEADER.search(item[:64]) if item else None
            kind = _group(match.group(1).decode() if match else "?")
            self._kinds[end] = kind
            if end.twin is not None:
                self._kinds[end.twin] = kind
            self.streams[src.node_id, kind] += 1
        if self.reachable(src.node_id, end.conn.node_id):
            self.bytes[src.node_id, kind] += len(item or b"")
            self.writes[src.node_id, kind] += 1
        super().carry(src, end, item)

    def snapshot(self) -> tuple[Counter[tuple[str, str]], ...]:
        return Counter(self.bytes), Counter(self.writes), Counter(self.streams)


def _group(kind: str) -> str:
    return kind if kind in KINDS else "mesh"


# --- the board, on simulated time ----------------------------------------------------------------------


class NoScrub:
    """Posts pass unchanged (`--scrubber none`)."""

    def scrub(self, text: str) -> Scrubbed:
        return Scrubbed(text, ())


class SimBoard(Board):
    """The real `Board`, with its blocking calls run in the event loop and their duration charged to the
    fake clock (see the module docstring)."""

    def __init__(self, *args: Any, sleep: Callable[[float], Any], charge: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sleep, self.charge = sleep, charge
        self._busy = anyio.Lock()  # the node's scrubber: one call at a time (blackboard.scrub.Scrubber's lock)

    async def _timed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.charge:
            await self._sleep(time.perf_counter() - start)
        return out

    async def _store(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async with self._lock:
            return await self._timed(fn, *args, **kwargs)

    async def _scrub(self, text: str) -> Any:
        async with self._busy:
            return await self._timed(self._load_scrubber().scrub, text)


# --- the simulation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    nodes: int = 100
    posts: int = 200
    rate: float = 1.0  # posts per second, mesh-wide
    loss: float = 0.01
    latency_ms: tuple[float, float] = (10.0, 50.0)
    size: int = 1024  # bytes of text per post
    idle_s: float = 60.0  # the quiet window measured for idle traffic
    converge_s: float = 300.0  # bound on membership convergence (simulated)
    drain_s: float = 120.0  # bound on the last post reaching everyone after the last is written
    scrubber: str = "none"  # real | none
    charge_cpu: bool = True
    seed: int = 1


@dataclass
class Traffic:
    seconds: float
    bytes: dict[str, list[float]]  # kind -> per node: bytes sent + received per second
    streams: dict[str, float]  # kind -> streams opened per node per second (mean)
    writes: dict[str, float]  # kind -> writes sent per node per second (mean)


@dataclass
class Result:
    config: Config
    all_nodes_s: list[float]  # per post: until the last node stored it
    deliveries_s: list[float]  # per (post, node other than its origin)
    via_push: int
    via_sync: int
    searched: int  # (node, post) pairs found by a search for the post's word
    missing: int  # (node, post) pairs never stored
    converge_s: float
    idle: Traffic  # before any post
    posting: Traffic
    stored: Traffic  # idle again, every post stored everywhere
    member_subscriptions: int = 0  # (node, member) pairs subscribed as if the member were a client, after start
    wall: dict[str, float] = field(default_factory=dict)
    scrubber_s: float = 0.0


def _traffic(
    before: tuple[Counter[tuple[str, str]], ...],
    after: tuple[Counter[tuple[str, str]], ...],
    nodes: list[str],
    seconds: float,
) -> Traffic:
    sent = after[0] - before[0]
    writes, streams = after[1] - before[1], after[2] - before[2]
    n = len(nodes)
    total_sent = {k: sum(v for (_, kk), v in sent.items() if kk == k) for k in (*KINDS, "mesh")}
    per_node: dict[str, list[float]] = {}
    for kind in (*KINDS, "mesh"):
        # received ≈ an even share of what all sent (the links are symmetric on average); sent is exact
        per_node[kind] = [(sent[node, kind] + total_sent[kind] / n) / seconds for node in nodes]
    return Traffic(
        seconds,
        per_node,
        {k: sum(v for (_, kk), v in streams.items() if kk == k) / n / seconds for k in (*KINDS, "mesh")},
        {k: sum(v for (_, kk), v in writes.items() if kk == k) / n / seconds for k in (*KINDS, "mesh")},
    )


async def advance(clock: FakeClock, seconds: float | None = None, until: Callable[[], bool] | None = None) -> float:
    """Move the fake clock from one sleeper's deadline to the next (at least `QUANTUM_S`), letting every task
    run between steps, for `seconds` or until `until()` holds; the simulated seconds it took. TimeoutError
    when `until` has not held after `seconds`."""
    start = clock.monotonic()
    end = start + (seconds if seconds is not None else math.inf)
    await settle()
    while not (until is not None and until()):
        now = clock.monotonic()
        if now >= end - 1e-9:
            if until is not None:
                raise TimeoutError(f"not within {seconds:g} simulated s")
            break
        due = clock.next_deadline()
        clock.advance(min(max(due if due is not None else QUANTUM_S, QUANTUM_S), end - now))
        await settle()
    return clock.monotonic() - start


def post_text(i: int, size: int, rng: random.Random) -> tuple[str, str]:
    """A post of about `size` bytes with a word found in no other post."""
    word = f"probe{i:05d}q{rng.randrange(16**6):06x}"
    text = f"STATUS: {word}"
    while len(text) < size - 12:
        text += " " + rng.choice(WORDS)
    return text, word


def _started(status: anyio.abc.TaskStatus[Any], value: Any) -> anyio.abc.TaskStatus[None]:
    class Status:
        def started(self, _: Any = None) -> None:
            status.started(value)

    return Status()


async def simulate(cfg: Config, home: Path, log: Callable[[str], None] = lambda _: None) -> Result:
    """Build the mesh, let it settle, post, and measure (see the module docstring)."""
    rng = random.Random(cfg.seed)
    clock = FakeClock()
    network = CountingNetwork(clock, latency_s=cfg.latency_ms[0] / 1000, loss=cfg.loss, seed=cfg.seed)
    wall: dict[str, float] = {}
    t_wall = time.perf_counter()
    scrubber: Scrubs = NoScrub()
    scrubber_s = 0.0
    if cfg.scrubber == "real":
        from blackboard.scrub import default_scrubber

        scrubber = default_scrubber()
        scrubber_s = time.perf_counter() - t_wall

    idents = [load_or_create(home / f"n{i}") for i in range(cfg.nodes)]
    ids = [ident.node_id for ident in idents]
    lo, hi = cfg.latency_ms
    for a in range(cfg.nodes):
        for b in range(a + 1, cfg.nodes):
            network.set_link(ids[a], ids[b], latency_s=rng.uniform(lo, hi) / 1000)

    def make_mesh(i: int, config: meshfile.MeshConfig, joins: tuple[tokens.InviteToken, ...]) -> Mesh:
        state = NodeState(node_id=ids[i], name=f"n{i}", version="0", api_url="", console_url="")
        settings = MeshSettings(host="127.0.0.1", joins=joins)
        return Mesh(idents[i], config, home / f"n{i}", state, settings, clock=clock, transport=network.transport)

    stored: dict[str, dict[str, float]] = {}  # post id -> node id -> simulated time it was stored there
    pushed = Counter[bool]()

    def board_for(i: int, mesh: Mesh) -> tuple[SimBoard, BoardLink]:
        board = SimBoard(
            Store(":memory:"),
            idents[i].key,
            ids[i],
            default_author=f"agent-{i}",
            scrubber=lambda: scrubber,
            clock=clock.time,
            sleep=clock.sleep,
            charge=cfg.charge_cpu,
        )
        link = BoardLink(mesh, board)
        link._rng = random.Random(cfg.seed * 1000 + i)  # reproducible push targets
        accepted = board.on_accept
        assert accepted is not None

        def on_accept(post: Post, sender: str | None) -> None:
            stored.setdefault(post.id, {})[ids[i]] = clock.monotonic()
            if sender is not None:
                pushed[_via_push.get()] += 1
            accepted(post, sender)

        board.on_accept = on_accept
        push = mesh.transport.handlers["bb"]

        async def on_push(*args: Any) -> None:
            _via_push.set(True)  # this handler's task: its on_accept calls were pushes
            await push(*args)

        mesh.transport.handlers["bb"] = on_push
        return board, link

    async with anyio.create_task_group() as tg:

        async def start(mesh: Mesh) -> None:
            async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                await mesh.run(task_status=_started(task_status, None))

            await tg.start(run)

        first = make_mesh(0, meshfile.create(owner=idents[0].public_bytes), ())
        await start(first)
        token = tokens.decode(first.invite_token())
        meshes = [first] + [make_mesh(i, meshfile.from_token(token), (token,)) for i in range(1, cfg.nodes)]
        boards: list[SimBoard] = []
        links: list[BoardLink] = []
        for i, mesh in enumerate(meshes):
            board, link = board_for(i, mesh)
            boards.append(board)
            links.append(link)
            if i:
                await start(mesh)
            tg.start_soon(link.run)
        wall["setup"] = time.perf_counter() - t_wall
        everyone = set(ids)
        t = time.perf_counter()
        converge_s = await advance(
            clock, cfg.converge_s, lambda: all({r.node_id for r in m.members()} == everyone for m in meshes)
        )
        wall["converge"] = time.perf_counter() - t
        log(f"membership converged in {converge_s:.1f} simulated s ({wall['converge']:.0f} s wall)")

        t = time.perf_counter()
        await advance(clock, 10.0)  # every board link's first syncs with every member
        # members a board link took for clients carrying the blackboard (see the report): pushed every post
        subscribed = sum(sum(1 for s in link._subscribers if s in everyone) for link in links)
        before = network.snapshot()
        await advance(clock, cfg.idle_s)
        idle = _traffic(before, network.snapshot(), ids, cfg.idle_s)
        wall["idle"] = time.perf_counter() - t
        log(f"idle window done ({wall['idle']:.0f} s wall)")

        written: list[tuple[Post, str, float]] = []  # (post, its word, simulated time written)
        failures: list[str] = []

        async def poster() -> None:
            for i in range(cfg.posts):
                text, word = post_text(i, cfg.size, rng)
                at = clock.monotonic()
                try:
                    post = await boards[rng.randrange(cfg.nodes)].post(text, source=f"client-{i % 50}")
                except Exception as exc:  # reported, and the run fails below
                    failures.append(repr(exc))
                else:
                    written.append((post, word, at))
                await clock.sleep(1 / cfg.rate)

        t = time.perf_counter()
        before = network.snapshot()
        start_posting = clock.monotonic()
        tg.start_soon(poster)
        await advance(clock, cfg.posts / cfg.rate)
        posting = _traffic(before, network.snapshot(), ids, clock.monotonic() - start_posting)

        def complete() -> bool:
            return len(written) + len(failures) == cfg.posts and all(
                len(stored.get(post.id, ())) == cfg.nodes for post, _, _ in written
            )

        try:
            await advance(clock, cfg.drain_s, complete)
        except TimeoutError:
            log(f"not every post reached every node within {cfg.drain_s:g} s after the last was written")
        wall["posting"] = time.perf_counter() - t
        log(f"posting and drain done ({wall['posting']:.0f} s wall)")
        t = time.perf_counter()
        before = network.snapshot()
        await advance(clock, cfg.idle_s)
        stored_idle = _traffic(before, network.snapshot(), ids, cfg.idle_s)
        wall["idle"] += time.perf_counter() - t
        if failures:
            raise RuntimeError(f"{len(failures)} post(s) failed on their origin: {failures[:3]}")

        t = time.perf_counter()
        found: list[int] = []

        async def search_all() -> None:
            hits = 0
            for board in boards:
                for post, word, _ in written:
                    hits += post.id in {p.id for p in await board.search(word, limit=5)}
            found.append(hits)

        tg.start_soon(search_all)  # while the mesh runs on: a board's lock may be held by a call charging time
        await advance(clock, 3600.0, lambda: bool(found))
        searched = found[0]
        wall["search"] = time.perf_counter() - t
        tg.cancel_scope.cancel()
    for board in boards:
        board.store.close()

    all_nodes: list[float] = []
    deliveries: list[float] = []
    missing = 0
    for post, _, at in written:
        times = stored.get(post.id, {})
        missing += cfg.nodes - len(times)
        if len(times) == cfg.nodes:
            all_nodes.append(max(times.values()) - at)
        deliveries.extend(v - at for node, v in times.items() if node != post.origin)
    wall["total"] = time.perf_counter() - t_wall
    return Result(
        cfg,
        all_nodes,
        deliveries,
        via_push=pushed[True],
        via_sync=pushed[False],
        searched=searched,
        missing=missing,
        converge_s=converge_s,
        idle=idle,
        posting=posting,
        stored=stored_idle,
        member_subscriptions=subscribed,
        wall=wall,
        scrubber_s=scrubber_s,
    )


# --- the report ----------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _ms(v: float) -> str:
    return "—" if math.isnan(v) else f"{v * 1000:,.0f} ms"


def _kb(v: float) -> str:
    return f"{v / 1024:,.2f} KiB/s" if v < 1 << 20 else f"{v / (1 << 20):,.2f} MiB/s"


def report(result: Result, command: str, load: str) -> str:
    cfg = result.config
    cpu = "measured call times charged to the simulated clock" if cfg.charge_cpu else "store and scrub take no time"
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"Command: `{command}` ({when}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {load} at start, Python {platform.python_version()}).",
        "",
        f"{cfg.nodes} nodes, {cfg.posts} posts of ~{cfg.size} B at {cfg.rate:g}/s mesh-wide on random nodes, "
        f"per-link one-way latency uniform {cfg.latency_ms[0]:g}–{cfg.latency_ms[1]:g} ms, "
        f"{cfg.loss:.0%} of writes lost (the stream fails), scrubber: {cfg.scrubber} ({cpu}); "
        f"membership converged in {result.converge_s:.1f} simulated s.",
        "",
        "| post → stored and searchable | p50 | p90 | p99 | max |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in (("on all nodes (per post)", result.all_nodes_s), ("per delivery", result.deliveries_s)):
        lines.append(
            f"| {name} | {_ms(pct(values, 50))} | {_ms(pct(values, 90))} | {_ms(pct(values, 99))} | "
            f"{_ms(max(values) if values else math.nan)} |"
        )
    lines += [
        "",
        f"Deliveries: {result.via_push:,} by eager push, {result.via_sync:,} by anti-entropy sync; "
        f"{result.missing} (node, post) pairs never stored; a search for each post's word on every node found "
        f"{result.searched:,} of {cfg.nodes * cfg.posts:,}. Ten seconds after membership converged, "
        f"{result.member_subscriptions:,} (node, member) pairs were subscriptions of a member as a client "
        "(`BoardLink._on_sync`: the sync came before membership listed the sender; each lasts 30 s).",
        "",
        "Traffic per node (sent + received; streams and writes sent), from the memnet links' counters:",
        "",
        "| window | stream | bytes/s mean | bytes/s max node | streams/s | writes/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, traffic in (
        (f"idle, {result.idle.seconds:g} s", result.idle),
        (f"posting, {result.posting.seconds:g} s", result.posting),
        (f"idle after, {result.stored.seconds:g} s", result.stored),
    ):
        for kind, label in (
            ("bb", "`bb` push"),
            ("bb-sync", "`bb-sync` anti-entropy"),
            ("mesh", "mesh (gossip, ping)"),
        ):
            per = traffic.bytes[kind]
            lines.append(
                f"| {name} | {label} | {_kb(statistics.fmean(per))} | {_kb(max(per))} | "
                f"{traffic.streams[kind]:.2f} | {traffic.writes[kind]:.2f} |"
            )
    w = result.wall
    lines += [
        "",
        f"Wall time: {w.get('total', 0):.0f} s in all — set-up {w.get('setup', 0):.1f} s"
        + (f" (the scrubber {result.scrubber_s:.1f} s of it)" if cfg.scrubber == "real" else "")
        + f", membership {w.get('converge', 0):.0f} s, idle windows {w.get('idle', 0):.0f} s, "
        f"posting and drain {w.get('posting', 0):.0f} s, "
        f"{cfg.nodes * cfg.posts:,} searches {w.get('search', 0):.1f} s.",
    ]
    return "\n".join(lines)


def write(section: str) -> None:
    text = REPORT.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n## Propagation at 100 nodes (simulated)\n\n" + block + "\n"
    REPORT.write_text(text, encoding="utf-8")


def _range(value: str) -> tuple[float, float]:
    lo, _, hi = value.partition("-")
    return float(lo), float(hi or lo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--posts", type=int, default=200)
    parser.add_argument("--rate", type=float, default=1.0, help="posts per second, mesh-wide (default 1)")
    parser.add_argument("--loss", type=float, default=0.01, help="probability that a write is lost (default 0.01)")
    parser.add_argument("--latency", type=_range, default=(10.0, 50.0), help="one-way ms per link, LO-HI")
    parser.add_argument("--size", type=int, default=1024, help="bytes of text per post (default 1024)")
    parser.add_argument("--idle", type=float, default=60.0, help="simulated seconds of the idle window")
    parser.add_argument("--scrubber", choices=("real", "none"), default="real")
    parser.add_argument("--cpu", choices=("measured", "zero"), default="measured", help="store/scrub time charged")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="replace the results in bench/BLACKBOARD.md")
    args = parser.parse_args()
    cfg = Config(
        nodes=args.nodes,
        posts=args.posts,
        rate=args.rate,
        loss=args.loss,
        latency_ms=args.latency,
        size=args.size,
        idle_s=args.idle,
        scrubber=args.scrubber,
        charge_cpu=args.cpu == "measured",
        seed=args.seed,
    )
    logging.basicConfig(level=logging.ERROR)
    load = f"{os.getloadavg()[0]:.1f}"
    command = "python -m bench.blackboard_prop " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        result = anyio.run(simulate, cfg, Path(tmp), lambda m: print(m, file=sys.stderr, flush=True))
    section = report(result, command, load)
    print(section)
    if args.write:
        write(section)


if __name__ == "__main__":
    main()

"""Speculation pays or it goes: the on/off decision for one served model, a pure function of measured windows.

The modes are `off` (no speculation) and the model's candidates (`inference/speculation.py`: a draft model, n-gram
lookup). A *round* measures every mode in turn, each for a window of at least `min_tokens` generated tokens and at
least `dwell_s` seconds (from llama-server's own counters: tokens over the seconds spent generating them, drafts
proposed and accepted); then the fastest is chosen — a speculating mode only when it beats `off` by `margin`, so
a tie or a loss leaves speculation off. The first round starts at launch (the node feeds it calibration prompts);
later rounds, on live traffic only, come `recheck_s` after a decision, doubling up to `recheck_max_s` while the
decision holds, so a changed workload (longer code edits, another RTT) is noticed and a settled one costs little.

A mode, once entered, is held at least `dwell_s` (every switch waits for the current window to be complete): the
controller never flaps faster than that. The actor that restarts llama-server in the mode chosen here, reads
its counters and feeds the calibration is `serving/speculate.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

OFF = "off"


@dataclass(frozen=True)
class Window:
    """What one mode measured: generated tokens, the seconds spent generating them, draft tokens proposed and
    accepted."""

    tokens: float = 0.0
    seconds: float = 0.0
    drafted: float = 0.0
    accepted: float = 0.0

    def __add__(self, other: Window) -> Window:
        return Window(
            self.tokens + other.tokens,
            self.seconds + other.seconds,
            self.drafted + other.drafted,
            self.accepted + other.accepted,
        )

    @property
    def tok_s(self) -> float | None:
        return self.tokens / self.seconds if self.tokens > 0 and self.seconds > 0 else None

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted > 0 else None


@dataclass(frozen=True)
class Policy:
    dwell_s: float = 20.0  # a mode is held at least this long
    min_tokens: int = 160  # a window holds at least this many generated tokens
    margin: float = 0.03  # a speculating mode is kept only when at least this much faster than off
    recheck_s: float = 1800.0  # a decision is measured again this long after it was made ...
    recheck_max_s: float = 4 * 3600.0  # ... doubling while it holds, up to this


@dataclass(frozen=True)
class Control:
    modes: tuple[str, ...]  # OFF first, then the candidates
    current: str
    entered_at: float
    open: Window = Window()  # what the current mode measured since it was entered
    measured: Mapping[str, Window] = field(default_factory=lambda: MappingProxyType({}))  # the latest complete
    measuring: bool = True  # a round runs: the current mode is measured, then `todo`, then a decision
    todo: tuple[str, ...] = ()  # modes this round has still to measure (after the current one)
    chosen: str | None = None  # the last round's decision; None before the first ends
    reason: str = "calibrating"
    basis: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))  # tok/s the decision was made on
    recheck_at: float | None = None
    recheck_every: float = 0.0
    switches: int = 0
    failed: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # modes that could not start


def start(candidates: tuple[str, ...], now: float, policy: Policy = Policy()) -> Control:
    """A controller for a model with these candidate modes: a first round begins with `off`."""
    modes = (OFF, *[c for c in candidates if c != OFF])
    return Control(modes, OFF, now, todo=modes[1:], recheck_every=policy.recheck_s)


def forced(mode: str, now: float) -> Control:
    """`mode` on for good, never measured against off (MESH_LLM_SPEC_FORCE: benchmarks of fixed modes)."""
    return Control((OFF, mode), mode, now, measuring=False, chosen=mode, reason="on: forced (MESH_LLM_SPEC_FORCE=1)")


def observe(c: Control, delta: Window) -> Control:
    """Counters the current mode's server moved by since the last look."""
    return replace(c, open=c.open + delta)


def complete(c: Control, now: float, policy: Policy) -> bool:
    """The current mode's window holds enough tokens and the mode was held its dwell time."""
    return c.open.tokens >= policy.min_tokens and now - c.entered_at >= policy.dwell_s


def step(c: Control, now: float, policy: Policy = Policy()) -> tuple[Control, str | None]:
    """The controller after a look at `now`, and the mode to switch to (None: stay)."""
    if not c.measuring:
        if c.recheck_at is None or now < c.recheck_at:
            return c, None
        # A recheck: what the chosen mode measured since it was entered stands for it; the others are measured again.
        measured = dict(c.measured)
        if c.open.tokens >= policy.min_tokens:
            measured[c.current] = c.open
        others = tuple(m for m in c.modes if m != c.current)
        if not others:
            return replace(c, recheck_at=None), None
        c = replace(c, measured=MappingProxyType(measured), measuring=True, reason="re-measuring", recheck_at=None)
        return _enter(c, others[0], now, others[1:]), others[0]
    if not complete(c, now, policy):
        return c, None
    c = replace(c, measured=MappingProxyType({**c.measured, c.current: c.open}))
    if c.todo:
        return _enter(c, c.todo[0], now, c.todo[1:]), c.todo[0]
    c = _decided(c, now, policy)
    if c.chosen == c.current or c.chosen is None:
        return c, None
    return _enter(c, c.chosen, now, ()), c.chosen


def _decided(c: Control, now: float, policy: Policy, why: str = "") -> Control:
    chosen, reason = decide(c.measured, c.modes, policy.margin)
    every = min(c.recheck_every * 2, policy.recheck_max_s) if chosen == c.chosen else policy.recheck_s
    basis = {m: round(t, 2) for m, w in c.measured.items() if m in c.modes and (t := w.tok_s) is not None}
    return replace(
        c,
        chosen=chosen,
        reason=why + reason,
        basis=MappingProxyType(basis),
        measuring=False,
        todo=(),
        recheck_at=now + every,
        recheck_every=every,
    )


def fail(c: Control, mode: str, why: str, now: float, policy: Policy = Policy()) -> tuple[Control, str]:
    """`mode` could not start (its llama-server exited before it was ready): it is left out for good, and the
    controller goes on with the next mode of the round, or with the decision the round makes without it."""
    failed = {**c.failed, mode: why}
    modes = tuple(m for m in c.modes if m != mode)
    todo = tuple(m for m in c.todo if m != mode)
    c = replace(c, modes=modes, todo=todo, failed=MappingProxyType(failed), reason=f"{mode} failed: {why}")
    if todo:
        return _enter(c, todo[0], now, todo[1:]), todo[0]
    if c.measuring or c.chosen == mode:  # the round's last mode, or the mode it chose: decide without it
        c = _decided(c, now, policy, f"{mode} failed: {why}; ")
    nxt = c.chosen if c.chosen in modes else OFF
    return _enter(c, nxt, now, ()), nxt


def decide(measured: Mapping[str, Window], modes: tuple[str, ...], margin: float) -> tuple[str, str]:
    """The mode to keep, and why: the fastest, a speculating one only when `margin` faster than off."""
    base = measured.get(OFF)
    base_tok_s = base.tok_s if base is not None else None
    best, best_tok_s = OFF, base_tok_s
    for mode in modes:
        w = measured.get(mode)
        if mode == OFF or w is None or w.tok_s is None:
            continue
        if best_tok_s is None or w.tok_s > best_tok_s:
            best, best_tok_s = mode, w.tok_s
    if best == OFF or base_tok_s is None or best_tok_s is None:
        return OFF, _why_off(measured, modes, base_tok_s)
    gain = best_tok_s / base_tok_s
    if gain < 1 + margin:
        return OFF, _why_off(measured, modes, base_tok_s)
    acc = measured[best].acceptance
    accepted = f", {acc:.0%} of drafts accepted" if acc is not None else ""
    return best, f"on: {best} {best_tok_s:.1f} tok/s vs {base_tok_s:.1f} off ({gain:.2f}x{accepted})"


def _why_off(measured: Mapping[str, Window], modes: tuple[str, ...], base: float | None) -> str:
    if base is None:
        return "off: not measured"
    parts = [
        f"{m} {measured[m].tok_s:.1f}" for m in modes if m != OFF and m in measured and measured[m].tok_s is not None
    ]
    return f"off: {base:.1f} tok/s without speculation" + (f", {', '.join(parts)} with" if parts else "")


def _enter(c: Control, mode: str, now: float, todo: tuple[str, ...]) -> Control:
    return replace(c, current=mode, entered_at=now, open=Window(), todo=todo, switches=c.switches + 1)


def off_status(why: str, candidates: tuple[str, ...] = ()) -> dict[str, Any]:
    """The `/api/status` `speculation` of a model not (or not yet) measured: off, and why."""
    return {"mode": OFF, "on": False, "candidates": list(candidates), "chosen": None, "why": why}


def status(c: Control) -> dict[str, Any]:
    """The controller as `/api/status` shows it (the model's `speculation`)."""
    windows = {**c.measured}
    if c.open.tokens > 0:
        windows[c.current] = c.open
    return {
        "mode": c.current,
        "on": c.current != OFF,
        "candidates": list(c.modes[1:]),
        "chosen": c.chosen,
        "why": c.reason,
        "decided_on": dict(c.basis),  # tokens/s per mode the last decision compared
        "measuring": [c.current, *c.todo] if c.measuring else [],
        "tok_s": {m: round(w.tok_s, 2) for m, w in windows.items() if w.tok_s is not None},
        "acceptance": {m: round(a, 3) for m, w in windows.items() if (a := w.acceptance) is not None},
        "switches": c.switches,
        "failed": dict(c.failed),
    }

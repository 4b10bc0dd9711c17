"""Fuzz every wire parser with many inputs: the properties of tests/security/test_fuzz_wire.py (shared in
tests/security/fuzz_wire_props.py) run with `--total` examples spread over them, crashes counted instead of
stopping at the first. Prints inputs tried, accepted, rejected and crashes per parser, and the first crash
of each kind.

    python -m bench.fuzz_wire --total 200000
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings

from tests.security import fuzz_wire_props as fz


def run(name: str, examples: int, crashes: dict[str, Counter[str]], first: dict[str, str]) -> None:
    prop = fz.PROPS[name]

    def body(case: Any) -> None:
        try:
            prop.fn(case)
        except Exception as exc:  # every exception a property lets out is a crash: count it, go on
            crashes.setdefault(name, Counter())[type(exc).__name__] += 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            kind = f"{name}: {type(exc).__name__} at {Path(where.filename).name}:{where.lineno}"
            if kind not in first:
                first[kind] = f"{kind}: {str(exc)[:200]}\n  input: {case!r:.300}"

    given(prop.strategy)(
        settings(
            max_examples=examples,
            database=None,
            derandomize=True,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )(body)
    )()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total", type=int, default=200_000, help="examples over all parsers (in proportion to CI's)")
    ap.add_argument("--only", nargs="*", help="property names (default: all)")
    args = ap.parse_args()
    names = args.only or list(fz.PROPS)
    weight = sum(fz.PROPS[n].examples for n in names)
    crashes: dict[str, Counter[str]] = {}
    first: dict[str, str] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as home:
        peer = fz.DataPlanePeer(Path(home))
        with peer.running():
            fz.set_dataplane_peer(peer)
            for name in names:
                n = max(1, args.total * fz.PROPS[name].examples // weight)
                t0 = time.perf_counter()
                run(name, n, crashes, first)
                print(f"{name:16} {n:7} examples in {time.perf_counter() - t0:6.1f} s", flush=True)
            fz.set_dataplane_peer(None)
    print()
    total = sum(sum(c.values()) for c in fz.STATS.values())
    print(f"{'parser':40} {'inputs':>8} {'accepted':>9} {'rejected':>9}")
    for parser, counts in sorted(fz.STATS.items()):
        print(f"{parser:40} {sum(counts.values()):8} {counts['accepted']:9} {counts['rejected']:9}")
    print(f"{'all':40} {total:8}   ({time.perf_counter() - started:.0f} s)")
    print()
    for name in names:
        found = crashes.get(name, Counter())
        known = f"   known: {fz.PROPS[name].known_crash}" if fz.PROPS[name].known_crash else ""
        print(f"crashes in {name:16} {sum(found.values()):6} {dict(found) if found else ''}{known}")
    for text in first.values():
        print("\n" + text)


if __name__ == "__main__":
    main()

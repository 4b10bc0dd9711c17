"""Recall and precision of blackboard/scrub.py per category, on tests/data/scrub_quality.jsonl (and the older
tests/data/pii_labelled.jsonl).

- recall per labelled category: a labelled value counts as caught when one finding covers it (whatever the
  finding's entity: what matters is that it does not reach another node), and as leaked when it is still in the
  scrubbed text;
- precision per entity found: a finding is true when it overlaps a labelled value;
- false findings per 100 KiB of negatives (rows with nothing labelled), by where they were cut from: Python
  from site-packages, C/C++ from the llama.cpp source, Rust's standard library, real logs (llama-server,
  rpc-server, cmake, pytest, pip, git log, xxd/od dumps, package-lock.json, ps/ls) and hand-written hard cases;
- with `--detect-secrets`, Yelp's detect-secrets (if installed) on the same rows, for the unlabelled-secret
  category: as it scans files (quoted strings, its default plugins and filters) and eagerly (every word, its
  high-entropy limits), with its time per post next to the scrubber's own unlabelled rules.

`--write` replaces this script's block in bench/BLACKBOARD.md; `--show` lists every miss and false finding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blackboard.scrub import Scrubber  # noqa: E402
from blackboard.scrub_rules import UNLABELLED_RULES, rule_findings  # noqa: E402

QUALITY = ROOT / "tests" / "data" / "scrub_quality.jsonl"
PII = ROOT / "tests" / "data" / "pii_labelled.jsonl"
REPORT = ROOT / "bench" / "BLACKBOARD.md"
BEGIN, END = "<!-- scrub_quality results: begin -->", "<!-- scrub_quality results: end -->"

Row = tuple[str, list[tuple[str, str]], str]  # text, [(entity, value)], source


def load(path: Path, default_source: str) -> list[Row]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            entities = [(e["entity"], e["value"]) for e in r["entities"]]
            rows.append((r["text"], entities, r.get("source", default_source)))
    return rows


def spans_of(text: str, value: str) -> list[tuple[int, int]]:
    spans, at = [], text.find(value)
    while at >= 0:
        spans.append((at, at + len(value)))
        at = text.find(value, at + 1)
    return spans


def kind(source: str) -> str:
    return source.split(":", 1)[0]


def evaluate(scrub: Callable[[str], tuple[str, list[tuple[str, int, int]]]], rows: list[Row]) -> dict[str, object]:
    """Per-category recall and leaks, per-entity precision, false findings per kind of negative."""
    recall: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # caught, labelled, leaked
    precision: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # true, found
    negatives: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # rows, bytes, false findings
    misses: list[tuple[str, str, str]] = []
    false: list[tuple[str, str, str]] = []
    for text, entities, source in rows:
        out, findings = scrub(text)
        labelled = []
        for entity, value in entities:
            occ = spans_of(text, value)
            labelled += occ
            hit = any(s <= a and b <= e for _, s, e in findings for a, b in occ)
            counts = recall[entity]
            counts[0] += hit
            counts[1] += 1
            counts[2] += value in out and entity != "HOME_PATH"  # a user name may recur in other words
            if not hit:
                misses.append((entity, value, text[:160]))
        for entity, s, e in findings:
            true = any(a < e and s < b for a, b in labelled)
            precision[entity][0] += true
            precision[entity][1] += 1
            if not true:
                false.append((entity, text[s:e], source))
        if not entities:
            neg = negatives[kind(source)]
            neg[0] += 1
            neg[1] += len(text.encode())
            neg[2] += len(findings)
    return {
        "recall": dict(recall),
        "precision": dict(precision),
        "negatives": dict(negatives),
        "misses": misses,
        "false": false,
    }


def scrubber_fn(scrubber: Scrubber) -> Callable[[str], tuple[str, list[tuple[str, int, int]]]]:
    def run(text: str) -> tuple[str, list[tuple[str, int, int]]]:
        result = scrubber.scrub(text)
        return result.text, [(f.entity, f.start, f.end) for f in result.findings]

    return run


def detect_secrets_fns() -> dict[str, Callable[[str], tuple[str, list[tuple[str, int, int]]]]]:
    """detect-secrets as it scans files (per line: quoted strings, default plugins and filters) and eagerly (every
    run of its charsets, with its high-entropy limits and its heuristic filters). Findings are located by value."""
    from detect_secrets.core import scan
    from detect_secrets.core.potential_secret import PotentialSecret
    from detect_secrets.settings import default_settings

    def locate(text: str, values: Iterable[str]) -> tuple[str, list[tuple[str, int, int]]]:
        spans = sorted({(a, b) for v in values if v for a, b in spans_of(text, v)})
        out = text
        for v in sorted({v for v in values if v}, key=len, reverse=True):
            out = out.replace(v, "<SECRET>")
        return out, [("SECRET", a, b) for a, b in spans]

    def as_files(text: str) -> tuple[str, list[tuple[str, int, int]]]:
        values: list[str] = []
        with default_settings():
            lines = text.splitlines()
            for n, line in enumerate(lines, 1):
                context = scan.get_code_snippet(lines=lines, line_number=n)
                for plugin in scan.get_plugins():
                    for secret in scan._scan_line(plugin, "post.txt", line, n, context=context):
                        values.append(str(secret.secret_value))
        return locate(text, values)

    from detect_secrets.filters import heuristic
    from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HexHighEntropyString

    plugins = [Base64HighEntropyString(), HexHighEntropyString()]

    def eager(text: str) -> tuple[str, list[tuple[str, int, int]]]:
        values = []
        for plugin in plugins:
            with plugin.non_quoted_string_regex(is_exact_match=False):
                for value in plugin.analyze_string(text):
                    if plugin.calculate_shannon_entropy(value) <= plugin.entropy_limit:
                        continue
                    if heuristic.is_sequential_string(value) or heuristic.is_potential_uuid(value):
                        continue
                    if heuristic.is_likely_id_string(value, text, plugin):
                        continue
                    values.append(value)
        return locate(text, values)

    del PotentialSecret
    return {"detect-secrets (files)": as_files, "detect-secrets (eager)": eager}


def timing(fn: Callable[[str], object], texts: list[str]) -> tuple[float, float]:
    latencies = []
    for t in texts:
        a = time.perf_counter()
        fn(t)
        latencies.append(time.perf_counter() - a)
    latencies.sort()
    return statistics.median(latencies) * 1e3, latencies[int(len(latencies) * 0.99)] * 1e3


def posts(rows: list[Row], size: int, count: int = 200) -> list[str]:
    """Posts of `size` bytes cut from the rows, in order (a fixed set)."""
    texts, buf = [], ""
    for i in range(count * 20):
        buf += rows[(i * 7) % len(rows)][0] + "\n"
        if len(buf.encode()) >= size:
            texts.append(buf.encode()[:size].decode(errors="ignore"))
            buf = ""
            if len(texts) == count:
                break
    return texts


def pct(a: int, b: int) -> str:
    return f"{a / b:.3f} ({a}/{b})" if b else "–"


def report(args: argparse.Namespace) -> str:
    load_avg = os.getloadavg()[0]
    quality, pii = load(QUALITY, "handwritten"), load(PII, "pii_labelled")
    scrubber = Scrubber()
    res = evaluate(scrubber_fn(scrubber), quality + pii)
    neg_bytes = sum(len(t.encode()) for t, e, _ in quality if not e)
    lines = [
        f"Command: `python bench/scrub_quality.py{' --detect-secrets' if args.detect_secrets else ''}"
        f"{' --write' if args.write else ''}` ({time.strftime('%Y-%m-%d %H:%M')}, load {load_avg:.1f} at start). "
        f"Rows: {len(quality)} in tests/data/scrub_quality.jsonl ({neg_bytes / 1024:.0f} KiB of negatives) and "
        f"{len(pii)} in tests/data/pii_labelled.jsonl.",
        "",
        "| category (labelled) | recall | leaked | precision of findings with this entity |",
        "|---|---:|---:|---:|",
    ]
    recall = res["recall"]
    precision = res["precision"]
    assert isinstance(recall, dict) and isinstance(precision, dict)
    for entity in sorted(set(recall) | set(precision)):
        caught, labelled, leaked = recall.get(entity, [0, 0, 0])
        true, found = precision.get(entity, [0, 0])
        lines.append(f"| {entity} | {pct(caught, labelled)} | {leaked} | {pct(true, found)} |")
    lines += ["", "| negatives from | rows | KiB | false findings | per 100 KiB |", "|---|---:|---:|---:|---:|"]
    negatives = res["negatives"]
    assert isinstance(negatives, dict)
    for source, (n, nbytes, false) in sorted(negatives.items()):
        lines.append(f"| {source} | {n} | {nbytes / 1024:.1f} | {false} | {false / nbytes * 102400:.2f} |")
    if args.detect_secrets:
        lines += ["", *compare_detect_secrets(quality)]
    if args.show:
        for miss in res["misses"]:  # type: ignore[attr-defined]
            print("missed:", miss)
        for fp in res["false"]:  # type: ignore[attr-defined]
            print("false finding:", fp)
    return "\n".join(lines)


def compare_detect_secrets(quality: list[Row]) -> list[str]:
    secrets = [r for r in quality if any(e == "SECRET" for e, _ in r[1])]
    negatives = [r for r in quality if not r[1]]
    neg_bytes = sum(len(t.encode()) for t, _, _ in negatives)
    ours: Callable[[str], tuple[str, list[tuple[str, int, int]]]] = lambda t: (t, rule_findings(t, UNLABELLED_RULES))  # noqa: E731
    fns = {"blackboard.scrub_rules.UNLABELLED_RULES": ours, **detect_secrets_fns()}
    posts_1k, posts_4k = posts(quality, 1024), posts(quality, 4096)
    lines = [
        "Unlabelled secrets: the scrubber's own rules against detect-secrets 1.5 on the same rows (recall on the "
        "SECRET rows, false findings on all negatives, time per post of 1 KiB and 4 KiB cut from the set):",
        "",
        "| detector | SECRET recall | false findings (per 100 KiB) | 1 KiB p50 / p99 | 4 KiB p50 / p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, fn in fns.items():
        found = sum(
            all(
                any(s <= a and b <= e for _, s, e in fn(t)[1] for a, b in spans_of(t, v))
                for k, v in ents
                if k == "SECRET"
            )
            for t, ents, _ in secrets
        )
        false = sum(len(fn(t)[1]) for t, _, _ in negatives)
        t1, t4 = timing(fn, posts_1k), timing(fn, posts_4k)
        lines.append(
            f"| {name} | {pct(found, len(secrets))} | {false} ({false / neg_bytes * 102400:.1f}) "
            f"| {t1[0]:.2f} / {t1[1]:.2f} ms | {t4[0]:.2f} / {t4[1]:.2f} ms |"
        )
    return lines


def write(section: str) -> None:
    text = REPORT.read_text(encoding="utf-8") if REPORT.exists() else ""
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + "## Scrubbing quality\n\n" + block + "\n"
    REPORT.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detect-secrets", action="store_true", help="compare with Yelp's detect-secrets")
    parser.add_argument("--show", action="store_true", help="print every miss and false finding")
    parser.add_argument("--write", action="store_true", help="replace the results in bench/BLACKBOARD.md")
    args = parser.parse_args()
    section = report(args)
    print(section)
    if args.write:
        write(section)


if __name__ == "__main__":
    main()

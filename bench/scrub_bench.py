"""Throughput and latency of blackboard/scrub.py, the scrubber every node runs on every post it receives.

Measures, on this machine:

- construction: a fresh process imports `blackboard.scrub` and makes a `Scrubber` (which imports
  presidio and spaCy and warms every recognizer), then scrubs one post (first-call latency);
  median of `--processes` runs;
- throughput: posts per second, MB/s and per-post latency (p50, p99) for short (~100 B), medium
  (~1 KiB) and maximum (4 KiB) posts, each "clean" (code, logs, ids, versions: nothing to scrub)
  and "with PII" (about one finding per 100 B), plus 4 KiB posts dense with numbers and addresses
  (the slow case for phone-number matching);
- people's names (blackboard/scrub_ner.py): rows of prose with names and of Python source from the
  standard library, and every row measured with the NER's cache of lines emptied before each post (a node
  sees each post's lines for the first time); recall on the sentences of tests/test_scrub_names.py and the
  names found in 4 KiB slices of standard-library source (false PERSON findings per 100 KiB);
- for reference, presidio as it comes (its phone, credit card, IBAN and IP recognizers over the
  same blank spaCy pipeline, tokenizing every post, default context enhancer, phone matching over
  the whole text in all eight regions).

Posts are built from tests/data/pii_labelled.jsonl (a fixed seed), so runs are comparable.
`--write` replaces the results section of bench/BLACKBOARD.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blackboard.scrub import Scrubber  # noqa: E402

LABELLED = ROOT / "tests" / "data" / "pii_labelled.jsonl"
REPORT = ROOT / "bench" / "BLACKBOARD.md"
BEGIN, END = "<!-- scrub_bench results: begin -->", "<!-- scrub_bench results: end -->"
SIZES = {"short": 100, "medium": 1024, "max": 4096}
FIRST = "Maria John Priya Wei Ahmed Olga Sarah Hans Emily Fatima Raj Michael Lucia Kenji Ana Tomasz Ngozi Sven".split()
LAST = "Garcia Smith Patel Zhang Hassan Ivanova O'Connor Müller Chen Al-Sayed Rossi Tanaka Kowalski Okafor".split()
SAID = [
    "ping {n} before merging the {w} change",
    "{n} said the {w} run on Qwen2.5-Coder-1.5B was {k}% slower",
    "thanks to {n} for fixing the {w} bug in scrub.py line {k}",
    "cc {n}: the node {k} keeps dropping {w} requests",
    "reviewed-by: {n} ({k} comments on {w})",
    "{n} will look at the {w} regression tomorrow, build {k}",
    "the {w} benchmark ({k} tok/s) was run by {n} last night",
]
WORDS = "cache split shard router gossip blackboard tokenizer prompt kv-cache quic relay console".split()
STDLIB = ("json/decoder.py", "argparse.py", "asyncio/tasks.py", "http/client.py", "email/message.py", "shutil.py")

CONSTRUCT = """
import time
t0 = time.perf_counter()
import blackboard.scrub as m
t1 = time.perf_counter()
s = m.Scrubber()
t2 = time.perf_counter()
s.scrub("STATUS: node 3f2a9c1e at 10.1.2.3 serves Qwen2.5-Coder-1.5B-Q4_K_M; mail ops@example.com")
t3 = time.perf_counter()
s.scrub("STATUS: node 3f2a9c1e at 10.1.2.4 serves Qwen2.5-Coder-1.5B-Q4_K_M; mail ops@example.org")
t4 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3)
"""


def fit(text: str, size: int) -> str:
    """`text` cut to at most `size` UTF-8 bytes, on a character boundary."""
    return text.encode()[:size].decode(errors="ignore")


def corpora(seed: int = 1, per_size: int = 200) -> dict[str, list[str]]:
    rows = [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines() if line.strip()]
    clean = [r["text"] for r in rows if not r["entities"]]
    dirty = [r["text"] for r in rows if r["entities"]]
    rng = random.Random(seed)

    def post(size: int, pii: bool) -> str:
        parts: list[str] = []
        while len("\n".join(parts).encode()) < size:
            # with PII: about one labelled line in three (≈ one finding per 100 B)
            parts.append(rng.choice(dirty if pii and rng.random() < 0.35 else clean))
        return fit("\n".join(parts), size)

    out: dict[str, list[str]] = {}
    for name, size in SIZES.items():
        out[f"{name}, clean"] = [post(size, False) for _ in range(per_size)]
        out[f"{name}, with PII"] = [post(size, True) for _ in range(per_size)]
    numbers = []
    for _ in range(20):
        items = [
            f"{rng.randrange(10**6, 10**7)}",
            f"{rng.random():.6f}",
            f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
            f"({rng.randrange(100, 999)}) {rng.randrange(100, 999)}-{rng.randrange(1000, 9999)}",
            f"+44 20 7946 {rng.randrange(1000, 9999)}",
            f"{rng.randrange(2000, 2030)}-{rng.randrange(1, 13):02}-{rng.randrange(1, 29):02}",
        ]
        numbers.append(fit(" ".join(rng.choice(items) for _ in range(600)), 4096))
    out["max, dense numbers"] = numbers

    def prose(size: int) -> str:
        lines: list[str] = []
        while len("\n".join(lines).encode()) < size:
            name = f"{rng.choice(FIRST)} {rng.choice(LAST)}" if rng.random() < 0.7 else rng.choice(FIRST)
            lines.append(rng.choice(SAID).format(n=name, w=rng.choice(WORDS), k=rng.randrange(1, 10_000)))
        return fit("\n".join(lines), size)

    out["medium, prose with names"] = [prose(1024) for _ in range(per_size)]
    out["max, prose with names"] = [prose(4096) for _ in range(per_size)]
    out["max, Python source"] = stdlib_slices(4096)[:per_size]
    return out


def stdlib_slices(size: int) -> list[str]:
    """`size`-byte slices of a few standard-library modules: real code, comments and docstrings."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in STDLIB:
        text = (lib / name).read_text(encoding="utf-8")
        out += [fit(text[i : i + size], size) for i in range(0, len(text), size)]
    return out


def name_finder(scrubber: Scrubber) -> Callable[[], None]:
    """A function that empties the scrubber's cache of NER results (each post then pays for its lines)."""
    for recognizer in scrubber._analyzer.registry.recognizers:
        finder = getattr(recognizer, "finder", None)
        if finder is not None:
            clear: Callable[[], None] = finder.clear
            return clear
    return lambda: None


def names_accuracy(scrubber: Scrubber) -> list[str]:
    """Recall on tests/test_scrub_names.py's sentences; PERSON findings in standard-library source."""
    from tests.test_scrub_names import MISSED, NAMED

    def persons(text: str) -> list[str]:
        return [text[f.start : f.end] for f in scrubber.scrub(text).findings if f.entity == "PERSON"]

    wanted = [(t, n) for t, names in NAMED for n in names] + [(t, "?") for t in MISSED]
    caught = sum(n in persons(t) for t, n in wanted)
    slices = stdlib_slices(4096)
    kib = sum(len(s.encode()) for s in slices) / 1024
    found = [p for s in slices for p in persons(s)]
    return [
        f"Names: {caught} of {len(wanted)} names in the sentences of tests/test_scrub_names.py "
        f"(the misses: {'; '.join(MISSED)}). In {kib:.0f} KiB of standard-library source "
        f"({', '.join(STDLIB)}, Python {platform.python_version()}) the scrubber finds {len(found)} PERSON "
        f"({len(found) / kib * 100:.1f} per 100 KiB): {', '.join(found) or 'none'}.",
    ]


def measure(
    scrub: Callable[[str], object], texts: list[str], seconds: float, reset: Callable[[], None] = lambda: None
) -> dict[str, float]:
    for t in texts[:5]:
        scrub(t)
    latencies: list[float] = []
    nbytes = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 5:
        t = texts[len(latencies) % len(texts)]
        reset()
        a = time.perf_counter()
        scrub(t)
        latencies.append(time.perf_counter() - a)
        nbytes += len(t.encode())
    total = sum(latencies)
    latencies.sort()
    return {
        "posts": len(latencies),
        "posts_s": len(latencies) / total,
        "mb_s": nbytes / total / 1e6,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "mean_b": nbytes / len(latencies),
    }


def stock_presidio() -> Callable[[str], object]:
    """presidio as it comes, minus its e-mail recognizer (whose tldextract would go online)."""
    import spacy
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
    )

    engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": "blank"}])
    engine.nlp = {"en": spacy.blank("en")}  # type: ignore[assignment]  # presidio declares it None
    registry = RecognizerRegistry(supported_languages=["en"])
    for r in (PhoneRecognizer(), CreditCardRecognizer(), IbanRecognizer(), IpRecognizer()):
        registry.add_recognizer(r)
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])
    return lambda text: analyzer.analyze(text=text, language="en")


def construction(processes: int) -> dict[str, float]:
    runs = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(processes):
        out = subprocess.run([sys.executable, "-c", CONSTRUCT], env=env, capture_output=True, text=True, check=True)
        runs.append([float(x) for x in out.stdout.split()])
    med = [statistics.median(col) for col in zip(*runs, strict=True)]
    return {"import_s": med[0], "construct_s": med[1], "first_ms": med[2] * 1e3, "second_ms": med[3] * 1e3}


def report(args: argparse.Namespace) -> str:
    load = os.getloadavg()[0]
    cons = construction(args.processes)
    scrubber = Scrubber()
    texts = corpora()
    reset = name_finder(scrubber)
    rows = [(name, measure(scrubber.scrub, ts, args.seconds, reset)) for name, ts in texts.items()]
    stock_rows = []
    if not args.no_stock:
        stock = stock_presidio()
        for name in ("medium, clean", "max, clean", "max, with PII", "max, dense numbers"):
            stock_rows.append((name, measure(stock, texts[name], args.seconds)))
    cpu = platform.processor() or platform.machine()
    try:
        model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = model.group(1) if model else cpu
    except OSError:
        pass
    lines = [
        f"Command: `python bench/scrub_bench.py{' --write' if args.write else ''}` "
        f"({time.strftime('%Y-%m-%d %H:%M')}, {cpu}, {os.cpu_count()} cores, load {load:.1f} at start, "
        f"Python {platform.python_version()}, {args.seconds:g} s per row).",
        "",
        f"Construction (median of {args.processes} fresh processes): import `blackboard.scrub` "
        f"{cons['import_s'] * 1e3:.0f} ms; `Scrubber()` {cons['construct_s']:.2f} s (imports presidio and spaCy, "
        f"builds the blank pipeline, warms every recognizer); then the first `scrub` {cons['first_ms']:.2f} ms, "
        f"the second {cons['second_ms']:.2f} ms.",
        "",
        *names_accuracy(scrubber),
        "",
        "Every row below empties the NER's cache of lines before each post.",
        "",
        "| posts | mean size | posts/s | MB/s | p50 | p99 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['mean_b']:.0f} B | {m['posts_s']:.0f} | {m['mb_s']:.2f} | {m['p50_ms']:.2f} ms "
            f"| {m['p99_ms']:.2f} ms |"
        )
    if stock_rows:
        lines += [
            "",
            "For reference, presidio as it comes (phone, credit card, IBAN, IP recognizers; blank spaCy "
            "pipeline tokenizing each post; default context enhancer; phone matching over the whole post in "
            "its eight regions), on the same posts:",
            "",
            "| posts | posts/s | MB/s | p50 | p99 |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, m in stock_rows:
            lines.append(
                f"| {name} | {m['posts_s']:.0f} | {m['mb_s']:.3f} | {m['p50_ms']:.1f} ms | {m['p99_ms']:.1f} ms |"
            )
    return "\n".join(lines)


def write(section: str) -> None:
    text = REPORT.read_text(encoding="utf-8") if REPORT.exists() else ""
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + "## Scrubbing\n\n" + block + "\n"
    REPORT.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per row (default 3)")
    parser.add_argument("--processes", type=int, default=5, help="fresh processes timed for construction")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock presidio reference rows")
    parser.add_argument("--write", action="store_true", help="replace the results in bench/BLACKBOARD.md")
    args = parser.parse_args()
    section = report(args)
    print(section)
    if args.write:
        write(section)


if __name__ == "__main__":
    main()

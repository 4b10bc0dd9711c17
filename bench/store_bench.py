"""Benchmark of the blackboard store (`blackboard.store.Store`): insert, search, feed, anti-entropy.

Builds a store of realistic posts (default 100 000) in a temporary directory: agents' status
lines, findings and questions made of English and software words drawn from a Zipf distribution
(a few hundred common words, a long tail of 20 000 rarer ones) mixed with code-like tokens (paths,
snake_case and CamelCase identifiers, error names, line numbers, commit hashes), from 300 authors
on 40 nodes, spread over the last 47 hours, each signed with `make_post`. Then it measures:

- insert rate with `add` (one transaction per post, as posts arrive one by one) for every post,
  and with `add_many` (batches of 100, as gossip delivers them) into a second store;
- search latency over ≥ 1000 varied queries (one word, several words, words from a real post,
  code tokens, natural-language questions, rare words, hostile input, with and without filters);
- feed latency with and without filters, digest latency (cold and cached), `ids_in`, `get`,
  `count_by_origin`, reopening the file (with its integrity check), `expire` of the oldest hour
  of posts, and the size on disk.

    python bench/store_bench.py               # 100 000 posts; prints, rewrites "## Search" in bench/BLACKBOARD.md
    python bench/store_bench.py -n 20000 --no-write
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from blackboard.post import KNOWN_KINDS, MAX_TEXT_BYTES, Post, make_post
from blackboard.store import Store

RESULTS = Path(__file__).resolve().parent / "BLACKBOARD.md"
NOW = 1_790_000_000.0

COMMON = """
the a to of and in is for on with that it this was not be are from at by as but have has had
i we you they he she my our your their fix fixed fixing bug bugs test tests testing failing fails
failed pass passes passing build builds error errors issue issues refactor refactoring refactored
module modules function functions class method methods file files code change changes changed add
added adding remove removed update updated updating run running ran check checked checking need
needs looks like seems still now done working work works todo question answer status finding idea
blocked warning note review merge merged branch commit push pull request pr ci pipeline deploy
deployed release version config configuration setting settings env environment variable database
db query queries index schema migration table column row api endpoint request response client server
http timeout retry retries cache cached memory leak cpu gpu latency throughput slow fast performance
benchmark profile profiling log logs logging trace debug crash crashes panic exception stack thread
threads async await lock race condition deadlock queue worker workers job jobs task tasks schedule
user users auth login token session permission role billing invoice payment payments customer
account order orders cart checkout price pricing currency rounding tax report reports export import
parser parsing lexer token tokens model models inference prompt prompts embedding vector search
ranking score node nodes mesh gossip peer peers network socket connection reconnect handshake
packet message messages protocol encode decode json yaml toml csv schema validation validate
docs documentation readme example examples type types typing mypy lint ruff format style unit
integration flaky fixture mock mocks coverage regression upstream downstream dependency dependencies
package install installed upgrade downgrade pin pinned lockfile docker container kubernetes pod
cluster service services frontend backend ui button page form css layout render rendering component
state store stores event events handler handlers callback signal shutdown startup restart config
should could would will can cannot don't doesn't isn't wasn't after before because since while
when where why how what which who anyone someone please thanks agree disagree think maybe probably
""".split()

SYLLABLES = (
    "ka ri to mo na shi el an or in er ex al ur os ta ve li po de sa mi co ru ne ga fi lo be "
    "tra pre con dis pro com per ter ver gen sta mat cal lin fer por tin vel sor dex nal"
).split()

FIRST = "ada alan grace linus ken dennis barbara margaret edsger donald john guido bjarne james anders".split()


def make_vocabulary(rng: random.Random, size: int) -> list[str]:
    """Common words first (most frequent), then invented words for the long tail."""
    words = list(dict.fromkeys(COMMON))
    seen = set(words)
    while len(words) < size:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


class Corpus:
    def __init__(self, seed: int, vocabulary: int = 20_000) -> None:
        self.rng = random.Random(seed)
        self.words = make_vocabulary(self.rng, vocabulary)
        weights = [1.0 / (rank + 2) ** 1.07 for rank in range(len(self.words))]
        total = 0.0
        self.cum: list[float] = []
        for w in weights:
            total += w
            self.cum.append(total)
        self.authors = [f"{self.rng.choice(FIRST)}-{self.word(rare=True)}-{i}" for i in range(300)]
        self.keys = [Ed25519PrivateKey.generate() for _ in range(40)]

    def word(self, rare: bool = False) -> str:
        if rare:
            return self.rng.choice(self.words[len(COMMON) :])
        return self.rng.choices(self.words, cum_weights=self.cum)[0]

    def code(self) -> str:
        r = self.rng
        w = self.word
        shape = r.randrange(9)
        if shape == 0:
            return f"src/{w(True)}/{w(True)}.py"
        if shape == 1:
            return f"{w()}_{w(True)}"
        if shape == 2:
            return f"{w(True).capitalize()}{w().capitalize()}"
        if shape == 3:
            return f"{w(True)}()"
        if shape == 4:
            return f"{w(True).capitalize()}Error"
        if shape == 5:
            return f"{w(True)}.py:{r.randint(1, 2000)}"
        if shape == 6:
            return f"{r.getrandbits(28):07x}"
        if shape == 7:
            return f"--{w()}-{w(True)}"
        return str(r.randint(0, 10_000))

    def text(self) -> str:
        r = self.rng
        parts: list[str] = []
        if r.random() < 0.85:
            parts.append(r.choice(KNOWN_KINDS) + ":")
        for _ in range(int(r.lognormvariate(3.0, 0.6)) + 4):
            parts.append(self.code() if r.random() < 0.12 else self.word())
            if r.random() < 0.08:
                parts[-1] += r.choice(".,;:!?")
        text = " ".join(parts)
        while len(text.encode()) > MAX_TEXT_BYTES:
            text = text[: len(text) * 3 // 4].rstrip()
        return text

    def post(self, created: float) -> Post:
        return make_post(self.text(), self.rng.choice(self.authors), self.rng.choice(self.keys), created)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def make_queries(c: Corpus, posts: list[Post], n: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(category, query, filters) — n queries of varied shapes."""
    r = c.rng
    hostile = [
        'foo" OR bar*',
        "AND",
        "NEAR(",
        "-x",
        ":",
        "billing AND NOT",
        '"""',
        "col:value",
        "^start",
        "a* b* c*",
        "(((",
        "NEAR(a b, 3)",
        "'; DROP TABLE posts; --",
        "\x00null",
        "emoji 🙂 ünïcödé",
    ]
    out: list[tuple[str, str, dict[str, Any]]] = []
    while len(out) < n:
        shape = r.randrange(10)
        post = r.choice(posts)
        words = post.text.split()
        filters: dict[str, Any] = {}
        if shape == 0:
            out.append(("1 word", c.word(), filters))
        elif shape == 1:
            out.append(("2-4 words", " ".join(c.word() for _ in range(r.randint(2, 4))), filters))
        elif shape == 2:
            start = r.randrange(max(1, len(words) - 3))
            out.append(("words from a post", " ".join(words[start : start + r.randint(2, 4)]), filters))
        elif shape == 3:
            out.append(("code token", c.code(), filters))
        elif shape == 4:
            q = f"how did you fix the {c.word()} {c.word()} in {c.code()}?"
            out.append(("question", q, filters))
        elif shape == 5:
            out.append(("rare word", c.word(rare=True), filters))
        elif shape == 6:
            out.append(("hostile", r.choice(hostile), filters))
        else:
            choice = r.randrange(3)
            if choice == 0:
                filters["author"] = post.author.upper()
            elif choice == 1:
                filters["kind"] = r.choice(KNOWN_KINDS)
            else:
                filters["since"] = NOW - r.uniform(1, 12) * 3600
            out.append(("with a filter", " ".join(c.word() for _ in range(r.randint(1, 3))), filters))
    return out


def summarize(samples: list[float]) -> str:
    return (
        f"{statistics.median(samples):.2f} | {percentile(samples, 90):.2f} | {percentile(samples, 99):.2f} | "
        f"{max(samples):.2f}"
    )


def run(n: int, n_queries: int, seed: int) -> tuple[list[str], dict[str, float]]:
    c = Corpus(seed)
    t0 = time.perf_counter()
    created = sorted(NOW - c.rng.uniform(0, 47 * 3600) for _ in range(n))
    # Gossip delivers posts roughly in time order, some late: shuffle locally.
    for i in range(0, n, 50):
        window = created[i : i + 200]
        c.rng.shuffle(window)
        created[i : i + 200] = window
    posts = [c.post(t) for t in created]
    make_s = time.perf_counter() - t0
    print(f"made and signed {n} posts in {make_s:.1f} s", flush=True)

    lines: list[str] = []
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blackboard.sqlite"
        store = Store(path, cap=max(200_000, n))
        start = time.perf_counter()
        for p in posts:
            store.add(p, NOW)
        add_s = time.perf_counter() - start
        figures["add_per_s"] = n / add_s
        print(f"add: {n / add_s:,.0f} posts/s", flush=True)

        batch_n = min(n, 20_000)
        with Store(Path(tmp) / "batch.sqlite") as other:
            start = time.perf_counter()
            for i in range(0, batch_n, 100):
                other.add_many(posts[i : i + 100], NOW)
            figures["add_many_per_s"] = batch_n / (time.perf_counter() - start)
        print(f"add_many: {figures['add_many_per_s']:,.0f} posts/s", flush=True)

        queries = make_queries(c, posts, n_queries)
        for _, q, f in queries[:50]:  # warm the page cache and statement cache
            store.search(q, now=NOW, **f)
        by_category: dict[str, list[float]] = {}
        all_ms: list[float] = []
        hits: list[int] = []
        for category, q, f in queries:
            start = time.perf_counter()
            found = store.search(q, now=NOW, **f)
            ms = (time.perf_counter() - start) * 1000
            all_ms.append(ms)
            hits.append(len(found))
            by_category.setdefault(category, []).append(ms)
        figures["search_p50_ms"] = statistics.median(all_ms)
        figures["search_p99_ms"] = percentile(all_ms, 99)
        print(f"search: p50 {figures['search_p50_ms']:.2f} ms, p99 {figures['search_p99_ms']:.2f} ms", flush=True)

        feed_ms: dict[str, list[float]] = {"no filter": [], "author": [], "kind": [], "since": []}
        for i in range(400):
            post = c.rng.choice(posts)
            name = list(feed_ms)[i % 4]
            choices: dict[str, dict[str, Any]] = {
                "no filter": {},
                "author": {"author": post.author},
                "kind": {"kind": c.rng.choice(KNOWN_KINDS)},
                "since": {"since": NOW - 3600},
            }
            start = time.perf_counter()
            store.feed(now=NOW, **choices[name])
            feed_ms[name].append((time.perf_counter() - start) * 1000)

        digest_cold = timed(lambda: store.digest(NOW))
        digest_warm = [timed(lambda: store.digest(NOW)) for _ in range(50)]
        store.add(c.post(NOW - 10), NOW)
        digest_one = timed(lambda: store.digest(NOW))
        buckets = sorted(store.digest(NOW))
        ids_in_ms = [timed(lambda: store.ids_in(c.rng.sample(buckets, 4), NOW)) for _ in range(50)]
        get_ms = [timed(lambda: store.get([p.id for p in c.rng.sample(posts, 100)])) for _ in range(50)]
        origins_ms = [timed(lambda: store.count_by_origin(NOW)) for _ in range(10)]
        store.close()
        size = sum(f.stat().st_size for f in Path(tmp).glob("blackboard.sqlite*"))
        start = time.perf_counter()
        store = Store(path, cap=max(200_000, n))
        reopen_ms = (time.perf_counter() - start) * 1000
        expired = [0]
        expire_ms = timed(lambda: expired.__setitem__(0, store.expire(NOW + 2 * 3600)))
        later = timed(lambda: store.search("billing invoice rounding", now=NOW + 2 * 3600))
        store.close()

    lines.append(
        f"Posts: {n:,} ({sum(len(p.text.encode()) for p in posts) / n:.0f} bytes of text on average), "
        f"{len(queries)} queries."
    )
    lines.append("")
    lines.append("| what | result |")
    lines.append("|---|---:|")
    lines.append(f"| `add`, one transaction per post | {figures['add_per_s']:,.0f} posts/s |")
    lines.append(f"| `add_many`, batches of 100 ({batch_n:,} posts) | {figures['add_many_per_s']:,.0f} posts/s |")
    lines.append(
        f"| search p50 / p99 / max, all {len(all_ms)} queries | {statistics.median(all_ms):.2f} / "
        f"{percentile(all_ms, 99):.2f} / {max(all_ms):.2f} ms |"
    )
    all_feeds = [ms for samples in feed_ms.values() for ms in samples]
    lines.append(
        f"| feed p50 / p99, all filters | {statistics.median(all_feeds):.2f} / {percentile(all_feeds, 99):.2f} ms |"
    )
    lines.append(
        f"| digest: first call / cached p50 / after one `add` | {digest_cold:.1f} / "
        f"{statistics.median(digest_warm):.2f} / {digest_one:.2f} ms ({len(buckets)} buckets) |"
    )
    lines.append(f"| `ids_in` 4 buckets p50 | {statistics.median(ids_in_ms):.2f} ms |")
    lines.append(f"| `get` 100 ids p50 | {statistics.median(get_ms):.2f} ms |")
    lines.append(f"| `count_by_origin` p50 | {statistics.median(origins_ms):.1f} ms |")
    lines.append(f"| reopen (with `quick_check`) | {reopen_ms:.0f} ms |")
    lines.append(f"| `expire` of the oldest hour ({expired[0]:,} posts) | {expire_ms:.0f} ms |")
    lines.append(f"| search after that expire | {later:.2f} ms |")
    lines.append(f"| size on disk (db + wal) | {size / 1e6:.1f} MB ({size / n:.0f} bytes/post) |")
    lines.append("")
    lines.append("Search latency by query shape (ms):")
    lines.append("")
    lines.append("| shape | queries | mean hits | p50 | p90 | p99 | max |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    hit_by: dict[str, list[int]] = {}
    for (category, _, _), h in zip(queries, hits, strict=True):
        hit_by.setdefault(category, []).append(h)
    for category, samples in sorted(by_category.items()):
        lines.append(
            f"| {category} | {len(samples)} | {statistics.mean(hit_by[category]):.1f} | {summarize(samples)} |"
        )
    lines.append("")
    lines.append("Feed latency (ms, 100 calls each):")
    lines.append("")
    lines.append("| filter | p50 | p90 | p99 | max |")
    lines.append("|---|---:|---:|---:|---:|")
    for name, samples in feed_ms.items():
        lines.append(f"| {name} | {summarize(samples)} |")
    return lines, figures


BEGIN, END = "<!-- store_bench results: begin -->", "<!-- store_bench results: end -->"


def write_section(body: str) -> None:
    """Put the results between this benchmark's markers in the "## Search" section of BLACKBOARD.md,
    adding the section (or the markers, at its end) if missing; the rest of the file is left alone."""
    block = f"{BEGIN}\n{body.strip()}\n{END}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Blackboard\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        new = head + block + rest.split(END, 1)[1]
    else:
        lines = text.rstrip("\n").splitlines()
        start = next((i for i, line in enumerate(lines) if line.strip() == "## Search"), None)
        if start is None:
            lines += ["", "## Search", "", block]
        else:
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
            while end > start + 1 and not lines[end - 1].strip():
                end -= 1
            lines[end:end] = ["", block, *([""] if end < len(lines) else [])]
        new = "\n".join(lines) + "\n"
    RESULTS.write_text(new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=100_000, help="posts to insert (default 100000)")
    parser.add_argument("--queries", type=int, default=1200, help="search queries to time (default 1200)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="do not rewrite bench/BLACKBOARD.md")
    args = parser.parse_args(argv)
    lines, _ = run(args.n, args.queries, args.seed)
    print("\n".join(lines))
    if not args.no_write:
        command = "python bench/store_bench.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
        when = time.strftime("%Y-%m-%d %H:%M")
        write_section(f"Command: `{command}` ({when}, {os.cpu_count()} CPUs).\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()

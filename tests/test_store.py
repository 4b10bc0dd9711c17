"""The blackboard store on real SQLite files: dedup, search and its ranking, filters, expiry, cap,
restart, anti-entropy digests, hostile queries and corrupt files."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from blackboard.post import TTL_S, Post, make_post, to_wire, verify
from blackboard.store import MAX_LIMIT, Store, bucket_hash, bucket_of
from blackboard.store_query import query_phrases
from mesh_mcp.errors import BlackboardError

T0 = 1_750_000_000.0
KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()

# Filler so that bm25's inverse document frequencies mean something (a word in half the posts weighs nothing).
FILLER = [
    "STATUS: reading the llama.cpp server logs",
    "NOTE: the gossip cycle takes about a second",
    "TODO: write docs for the console page",
    "IDEA: cache embeddings per model",
    "QUESTION: who owns the router tests?",
    "FINDING: quic streams close cleanly on shutdown",
    "STATUS: profiling the tokenizer",
    "NOTE: meshfile rotation works",
]


def post(text: str, created: float = T0, author: str = "alice", key: Ed25519PrivateKey = KEY) -> Post:
    return make_post(text, author, key, created)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "blackboard.sqlite") as s:
        yield s


def texts(posts: list[Post]) -> list[str]:
    return [p.text for p in posts]


def fill(store: Store, created: float = T0 - 3600) -> None:
    for i, text in enumerate(FILLER):
        assert store.add(post(text, created + i, author="filler"), T0)


# -- add, dedup, get ---------------------------------------------------------------------------


def test_add_then_dedup(store: Store) -> None:
    p = post("STATUS: refactoring billing")
    assert store.add(p, T0)
    assert not store.add(p, T0)
    assert store.count() == 1
    assert store.has(p.id)
    assert not store.has("0" * 32)


def test_expired_post_is_not_added(store: Store) -> None:
    assert not store.add(post("old news", T0 - TTL_S), T0)  # created + TTL == now: expired, as post.verify says
    assert store.add(post("just alive", T0 - TTL_S + 0.001), T0)
    assert store.count() == 1


def test_get_returns_posts_verbatim_in_the_order_asked(store: Store) -> None:
    a = post("FINDING: one", T0)
    b = make_post("ANSWER: two", "bob", OTHER_KEY, T0 + 1, reply_to=a.id)
    store.add(a, T0 + 2)
    store.add(b, T0 + 2)
    got = store.get([b.id, "f" * 32, a.id, b.id])
    assert got == [b, a]
    assert [to_wire(p) for p in got] == [to_wire(b), to_wire(a)]
    for p in got:
        verify(p, T0 + 2)  # signature and key survived as bytes
    assert got[0].reply_to == a.id and got[0].kind == "ANSWER"


def test_add_many_returns_the_new_posts(store: Store) -> None:
    a, b, c = post("one", T0), post("two", T0 + 1), post("three", T0 - TTL_S)
    assert store.add_many([a, b, a, c], T0 + 2) == [a, b]
    assert store.add_many([a, b], T0 + 2) == []
    assert store.count() == 2


def test_get_many_ids(store: Store) -> None:
    posts = [post(f"note {i}", T0 + i / 1000) for i in range(1200)]
    store.add_many(posts, T0 + 10)
    assert store.get(p.id for p in reversed(posts)) == posts[::-1]


def test_same_millisecond_posts_are_all_kept(store: Store) -> None:
    posts = [post(f"burst {i}", T0) for i in range(300)]
    assert len(store.add_many(posts, T0)) == 300
    assert len(store.feed(now=T0, limit=MAX_LIMIT)) == 300


# -- search ------------------------------------------------------------------------------------


def test_stemming_and_word_order(store: Store) -> None:
    fill(store)
    store.add(post("STATUS: refactoring billing"), T0)
    assert texts(store.search("billing refactor", now=T0)) == ["STATUS: refactoring billing"]
    assert texts(store.search("Refactored BILLS", now=T0)) == ["STATUS: refactoring billing"]


def test_all_words_rank_above_some(store: Store) -> None:
    fill(store)
    # bm25 alone would put this one first: "rounding" is rare and it says it four times in few words.
    store.add(post("rounding rounding rounding rounding", T0), T0)
    store.add(post("FINDING: the invoice module has a rounding bug in the tax code path", T0 - 10), T0)
    store.add(post("invoice totals", T0 - 20), T0)
    found = texts(store.search("invoice rounding", now=T0))
    assert found[0] == "FINDING: the invoice module has a rounding bug in the tax code path"
    assert set(found[1:]) == {"rounding rounding rounding rounding", "invoice totals"}


def test_more_words_rank_above_fewer(store: Store) -> None:
    fill(store)
    store.add(post("alpha", T0), T0)
    store.add(post("alpha beta", T0 - 1), T0)
    store.add(post("alpha beta gamma-ray", T0 - 2), T0)
    assert texts(store.search("alpha beta gamma-ray delta", now=T0)) == ["alpha beta gamma-ray", "alpha beta", "alpha"]


def test_ties_newest_first(store: Store) -> None:
    fill(store)
    for i in range(3):
        store.add(post("WARNING: disk almost full", T0 + i, author=f"agent{i}"), T0 + 5)
    found = store.search("disk full", now=T0 + 5)
    assert [p.author for p in found] == ["agent2", "agent1", "agent0"]


def test_code_tokens_match_as_phrases(store: Store) -> None:
    fill(store)
    store.add(post("FINDING: KeyError in src/billing/invoice.py:120 when currency is missing"), T0)
    store.add(post("NOTE: invoice.md and py scripts"), T0)
    assert texts(store.search("invoice.py", now=T0)) == [
        "FINDING: KeyError in src/billing/invoice.py:120 when currency is missing"
    ]
    assert len(store.search("keyerror", now=T0)) == 1


def test_stopwords_are_dropped_unless_alone(store: Store) -> None:
    fill(store)
    store.add(post("the build is green", T0), T0)
    assert texts(store.search("is the build green?", now=T0)) == ["the build is green"]
    # A query of common words only still finds posts, newest first.
    found = store.search("the", now=T0)
    assert found and found[0].text == "the build is green"
    assert all("the" in p.text.lower().split() for p in found)


def test_limit(store: Store) -> None:
    store.add_many([post(f"ping {i}", T0 + i) for i in range(30)], T0 + 30)
    assert len(store.search("ping", now=T0 + 30, limit=7)) == 7
    assert store.search("ping", now=T0 + 30, limit=0) == []
    assert len(store.search("ping", now=T0 + 30, limit=10**9)) == 30
    assert len(store.feed(now=T0 + 30, limit=-1)) == 0


def test_no_match(store: Store) -> None:
    fill(store)
    assert store.search("xylophone", now=T0) == []
    assert store.search("...", now=T0) == []  # no word at all: nothing matches


def test_unicode_text(store: Store) -> None:
    fill(store)
    store.add(post("NOTE: naïve café résumé"), T0)
    store.add(post("STATUS: 数据库 迁移 完成"), T0)
    store.add(post("DONE: deploy 🚀 shipped to Zürich"), T0)
    store.add(post("NOTE: Straße ΣΊΣΥΦΟΣ"), T0)
    assert texts(store.search("naive CAFE", now=T0)) == ["NOTE: naïve café résumé"]
    assert texts(store.search("迁移", now=T0)) == ["STATUS: 数据库 迁移 完成"]
    assert texts(store.search("zurich", now=T0)) == ["DONE: deploy 🚀 shipped to Zürich"]
    assert texts(store.search("🚀 deploy", now=T0)) == ["DONE: deploy 🚀 shipped to Zürich"]
    assert texts(store.search("σίσυφος", now=T0)) == ["NOTE: Straße ΣΊΣΥΦΟΣ"]
    assert store.search("🚀", now=T0) == []  # an emoji is no word to the tokenizer


HOSTILE = [
    'foo" OR bar*',
    "AND",
    "OR",
    "NOT",
    "NEAR(",
    "NEAR(a b, 3)",
    "-x",
    ":",
    "text:secret",
    "tags : x",
    "{text tags}: x",
    "^start",
    "a* b* c*",
    '"',
    '""""',
    "(((",
    ")",
    "+",
    "'; DROP TABLE posts; --",
    "\x00",
    "a\x00b",
    "\ud800 lone surrogate",
    "x" * 10_000,
    " ".join(f"w{i}" for i in range(500)),
]


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_query(store: Store, query: str) -> None:
    fill(store)
    store.add(post("NOTE: foo bar start secret text tags"), T0)
    found = store.search(query, now=T0)
    assert isinstance(found, list)
    store.search(query, author=query, kind=query, now=T0)
    store.feed(author=query, kind=query, now=T0)
    assert store.count() == len(FILLER) + 1


def test_hostile_query_finds_its_words(store: Store) -> None:
    fill(store)
    store.add(post("NOTE: foo and bar"), T0)
    assert texts(store.search('foo" OR bar*', now=T0)) == ["NOTE: foo and bar"]
    assert texts(store.search("(foo) -bar:", now=T0)) == ["NOTE: foo and bar"]


@pytest.fixture(scope="module")
def shared_store() -> Iterator[Store]:
    with Store(":memory:") as s:
        for i, text in enumerate([*FILLER, 'NOTE: quotes " and stars * and colons : and NEAR(x)']):
            s.add(post(text, T0 + i), T0)
        yield s


@settings(max_examples=400, deadline=None)
@given(query=st.text(max_size=80), author=st.none() | st.text(max_size=10), kind=st.none() | st.text(max_size=5))
def test_any_text_is_a_valid_query(shared_store: Store, query: str, author: str | None, kind: str | None) -> None:
    found = shared_store.search(query, author=author, kind=kind, now=T0 + 60)
    assert len(found) <= 20


@settings(max_examples=300, deadline=None)
@given(query=st.text(alphabet=st.sampled_from('abAND OR NOT NEAR()"*:^{}+-,.\\\x00'), max_size=40))
def test_fts_syntax_soup_is_a_valid_query(query: str) -> None:
    phrases, _ = query_phrases(query)
    assert all(p.startswith('"') and p.endswith('"') for p in phrases)
    with Store(":memory:") as s:
        s.add(post("AND OR NOT NEAR a b"), T0)
        s.search(query, now=T0)


# -- filters and feed --------------------------------------------------------------------------


@pytest.fixture
def team(store: Store) -> Store:
    fill(store, T0 - 7200)
    store.add(post("STATUS: billing tests green", T0 - 300, author="Alice"), T0)
    store.add(post("FINDING: billing rounding bug", T0 - 200, author="alice"), T0)
    store.add(post("FINDING: billing cache stale", T0 - 100, author="bob"), T0)
    store.add(post("billing without a kind", T0 - 50, author="alice-2"), T0)
    return store


def test_author_filter_is_exact_and_case_insensitive(team: Store) -> None:
    assert texts(team.search("billing", author="ALICE", now=T0)) == [
        "FINDING: billing rounding bug",
        "STATUS: billing tests green",
    ]
    assert team.search("billing", author="ali", now=T0) == []
    assert texts(team.search("billing", author=" alice-2 ", now=T0)) == ["billing without a kind"]


def test_kind_filter(team: Store) -> None:
    assert texts(team.search("billing", kind="FINDING", now=T0)) == [
        "FINDING: billing cache stale",
        "FINDING: billing rounding bug",
    ]
    assert texts(team.search("billing", kind="status", now=T0)) == ["STATUS: billing tests green"]
    assert texts(team.search("billing", kind="", now=T0)) == ["billing without a kind"]
    assert team.search("billing", kind="FIND", now=T0) == []


def test_since_filter_is_inclusive(team: Store) -> None:
    assert texts(team.search("billing", since=T0 - 200, now=T0)) == [
        "billing without a kind",
        "FINDING: billing cache stale",
        "FINDING: billing rounding bug",
    ]


def test_filters_combine(team: Store) -> None:
    assert texts(team.search("billing", author="alice", kind="FINDING", since=T0 - 250, now=T0)) == [
        "FINDING: billing rounding bug"
    ]
    assert team.search("billing", author="alice", kind="FINDING", since=T0 - 150, now=T0) == []
    assert texts(team.search("rounding cache", kind="FINDING", author="bob", now=T0)) == [
        "FINDING: billing cache stale"
    ]


def test_empty_query_is_the_feed(team: Store) -> None:
    assert texts(team.search("  ", author="alice", now=T0)) == texts(team.feed(author="alice", now=T0))
    assert texts(team.feed(author="alice", now=T0)) == ["FINDING: billing rounding bug", "STATUS: billing tests green"]
    assert texts(team.search("", kind="FINDING", since=T0 - 150, now=T0)) == ["FINDING: billing cache stale"]


AUTHORS = ["ann", "Bob", "ann-2"]
KINDS = ["STATUS", "NOTE", ""]


@settings(max_examples=150, deadline=None)
@given(
    offsets_ms=st.lists(st.integers(-(TTL_S + 60) * 1000, 60_000), min_size=1, max_size=25, unique=True),
    now_ms=st.integers(-60_000, 60_000),
    since_ms=st.none() | st.integers(-(TTL_S + 60) * 1000, 60_000),
    author=st.none() | st.sampled_from([*AUTHORS, "ANN", "nobody"]),
    kind=st.none() | st.sampled_from([*KINDS, "status", "TODO"]),
)
def test_feed_and_search_agree_with_a_model(
    offsets_ms: list[int], now_ms: int, since_ms: int | None, author: str | None, kind: str | None
) -> None:
    posts = []
    for i, offset in enumerate(offsets_ms):
        prefix = f"{KINDS[i % 3]}: " if KINDS[i % 3] else ""
        posts.append(post(f"{prefix}word number {i}", T0 + offset / 1000, author=AUTHORS[i // 3 % 3]))
    now = T0 + now_ms / 1000
    since = None if since_ms is None else T0 + since_ms / 1000
    expected = [
        p
        for p in sorted(posts, key=lambda p: p.created, reverse=True)
        if p.created + TTL_S > now
        and (since is None or p.created >= since)
        and (author is None or p.author.casefold() == author.casefold())
        and (kind is None or p.kind == kind.upper())
    ]
    with Store(":memory:") as s:
        assert len(s.add_many(posts, T0 - TTL_S - 120)) == len(posts)
        assert s.feed(author=author, kind=kind, since=since, limit=MAX_LIMIT, now=now) == expected
        found = s.search("words", author=author, kind=kind, since=since, limit=MAX_LIMIT, now=now)
        assert sorted(p.id for p in found) == sorted(p.id for p in expected)


def test_liveness_is_exact_below_a_millisecond(store: Store) -> None:
    now = T0 + 0.5
    cutoff = now - TTL_S
    base = [post(f"edge {i}", T0 + i) for i in range(4)]
    edge = [
        dataclasses.replace(p, created=cutoff + d) for p, d in zip(base, [-0.0004, 0.0, 0.0004, 0.0009], strict=True)
    ]
    store.add_many(edge, cutoff - 1)
    assert {p.text for p in store.feed(now=now)} == {"edge 2", "edge 3"}
    assert {p.text for p in store.search("edge", now=now)} == {"edge 2", "edge 3"}
    assert {p.text for p in store.feed(since=cutoff + 0.0009, now=now)} == {"edge 3"}
    assert store.expire(now) == 2


def test_feed_is_newest_first(store: Store) -> None:
    posts = [post(f"step {i}", T0 + i) for i in range(10)]
    for p in reversed(posts[5:]):  # arrival order is not time order
        store.add(p, T0 + 10)
    store.add_many(posts[:5], T0 + 10)
    assert store.feed(now=T0 + 10) == posts[::-1]
    assert store.feed(now=T0 + 10, limit=3) == posts[:-4:-1]
    assert store.feed(since=T0 + 8, now=T0 + 10) == [posts[9], posts[8]]


# -- expiry and cap ----------------------------------------------------------------------------


def test_expired_posts_are_never_returned(store: Store) -> None:
    old = post("WARNING: billing down", T0)
    new = post("STATUS: billing back", T0 + 3600)
    store.add_many([old, new], T0 + 3600)
    later = T0 + TTL_S  # `old` expires exactly now
    assert texts(store.search("billing", now=later)) == ["STATUS: billing back"]
    assert texts(store.feed(now=later)) == ["STATUS: billing back"]
    assert store.ids_in([bucket_of(T0)], later) == {bucket_of(T0): []}
    assert store.count() == 2  # not deleted yet
    assert store.expire(later) == 1
    assert store.count() == 1
    assert not store.has(old.id)
    assert store.expire(later) == 0
    assert store.expire(later + 3600) == 1
    assert store.count() == 0
    assert store.search("billing", now=later) == []


def test_expired_post_can_be_added_again_after_expire_only_if_alive(store: Store) -> None:
    p = post("hello", T0)
    store.add(p, T0)
    store.expire(T0 + TTL_S)
    assert not store.add(p, T0 + TTL_S)


def test_cap(tmp_path: Path) -> None:
    with Store(tmp_path / "b.sqlite", cap=3) as s:
        posts = [post(f"post {i}", T0 + i) for i in range(4)]
        for p in posts[:3]:
            assert s.add(p, T0 + 10)
        assert not s.add(posts[0], T0 + 10)  # a duplicate at the cap is no error
        with pytest.raises(BlackboardError, match="the blackboard is full"):
            s.add(posts[3], T0 + 10)
        assert s.count() == 3
        assert s.add(posts[3], T0 + TTL_S + 0.5)  # posts[0] has expired: the cap makes room
        assert s.count() == 3
        assert not s.has(posts[0].id)


def test_add_many_at_the_cap_keeps_the_posts_before(tmp_path: Path) -> None:
    with Store(tmp_path / "b.sqlite", cap=2) as s:
        posts = [post(f"post {i}", T0 + i) for i in range(3)]
        with pytest.raises(BlackboardError, match="full"):
            s.add_many(posts, T0 + 10)
        assert s.count() == 2
        assert s.get(p.id for p in posts) == posts[:2]


def test_restart_keeps_posts(tmp_path: Path) -> None:
    path = tmp_path / "home" / "blackboard.sqlite"
    old = post("WARNING: billing down", T0)
    new = make_post("STATUS: billing back", "bob", OTHER_KEY, T0 + 7200)
    with Store(path) as s:
        s.add_many([old, new], T0 + 7200)
        digest = s.digest(T0 + 7200)
    with Store(path) as s:
        assert s.count() == 2
        assert s.digest(T0 + 7200) == digest
        assert s.get([old.id, new.id]) == [old, new]
        assert texts(s.search("billing", now=T0 + 7200)) == ["STATUS: billing back", "WARNING: billing down"]
        later = T0 + TTL_S + 1
        assert texts(s.search("billing", now=later)) == ["STATUS: billing back"]
        assert s.expire(later) == 1
    with Store(path) as s:
        assert s.count() == 1
        assert texts(s.search("billing", author="BOB", now=later)) == ["STATUS: billing back"]
        assert not s.add(new, later)


def test_count_by_origin(store: Store) -> None:
    mine = [post(f"mine {i}", T0 + i) for i in range(3)]
    theirs = make_post("theirs", "bob", OTHER_KEY, T0 + 3600)
    store.add_many([*mine, theirs], T0 + 3600)
    assert store.count_by_origin(T0 + 3600) == {mine[0].origin: 3, theirs.origin: 1}
    assert store.count_by_origin(T0 + TTL_S + 1.5) == {mine[0].origin: 1, theirs.origin: 1}  # before expire()
    assert store.count_by_origin(T0 + TTL_S + 3600) == {}


# -- anti-entropy ------------------------------------------------------------------------------


def test_digest_and_ids_in(store: Store) -> None:
    a = post("one", T0)
    b = post("two", T0 + 1)
    c = post("three", T0 + 3600)
    store.add_many([a, b], T0 + 3600)
    first = store.digest(T0 + 3600)
    assert first == {bucket_of(T0): bucket_hash([a.id, b.id])}
    store.add(c, T0 + 3600)
    second = store.digest(T0 + 3600)
    assert second[bucket_of(T0)] == first[bucket_of(T0)]
    assert second[bucket_of(T0 + 3600)] == bucket_hash([c.id])
    assert len(second[bucket_of(T0)]) == 16
    d = post("four", T0 + 2)
    store.add(d, T0 + 3600)
    assert store.digest(T0 + 3600)[bucket_of(T0)] == bucket_hash([a.id, b.id, d.id]) != first[bucket_of(T0)]
    empty = bucket_of(T0) - 5
    assert store.ids_in([bucket_of(T0), empty], T0 + 3600) == {
        bucket_of(T0): sorted([a.id, b.id, d.id]),
        empty: [],
    }


def test_equal_stores_have_equal_digests(tmp_path: Path) -> None:
    posts = [post(f"post {i}", T0 + i * 600) for i in range(20)]
    with Store(tmp_path / "a.sqlite") as one, Store(":memory:") as two:
        one.add_many(posts, T0 + 20 * 600)
        for p in reversed(posts):
            two.add(p, T0 + 20 * 600)
        assert one.digest(T0 + 20 * 600) == two.digest(T0 + 20 * 600)
        assert len(one.digest(T0 + 20 * 600)) == len({bucket_of(p.created) for p in posts})


def test_digest_follows_expiry_without_expire(store: Store) -> None:
    start = bucket_of(T0) * 3600.0
    early, late = post("early", start + 10), post("late", start + 3000)
    store.add_many([early, late], start + 3000)
    bucket = bucket_of(start)
    assert store.digest(start + 3000) == {bucket: bucket_hash([early.id, late.id])}
    assert store.digest(start + 10 + TTL_S) == {bucket: bucket_hash([late.id])}  # the edge bucket, partly expired
    assert store.ids_in([bucket], start + 10 + TTL_S) == {bucket: [late.id]}
    assert store.digest(start + 3000 + TTL_S) == {}
    store.expire(start + 10 + TTL_S)
    assert store.digest(start + 3000) == {bucket: bucket_hash([late.id])}


# -- files, threads ----------------------------------------------------------------------------


def test_corrupt_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "blackboard.sqlite"
    path.write_bytes(b"this is not a database, " * 1000)
    with caplog.at_level(logging.WARNING, logger="mesh_llm.blackboard"), Store(path) as s:
        assert s.count() == 0
        assert s.add(post("fresh start"), T0)
        assert texts(s.search("fresh", now=T0)) == ["fresh start"]
    aside = list(tmp_path.glob("blackboard.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not a database")
    assert "unusable" in caplog.text and str(aside[0]) in caplog.text


def test_damaged_database_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "blackboard.sqlite"
    with Store(path) as s:
        s.add_many([post(f"FINDING: number {i} " + "padding " * 50, T0 + i) for i in range(300)], T0 + 300)
    data = bytearray(path.read_bytes())
    assert len(data) > 40_000
    for offset in range(8192, len(data), 4096):  # keep the header and schema page, wreck every other page
        data[offset + 100 : offset + 400] = b"\xff" * 300
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mesh_llm.blackboard"), Store(path) as s:
        assert s.count() == 0
    assert list(tmp_path.glob("blackboard.sqlite.corrupt-*"))
    assert "unusable" in caplog.text


def test_corruption_found_later_is_moved_aside_and_the_call_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "blackboard.sqlite"
    with Store(path) as s:
        s.add_many([post(f"FINDING: number {i} billing " + "padding " * 50, T0 + i) for i in range(300)], T0 + 300)
    # Scramble the full-text index's segments: the b-trees stay sound, so the check at open passes.
    conn = sqlite3.connect(path)
    conn.execute("UPDATE posts_fts_data SET block = randomblob(length(block)) WHERE id > 10")
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING, logger="mesh_llm.blackboard"), Store(path) as s:
        assert s.count() == 300
        assert s.search("billing", now=T0 + 300) == []  # retried on a fresh, empty file
        assert s.count() == 0
        assert s.add(post("FINDING: billing again"), T0 + 300)
        assert texts(s.search("billing", now=T0 + 300)) == ["FINDING: billing again"]
    assert list(tmp_path.glob("blackboard.sqlite.corrupt-*"))
    assert "malformed" in caplog.text


def test_newer_schema_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "blackboard.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with Store(path) as s:
        assert s.count() == 0
    assert list(tmp_path.glob("blackboard.sqlite.corrupt-*"))


def test_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "blackboard.sqlite"
    path.mkdir()
    with pytest.raises(BlackboardError, match=r"cannot open the blackboard database .*blackboard\.sqlite"):
        Store(path)
    assert path.is_dir()  # not moved aside: it is not a corrupt database


def test_closed_store(tmp_path: Path) -> None:
    s = Store(tmp_path / "b.sqlite")
    s.close()
    s.close()
    with pytest.raises(BlackboardError, match="closed"):
        s.search("x", now=T0)


def test_text_that_is_not_unicode_is_refused(store: Store) -> None:
    bad = dataclasses.replace(post("fine"), text="lone \ud800 surrogate")  # JSON "\ud800" decodes to this
    with pytest.raises(BlackboardError, match="not valid Unicode"):
        store.add(bad, T0)
    assert store.count() == 0
    assert store.add(post("fine"), T0)


def test_bad_times_are_refused(store: Store) -> None:
    with pytest.raises(BlackboardError, match="since"):
        store.search("x", since=float("nan"), now=T0)
    with pytest.raises(BlackboardError, match="not a time"):
        store.add(post("from the far future", 2e11), 2e11)
    assert store.feed(since=1e300, now=T0) == []
    assert store.search("x", since=-1e300, now=T0) == []


def test_calls_from_several_threads(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with Store(tmp_path / "b.sqlite") as s:

        def work(n: int) -> None:
            try:
                for i in range(40):
                    s.add(post(f"thread {n} post {i} billing", T0 + i), T0 + 100)
                    s.search("billing thread", now=T0 + 100)
                    s.digest(T0 + 100)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert s.count() == 160

"""Blackboard posts: limits, kinds, signatures, strict wire form; the rate limiter."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from blackboard.limits import Limit, RateLimiter
from blackboard.post import MAX_TEXT_BYTES, TTL_S, from_wire, make_post, parse_kind, to_wire, verify
from mesh_mcp.errors import BlackboardError, PostTooLarge, ProtocolError

NOW = 1_800_000_000.0
KEY = Ed25519PrivateKey.generate()


def roundtrip(obj: object) -> object:
    return json.loads(json.dumps(obj))


def test_a_post_round_trips_and_verifies() -> None:
    post = make_post("  STATUS: [org/repo branch:main] refactoring billing\n", "alice", KEY, NOW)
    assert post.text == "STATUS: [org/repo branch:main] refactoring billing" and post.kind == "STATUS"
    again = from_wire(roundtrip(to_wire(post)))
    assert again == post
    verify(again, NOW + 10)
    assert len(post.id) == 32 and post.expires == NOW + TTL_S


def test_same_content_same_id_and_different_content_different_id() -> None:
    a = make_post("FINDING: x", "alice", KEY, NOW)
    assert make_post("FINDING: x", "alice", KEY, NOW).id == a.id
    assert make_post("FINDING: y", "alice", KEY, NOW).id != a.id
    assert make_post("FINDING: x", "bob", KEY, NOW).id != a.id


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("QUESTION: who owns billing?", "QUESTION"),
        ("ANSWER: me", "ANSWER"),
        ("  FINDING:x", "FINDING"),
        ("CUSTOM_KIND: ok", "CUSTOM_KIND"),
        ("status: lower case is no kind", ""),
        ("A: one letter is no kind", ""),
        ("no kind here: at all", ""),
        ("http://example.com", ""),
    ],
)
def test_kind_is_the_leading_upper_case_word(text: str, kind: str) -> None:
    assert parse_kind(text) == kind


def test_limits_are_errors_for_the_poster() -> None:
    with pytest.raises(BlackboardError, match="needs some text"):
        make_post("   ", "alice", KEY, NOW)
    with pytest.raises(PostTooLarge, match="4096 bytes"):
        make_post("é" * (MAX_TEXT_BYTES // 2 + 1), "alice", KEY, NOW)
    make_post("é" * (MAX_TEXT_BYTES // 2), "alice", KEY, NOW)
    with pytest.raises(BlackboardError, match="author"):
        make_post("hi", "", KEY, NOW)
    with pytest.raises(BlackboardError, match="author"):
        make_post("hi", "a" * 65, KEY, NOW)
    with pytest.raises(BlackboardError, match="reply-to"):
        make_post("hi", "alice", KEY, NOW, reply_to="nope")


def test_forgeries_are_refused() -> None:
    post = make_post("STATUS: genuine", "alice", KEY, NOW)
    with pytest.raises(ProtocolError, match="id does not match"):
        verify(replace(post, text="STATUS: edited"), NOW)
    other = Ed25519PrivateKey.generate()
    forged = make_post("STATUS: genuine", "alice", other, NOW)
    with pytest.raises(ProtocolError, match="key is not node"):
        verify(replace(forged, origin=post.origin), NOW)
    with pytest.raises(ProtocolError, match="bad signature"):
        verify(replace(post, signature=forged.signature), NOW)
    with pytest.raises(ProtocolError, match="future"):
        verify(make_post("from the future", "alice", KEY, NOW + 3600), NOW)
    with pytest.raises(ProtocolError, match="expired"):
        verify(post, NOW + TTL_S + 1)


@pytest.mark.parametrize(
    "change",
    [
        lambda w: {**w, "extra": 1},
        lambda w: {k: v for k, v in w.items() if k != "signature"},
        lambda w: {**w, "text": 5},
        lambda w: {**w, "text": "x" * 5000},
        lambda w: {**w, "text": " padded "},
        lambda w: {**w, "created": "yesterday"},
        lambda w: {**w, "created": True},
        lambda w: {**w, "origin": "zz"},
        lambda w: {**w, "id": "ABC"},
        lambda w: {**w, "public_key": "!!"},
        lambda w: {**w, "signature": "AAAA"},
        lambda w: {**w, "reply_to": 7},
        lambda w: [w],
    ],
)
def test_malformed_wire_posts_are_protocol_errors(change: object) -> None:
    wire = to_wire(make_post("STATUS: x", "alice", KEY, NOW))
    with pytest.raises(ProtocolError):
        from_wire(change(wire))  # type: ignore[operator]


@given(st.text(min_size=1, max_size=200), st.text(min_size=1, max_size=20))
def test_any_valid_post_round_trips(text: str, author: str) -> None:
    try:
        post = make_post(text, author, KEY, NOW)
    except BlackboardError:
        return
    assert from_wire(roundtrip(to_wire(post))) == post


def test_rate_limiter_allows_a_burst_then_refills() -> None:
    limiter = RateLimiter(Limit(burst=3, per_hour=360))  # one post per 10 s after the burst
    assert [limiter.take("a", 0) for _ in range(3)] == [0, 0, 0]
    wait = limiter.take("a", 0)
    assert wait == pytest.approx(10)
    assert limiter.take("b", 0) == 0, "authors have their own buckets"
    assert limiter.take("a", 5) == pytest.approx(5)
    assert limiter.take("a", 10) == 0
    assert limiter.take("a", 10) > 0

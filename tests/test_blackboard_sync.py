"""How posts spread (blackboard/sync.py): push targets, digest differences, exchange plans, bounds,
and an in-process epidemic over many nodes that checks every node ends with every post."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from blackboard.post import make_post
from blackboard.sync import (
    FULL_PUSH,
    MAX_BATCH_BYTES,
    MAX_IDS,
    batches,
    bounded_ids,
    differing,
    fanout,
    parse_digest,
    parse_id_list,
    parse_ids,
    plan_exchange,
    push_targets,
)
from mesh_mcp.errors import ProtocolError

NOW = 1_800_000_000.0
KEY = Ed25519PrivateKey.generate()
POST = make_post("STATUS: x", "alice", KEY, NOW)
ME = "m" * 16


def members(n: int) -> list[str]:
    return [f"{i:016x}" for i in range(n)]


def test_the_origin_pushes_to_every_member_of_a_small_mesh_and_to_subscribed_clients() -> None:
    ms = [*members(9), ME]
    targets = push_targets(POST, ME, None, ms, ["c" * 16], random.Random(1))
    assert set(targets) == set(members(9)) | {"c" * 16}


def test_a_post_from_its_origin_is_not_forwarded_in_a_small_mesh_but_is_in_a_large_one() -> None:
    origin = POST.origin
    small = [origin, ME, *members(5)]
    assert push_targets(POST, ME, origin, small, [], random.Random(1)) == []
    large = [origin, ME, *members(200)]
    targets = push_targets(POST, ME, origin, large, [], random.Random(1))
    assert len(targets) == fanout(len(large)) and origin not in targets and ME not in targets


def test_a_clients_post_gets_its_first_hop_from_the_member() -> None:
    client = POST.origin  # not a member
    ms = [ME, *members(4)]
    assert set(push_targets(POST, ME, client, ms, [client], random.Random(1))) == set(members(4))


def test_a_relayed_post_goes_to_a_few_others_never_back() -> None:
    ms = [ME, *members(100)]
    sender = members(100)[0]
    targets = push_targets(POST, ME, sender, ms, [], random.Random(2))
    assert sender not in targets and len(targets) == fanout(101) == 11
    assert len(set(targets)) == len(targets)


def test_differing_buckets() -> None:
    assert differing({1: "a", 2: "b"}, {1: "a", 2: "c", 3: "d"}) == [2, 3]
    assert differing({1: "a"}, {1: "a"}) == []


def test_exchange_plan_wants_what_they_have_and_gives_what_they_lack() -> None:
    mine = {1: ["a" * 32, "b" * 32], 2: ["c" * 32]}
    theirs = {1: ["b" * 32, "d" * 32], 3: ["e" * 32]}
    ex = plan_exchange(mine, theirs)
    assert sorted(ex.want) == ["d" * 32, "e" * 32]
    assert ex.give == ["a" * 32], "bucket 2 was not listed by them (cut short): left for the next round"


def test_bounded_ids_cut_at_max_ids() -> None:
    ids = {b: [f"{b:04d}{i:028d}" for i in range(MAX_IDS // 2 + 10)] for b in range(3)}
    out = bounded_ids(ids)
    assert sum(len(v) for v in out.values()) == MAX_IDS and list(out) == [0, 1]


def test_batches_stay_under_the_frame_limit() -> None:
    big = [make_post("FINDING: " + "x" * 4000 + str(i), "alice", KEY, NOW) for i in range(400)]
    sizes = [len(json.dumps(b, separators=(",", ":")).encode()) for b in batches(big)]
    assert len(sizes) > 1 and max(sizes) <= MAX_BATCH_BYTES + 1024
    assert sum(len(b) for b in batches(big)) == 400


@pytest.mark.parametrize(
    "bad",
    [[], {"x": "h"}, {str(i): "h" for i in range(100)}, {"1": 5}, {"-1": "h"}, {"1": "h" * 100}],
)
def test_malformed_digests_are_protocol_errors(bad: object) -> None:
    with pytest.raises(ProtocolError):
        parse_digest(bad)


@pytest.mark.parametrize("bad", [{"1": "nope"}, {"1": ["short"]}, {"1": [5]}, {"1": ["a" * 32] * (MAX_IDS + 1)}])
def test_malformed_id_lists_are_protocol_errors(bad: object) -> None:
    with pytest.raises(ProtocolError):
        parse_ids(bad)
    with pytest.raises(ProtocolError):
        parse_id_list(bad["1"])  # type: ignore[index]


@given(st.integers(min_value=2, max_value=400), st.integers(min_value=0, max_value=10_000))
def test_an_epidemic_of_pushes_reaches_every_member(n: int, seed: int) -> None:
    """Infect-and-forward-once over the real push_targets: everyone gets the post (w.h.p.; the
    anti-entropy sync covers the rest in real meshes, so a miss here must be rare: none in these runs)."""
    rng = random.Random(seed)
    ms = members(n)
    origin = ms[0]
    post = make_post("STATUS: spread", "alice", KEY, NOW)
    post = replace(post, origin=origin)
    have = {origin}
    queue = [(t, origin) for t in push_targets(post, origin, None, ms, [], rng)]
    while queue:
        node, sender = queue.pop()
        if node in have:
            continue
        have.add(node)
        queue.extend((t, node) for t in push_targets(post, node, sender, ms, [], rng))
    if n <= FULL_PUSH + 1:
        assert have == set(ms)
    else:
        assert n - len(have) <= max(1, n // 100)

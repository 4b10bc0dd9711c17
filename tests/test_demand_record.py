"""A record's optional `demand` field (issue 14, item 1): it signs and round-trips, is absent when empty (records
without it keep their encoding), and is parsed strictly by the one parser (mesh/demand_wire.py), including on the
records' parse-cache path."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_mcp.errors import ProtocolError
from mesh_mcp.mesh import demand_wire, records
from mesh_mcp.mesh.records import NodeRecord, from_wire, sign, signing_bytes, to_wire, unsigned, verify
from mesh_mcp.serving.demand import DemandMap, Entry, from_items, to_items
from mesh_mcp.serving.demand import from_wire as demand_from_wire
from mesh_mcp.serving.demand import to_wire as demand_to_wire

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(7, 39)))
T0 = 1_700_000_000
ITEMS: tuple[demand_wire.Item, ...] = (
    ("Gemma-3-270M-Q4_K_M", 1386, T0, T0 + 2, False),
    ("SmolLM2-135M-Instruct-Q4_1", 0, 0, 0, True),
)


def make(version: int = 1, **fields: Any) -> NodeRecord:
    return sign(unsigned(KEY, name="n", addresses=("10.0.0.1:9338",), version=version, **fields), KEY)


def wire(record: NodeRecord) -> dict[str, Any]:
    return json.loads(json.dumps(to_wire(record)))


def test_a_record_with_demand_signs_round_trips_and_verifies() -> None:
    r = make(demand=ITEMS)
    w = wire(r)
    assert w["demand"] == [
        ["Gemma-3-270M-Q4_K_M", 1386, T0, T0 + 2, False],
        ["SmolLM2-135M-Instruct-Q4_1", 0, 0, 0, True],
    ]
    back = from_wire(w)
    verify(back)
    assert back == r and back.demand == ITEMS
    view = from_items(back.demand)
    assert view.pins == {"SmolLM2-135M-Instruct-Q4_1"} and view.rate("Gemma-3-270M-Q4_K_M", T0) == pytest.approx(1.386)


def test_without_demand_the_field_is_absent_and_the_encoding_unchanged() -> None:
    plain = make()
    assert "demand" not in to_wire(plain) and b"demand" not in signing_bytes(plain)
    assert signing_bytes(make(demand=ITEMS)) != signing_bytes(plain)


def test_the_signature_covers_the_demand() -> None:
    w = wire(make(demand=ITEMS))
    w["demand"][0][1] = 999_999  # a relay inflating the demand
    with pytest.raises(ProtocolError, match="bad signature"):
        verify(from_wire(w))


@pytest.mark.parametrize(
    ("demand", "message"),
    [
        ([], "left out when empty"),
        ({}, "must be a list"),
        ([["b", 1, 1, 1, False], ["a", 1, 1, 1, False]], "comes after 'b'"),
        ([["a", 1, 1, 1, False], ["a", 1, 1, 1, False]], "appears twice"),
        ([["a", 1.0, 1, 1, False]], "rate must be an integer"),
        ([["a", 1, 1, 1, 1]], "pinned must be a boolean"),
        ([["a", 0, 0, 0, False]], "says nothing"),
        ([["a\n", 1, 1, 1, False]], "control characters"),
        ([[f"m{i:02}", 1, 1, 1, False] for i in range(demand_wire.MAX_WIRE + 1)], "more than the 24 allowed"),
    ],
)
def test_malformed_demand_is_refused(demand: object, message: str) -> None:
    w = wire(make(version=2))
    w["demand"] = demand
    with pytest.raises(ProtocolError, match=message):
        from_wire(w)


@pytest.mark.parametrize(("index", "value"), [(1, 1386.0), (2, float(T0)), (4, 0)])
def test_a_wire_form_equal_to_a_parsed_one_but_of_other_types_is_refused(index: int, value: object) -> None:
    """The parse cache answers a wire dict `==` to one it parsed; Python's == takes 1.0 for 1 and 0 for False."""
    w = wire(make(version=3, demand=ITEMS))
    from_wire(w)  # now cached
    w["demand"][0][index] = value
    assert w == wire(make(version=3, demand=ITEMS))
    with pytest.raises(ProtocolError):
        from_wire(w)


@pytest.mark.parametrize(
    "bad",
    [
        (("b", 1, 1, 1, False), ("a", 1, 1, 1, False)),
        (("a", 1.5, 1, 1, False),),
        [("a", 1, 1, 1, False)],
        (("a", 1, 1, 1, 1),),
    ],
)
def test_signing_a_record_with_bad_demand_is_a_local_error(bad: Any) -> None:
    with pytest.raises(ValueError, match="invalid node record: demand"):
        make(demand=bad)


def test_the_wire_name_limit_is_the_records() -> None:
    assert demand_wire.MAX_NAME == records.MAX_NAME


NAMES = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12).filter(str.isprintable)
VIEWS = st.builds(
    lambda entries, pins: DemandMap(entries, frozenset(pins)),
    st.dictionaries(
        NAMES,
        st.builds(
            lambda rate, a, b: Entry(rate, min(a, b), max(a, b)),
            st.floats(min_value=0.001, max_value=1e4),
            st.floats(min_value=T0, max_value=T0 + 10**6),
            st.floats(min_value=T0, max_value=T0 + 10**6),
        ),
        max_size=demand_wire.PUBLISH_K,
    ),
    st.sets(NAMES, max_size=demand_wire.MAX_PINS),
)


@settings(max_examples=150, deadline=None)
@given(VIEWS)
def test_any_publishable_view_signs_travels_and_parses_back_to_the_same_view(view: DemandMap) -> None:
    items = to_items(view)
    r = make(demand=items)
    back = from_wire(wire(r))
    verify(back)
    assert back.demand == items
    assert from_items(back.demand) == demand_from_wire(demand_to_wire(view))
    assert to_items(from_items(back.demand)) == items  # the canonical form is a fixed point

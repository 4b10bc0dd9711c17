"""Gossip's wire messages (pure): the three messages, their strict parsing and their bounded JSON form.

The membership exchange (which message is sent when, and what goes in it) is `gossip.py`'s; this module is only
what travels. Every message carries `v` (`PROTOCOL`) and `type`, and exactly these fields:

    syn    {full, pull, digest, hb}
    ack    {full, hb, digest, records, wants, more}
    delta  {records, wants, more}

`digest` rows are (node id, record version) and `hb` rows (node id, heartbeat), packed binary, 16 and 12 bytes
before base64 (a node id is its 8 raw bytes; a heartbeat is a u32, a version a u64 no greater than `MAX_INT`).
`records` are signed records in their wire form (signatures are checked by `Gossip`, not here), `wants` node ids.
Lists are bounded (MAX_ROWS rows, MAX_RECORDS records of at most RECORD_BUDGET bytes together), so every message
stays under MAX_MESSAGE_BYTES; `parse_message` refuses anything else with ProtocolError, except up to
MAX_UNKNOWN fields a newer version added, which it ignores (forward compatibility, as records keep theirs).
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh_mcp.errors import ProtocolError

from .records import MAX_INT, NodeRecord, b64, from_wire, is_node_id, unb64, wire_form
from .wire import decode_json

PROTOCOL = 1
MAX_MESSAGE_BYTES = 1 << 20
MAX_ROWS = 8192  # rows per digest or heartbeat list (so the largest mesh one full digest covers)
MAX_RECORDS = 512  # records per message
RECORD_BUDGET = 512 * 1024  # encoded record bytes one message may carry (all lists full: < 1 MiB)
U32_MAX = (1 << 32) - 1  # the greatest heartbeat an `hb` row carries
MAX_UNKNOWN = 4  # fields a newer version may add to a message: ignored here (the size limit still holds)
_HB = struct.Struct(">8sI")  # node id (8 raw bytes), heartbeat
_DIGEST = struct.Struct(">8sQ")  # node id, record version
_KEYS = {
    "syn": frozenset({"v", "type", "full", "pull", "digest", "hb"}),
    "ack": frozenset({"v", "type", "full", "hb", "digest", "records", "wants", "more"}),
    "delta": frozenset({"v", "type", "records", "wants", "more"}),
}


@dataclass(frozen=True)
class Syn:
    full: bool  # digest lists every member (else only recent changes)
    pull: bool  # sent by a client: answer, but merge nothing from it
    digest: Mapping[bytes, int]  # raw node id → record version
    heartbeats: Mapping[bytes, int]  # raw node id → heartbeat


@dataclass(frozen=True)
class Ack:
    full: bool  # the answer to a full syn
    heartbeats: Mapping[bytes, int]
    digest: Mapping[bytes, int]  # the responder's recent changes the syn did not list
    records: tuple[NodeRecord, ...]
    wants: tuple[str, ...]
    more: bool  # records were left out: the next round should be a full sync


@dataclass(frozen=True)
class Delta:
    records: tuple[NodeRecord, ...]
    wants: tuple[str, ...] = ()
    more: bool = False  # wanted records were left out: the next round should be a full sync


Message = Syn | Ack | Delta


def message_to_wire(msg: Message) -> dict[str, Any]:
    if isinstance(msg, Syn):
        return {
            "v": PROTOCOL,
            "type": "syn",
            "full": msg.full,
            "pull": msg.pull,
            "digest": b64(_pack(_DIGEST, msg.digest)),
            "hb": b64(_pack(_HB, msg.heartbeats)),
        }
    if isinstance(msg, Ack):
        return {
            "v": PROTOCOL,
            "type": "ack",
            "full": msg.full,
            "hb": b64(_pack(_HB, msg.heartbeats)),
            "digest": b64(_pack(_DIGEST, msg.digest)),
            "records": [_wire(r) for r in msg.records],
            "wants": list(msg.wants),
            "more": msg.more,
        }
    return {
        "v": PROTOCOL,
        "type": "delta",
        "records": [_wire(r) for r in msg.records],
        "wants": list(msg.wants),
        "more": msg.more,
    }


def parse_message(obj: object) -> Message:
    """A gossip message from its wire form, strictly: ProtocolError for anything unexpected.

    Signatures are not checked here (`Gossip` verifies a record before merging it)."""
    if not isinstance(obj, dict):
        raise ProtocolError("a gossip message must be an object")
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL:
        raise ProtocolError(f"gossip protocol {version!r:.20} is not supported (this node speaks {PROTOCOL})")
    kind = obj.get("type")
    expected = _KEYS.get(kind) if isinstance(kind, str) else None
    if expected is None:
        raise ProtocolError(f"unknown gossip message type {kind!r:.40}")
    if not expected <= obj.keys() or len(obj.keys() - expected) > MAX_UNKNOWN:
        raise ProtocolError(f"gossip {kind}: fields must be {sorted(expected)} (and at most {MAX_UNKNOWN} others)")
    if kind == "syn":
        return Syn(
            full=_flag(obj, "full"),
            pull=_flag(obj, "pull"),
            digest=_rows(obj, "digest", _DIGEST),
            heartbeats=_rows(obj, "hb", _HB),
        )
    records = obj["records"]
    if not isinstance(records, list) or len(records) > MAX_RECORDS:
        raise ProtocolError(f"gossip {kind}: records must be a list of at most {MAX_RECORDS}")
    parsed = tuple(from_wire(r) for r in records)
    wants = obj["wants"]
    if not isinstance(wants, list) or len(wants) > MAX_ROWS or not all(is_node_id(w) for w in wants):
        raise ProtocolError(f"gossip {kind}: wants must be a list of at most {MAX_ROWS} node ids")
    if kind == "delta":
        return Delta(records=parsed, wants=tuple(wants), more=_flag(obj, "more"))
    return Ack(
        full=_flag(obj, "full"),
        heartbeats=_rows(obj, "hb", _HB),
        digest=_rows(obj, "digest", _DIGEST),
        records=parsed,
        wants=tuple(wants),
        more=_flag(obj, "more"),
    )


def encode(message: dict[str, Any]) -> bytes:
    """Compact JSON, as the transport sends it."""
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    """The inverse of `encode`, bounded by MAX_MESSAGE_BYTES (ProtocolError)."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"gossip message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return decode_json(data)


def _flag(obj: dict[str, Any], key: str) -> bool:
    value = obj[key]
    if not isinstance(value, bool):
        raise ProtocolError(f"gossip message: {key} must be a boolean")
    return value


def _rows(obj: dict[str, Any], key: str, row: struct.Struct) -> dict[bytes, int]:
    data = unb64(obj[key], f"gossip {key}", max_size=MAX_ROWS * row.size)
    if len(data) % row.size:
        raise ProtocolError(f"gossip {key}: {len(data)} bytes is not a whole number of {row.size}-byte rows")
    rows = dict(row.iter_unpack(data))
    if len(rows) * row.size != len(data):
        raise ProtocolError(f"gossip {key}: a node id appears twice")
    if row is _DIGEST and rows and max(rows.values()) > MAX_INT:
        raise ProtocolError(f"gossip {key}: a version beyond {MAX_INT}")
    return rows


def _pack(row: struct.Struct, rows: Mapping[bytes, int]) -> bytes:
    return b"".join(itertools.starmap(row.pack, rows.items()))


def _wire(record: NodeRecord) -> dict[str, Any]:
    return wire_form(record)[0]

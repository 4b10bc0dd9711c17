"""Signed node records: what each member of the mesh says about itself, and their wire form.

A `NodeRecord` is made and signed only by its origin (Ed25519, the node's identity key) and is
carried verbatim by gossip, so any node can check any record it receives, whoever relayed it:
the public key must hash to the node id, and the signature must cover a canonical encoding of
every other field (`signing_bytes`: compact, sorted-key JSON of the wire form without the
signature, behind a domain-separation prefix). `version` orders an origin's records; it is
`max(previous + 1, wall-clock ms)` (`next_version`), so a restarted node, which has forgotten its
old version, still supersedes its old records.

`from_wire` is strict about what it knows: missing fields, wrong types and oversized strings or lists are
`ProtocolError`s. Fields it does not know — a newer version's — are kept verbatim (`extra`: at most 8 per record
and 4 per served model, 2 KiB / 256 B of canonical JSON, lowercase names) and written back when the record is
relayed, so the signature over them still checks and a mixed-version mesh keeps gossiping; the rules ignore them.
Local mistakes (signing a record that breaks the same limits) are `ValueError`s.
The optional fields (`rtt`: the origin's measured round trips to its nearest peers, in tenths of a
ms; `llama_cpp`: its llama.cpp build identity) are left out of the wire form when empty, so records
without them keep their encoding and signature. A served model's optional fields follow the same rule:
`tools` (whether its chat template lets it call tools, as the serving llama-server reports it; absent
while unknown), `think` (whether it is a thinking model: its template has a thinking switch or thinking tags; absent
while unknown), `bytes` (its GGUF size, the launchers' measure of strength; absent when 0) and `ctx` (tokens one
request may hold: the slot context llama-server really gives, capped at the model's training context; absent when 0)
and `slots` (requests it runs at once, llama-server's --parallel: with `in_flight` it says whether requests queue —
the rebalancing rule of serving/assign.py; absent when 0, unknown), and `stages` (a pipeline split's stages as
[node id, first layer, last layer]: every console shows where the split runs; absent for solo), `tps` and `ptps`
(its measured and its predicted decode speed in tenths of a token/s — serving/throughput.py, the planner; absent
while unknown), `shards` (an expert-sharded model's shards as the coordinator placed them: [node id, experts, top-1
agreement in thousandths or -1 while unmeasured, quality gate 1 passed / 0 failed / -1 not yet]; absent otherwise),
`ok` and `err` (requests its server answered since the node started: those that ended well, and those that ended in
an error, whichever node they entered by — metrics/families.py `served`: every node's `top` and console show each
server's errors; each absent when 0, at most 2^53 - 1 so a browser reads it exactly; re-signed with `in_flight`,
never per request).
`demand` (the origin's published demand view, issue 14: which models it wants and how hot they are) is optional
too, absent when empty, present never empty; its form and its one strict parser are `demand_wire.py`'s.

Size: one responsibility earns this module's length (about 690 lines): the signed record format — its fields and
their limits, the canonical signing form and the strict parser that enforces the same limits.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from inference.keys import is_small_order
from mesh_mcp.errors import ProtocolError
from mesh_mcp.mesh import demand_wire
from mesh_mcp.mesh.identity import node_id_for

ROLES = frozenset({"host", "worker", "client", "standby"})
MODEL_STATES = frozenset({"downloading", "loading", "serving", "failed", "stopped"})  # as in mesh_mcp/state.py
MAX_NAME = 128  # node name, model names
MAX_ADDRESS = 255  # "host:port"
MAX_ADDRESSES = 16
MAX_MODELS = 256  # each of models_on_disk, models_served
MAX_SOFTWARE = 128
MAX_RTT = 32  # peers in a record's RTT map (the nearest)
MAX_RTT_TENTHS = 10_000_000  # 1000 s
MAX_INT = (1 << 63) - 1
MAX_SLOTS = 4096  # a served model's request slots (llama-server's --parallel)
# Fields a newer version added, kept verbatim (forward compatibility): at most this many per record / served model,
# their canonical JSON at most this many bytes together, names like the known ones.
MAX_EXTRA = 8
MAX_EXTRA_BYTES = 2048
MAX_SERVED_EXTRA = 4
MAX_SERVED_EXTRA_BYTES = 256
_EXTRA_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")
NODE_ID_LEN = 16  # hex chars: sha256(public key)[:8 bytes]
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64
_DOMAIN = b"mesh-llm/node-record/1\n"
_NODE_ID = re.compile(f"[0-9a-f]{{{NODE_ID_LEN}}}")
_FIELDS = frozenset(
    {
        "node_id",
        "public_key",
        "name",
        "addresses",
        "role",
        "capacity_bytes",
        "models_on_disk",
        "models_served",
        "in_flight",
        "version",
        "software",
        "leaving",
        "signature",
    }
)
_OPTIONAL = frozenset({"rtt", "llama_cpp", "demand"})
_SERVED_FIELDS = frozenset({"name", "state", "in_flight"})
_SERVED_OPTIONAL = frozenset(
    {"tools", "think", "bytes", "ctx", "slots", "stages", "tps", "ptps", "shards", "ok", "err"}
)
MAX_SHARDS = 32  # shards of one expert-sharded model a record lists
# optional counts: `==` takes 1.0 for 1, the cache must not
_SERVED_INTS = ("bytes", "ctx", "slots", "tps", "ptps", "ok", "err")
MAX_TPS = 10_000_000  # a decode speed in tenths of a token/s: 1 M tok/s is past any real server
MAX_STAGES = 32  # stages of one split a record lists
MAX_REQUESTS = (1 << 53) - 1  # a served model's request counts (ok, err): exact as a JavaScript number


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    state: str  # one of MODEL_STATES
    in_flight: int = 0
    tools: bool | None = None  # its chat template can call tools; None: not known (yet)
    size_bytes: int = 0  # the model's GGUF size (all shards); 0: not known
    ctx: int = 0  # tokens one request may hold on this server; 0: not known
    slots: int = 0  # requests it runs at once (llama-server's --parallel); 0: not known
    stages: tuple[tuple[str, int, int], ...] = ()  # a pipeline split: (node id, first layer, last layer) per stage
    tps: int = 0  # measured decode speed, tenths of a token/s (serving/throughput.py); 0: not measured yet
    ptps: int = 0  # the planner's predicted decode speed, tenths of a token/s; 0: no prediction
    shards: tuple[tuple[str, int, int, int], ...] = ()  # expert shards: (node id, experts, agreement ‰ | -1, gate)
    ok: int = 0  # requests its server answered well since the node started (metrics/families.py `served`)
    err: int = 0  # requests its server answered that ended in an error (client_error or upstream_error)
    extra: tuple[tuple[str, str], ...] = ()  # fields of a newer version: (name, canonical JSON), sorted, signed
    think: bool | None = None  # a thinking model (api/reasoning.py); None: not known (yet)


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: str
    public_key: bytes  # 32 bytes, raw Ed25519
    name: str
    addresses: tuple[str, ...]  # "host:port" UDP endpoints of the node's QUIC listener
    role: str  # one of ROLES
    capacity_bytes: int
    models_on_disk: tuple[str, ...] = ()
    models_served: tuple[ServedModel, ...] = ()
    in_flight: int = 0
    version: int = 0
    software: str = ""
    leaving: bool = False
    signature: bytes = b""
    rtt: tuple[tuple[str, int], ...] = ()  # (peer node id, round trip in tenths of a ms), sorted by id
    llama_cpp: str = ""  # llama.cpp build identity: nodes of one split must share it
    demand: tuple[demand_wire.Item, ...] = ()  # the origin's demand view (demand_wire.py), sorted by name
    extra: tuple[tuple[str, str], ...] = ()  # fields of a newer version: (name, canonical JSON), sorted, signed


def next_version(previous: int, now: float) -> int:
    """A version above `previous` and, normally, at the wall clock in ms (`now` is time.time())."""
    return max(previous + 1, int(now * 1000))


def is_node_id(value: object) -> bool:
    return isinstance(value, str) and _NODE_ID.fullmatch(value) is not None


def public_key_bytes(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def unsigned(
    private_key: Ed25519PrivateKey,
    *,
    name: str,
    addresses: tuple[str, ...] = (),
    role: str = "host",
    capacity_bytes: int = 0,
    **fields: Any,
) -> NodeRecord:
    """A record for the key's node, not yet signed (node_id and public_key filled in)."""
    pub = public_key_bytes(private_key)
    return NodeRecord(
        node_id=node_id_for(pub),
        public_key=pub,
        name=name,
        addresses=addresses,
        role=role,
        capacity_bytes=capacity_bytes,
        **fields,
    )


def sign(record: NodeRecord, private_key: Ed25519PrivateKey) -> NodeRecord:
    """`record` signed by its node's key; ValueError if it breaks a limit or is not this key's."""
    if public_key_bytes(private_key) != record.public_key:
        raise ValueError("the private key does not match the record's public key")
    problem = _problem(record)
    if problem:
        raise ValueError(f"invalid node record: {problem}")
    return replace(record, signature=private_key.sign(signing_bytes(record)))


def verify(record: NodeRecord) -> None:
    """ProtocolError unless the key hashes to the node id and the signature covers the record."""
    if _VERIFIED.get(record.signature) == record:
        return  # equal to a record whose signature was checked
    if len(record.public_key) != PUBLIC_KEY_LEN or node_id_for(record.public_key) != record.node_id:
        raise ProtocolError(f"node record {record.node_id!r}: the public key does not match the node id")
    if is_small_order(record.public_key):
        raise ProtocolError(f"node record {record.node_id!r}: a weak public key (a point of small order)")
    try:
        Ed25519PublicKey.from_public_bytes(record.public_key).verify(record.signature, signing_bytes(record))
    except (InvalidSignature, ValueError) as exc:
        raise ProtocolError(f"node record {record.node_id!r} v{record.version}: bad signature") from exc
    _remember(_VERIFIED, record, record)


def signing_bytes(record: NodeRecord) -> bytes:
    """The canonical bytes a record's signature covers: every field but the signature."""
    body = _wire_body(record)
    return _DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# Gossip handles the same record many times (from several peers, in many messages, and on every
# node of a simulation). These caches are keyed by the signature and hold the record: a record
# *equal* to one that was verified, or a wire object equal to one that was parsed, needs no work.
# Only an origin's latest records are handled again (a newer one supersedes the rest), so each origin
# keeps its last `_PER_ORIGIN`: the caches follow the mesh's size, not the time it has run. (A cache of
# the last 16384 records by age grew a 4-node mesh's long-lived nodes by ~1 MiB every 4 minutes, ~25 MiB
# at its bound — the 30-minute soak, bench/p18_soak.py, saw it as growth.)
_PER_ORIGIN = 4
_MAX_ORIGINS = 8192  # as many members as one digest lists (gossip_wire.MAX_ROWS)
_VERIFIED: dict[bytes, NodeRecord] = {}
_Entry = tuple[NodeRecord, dict[str, Any], int]  # a record, its wire form, the length of its JSON
_WIRE: dict[bytes, _Entry] = {}  # by signature
_PARSED: dict[str, _Entry] = {}  # by signature in base64, as on the wire
_BY_ORIGIN: dict[str, list[bytes]] = {}  # node id -> the signatures cached for it, oldest first


def _remember(cache: dict[Any, Any], record: NodeRecord, value: Any, key: Any = None) -> None:
    """Cache `value` under `key` (default: the record's signature), dropping what the record's origin had
    beyond its last `_PER_ORIGIN` records, and the oldest origin's beyond `_MAX_ORIGINS` origins."""
    cache[record.signature if key is None else key] = value
    kept = _BY_ORIGIN.pop(record.node_id, None) or []
    _BY_ORIGIN[record.node_id] = kept  # the most recently seen origin last
    if record.signature not in kept:
        kept.append(record.signature)
    while len(kept) > _PER_ORIGIN:
        _forget(kept.pop(0))
    while len(_BY_ORIGIN) > _MAX_ORIGINS:
        for signature in _BY_ORIGIN.pop(next(iter(_BY_ORIGIN))):
            _forget(signature)


def _forget(signature: bytes) -> None:
    _VERIFIED.pop(signature, None)
    if (entry := _WIRE.pop(signature, None)) is not None:
        _PARSED.pop(entry[1]["signature"], None)


def cached_records() -> int:
    """How many records the caches hold (tests: they follow the origins, not the records ever seen)."""
    return len(_VERIFIED.keys() | _WIRE.keys())


def supersedes(new: NodeRecord, old: NodeRecord | None) -> bool:
    """The total order on one origin's records: version, then signature bytes (an origin that
    signed two records with one version, e.g. after its clock went back, still converges)."""
    if old is None:
        return True
    return (new.version, new.signature) > (old.version, old.signature)


# ---------------------------------------------------------------------------------------- wire


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object, what: str, size: int | None = None, max_size: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(f"{what} must be a base64 string")
    if max_size is not None and len(text) > (max_size + 2) // 3 * 4:
        raise ProtocolError(f"{what} is too long")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"{what} is not base64") from exc
    if size is not None and len(data) != size:
        raise ProtocolError(f"{what} must be {size} bytes")
    return data


def _wire_body(record: NodeRecord) -> dict[str, Any]:
    body = {
        "node_id": record.node_id,
        "public_key": b64(record.public_key),
        "name": record.name,
        "addresses": list(record.addresses),
        "role": record.role,
        "capacity_bytes": record.capacity_bytes,
        "models_on_disk": list(record.models_on_disk),
        "models_served": [_served_wire(m) for m in record.models_served],
        "in_flight": record.in_flight,
        "version": record.version,
        "software": record.software,
        "leaving": record.leaving,
    }
    if record.rtt:
        body["rtt"] = dict(record.rtt)
    if record.llama_cpp:
        body["llama_cpp"] = record.llama_cpp
    if record.demand:
        body["demand"] = demand_wire.to_json(record.demand)
    body.update((key, json.loads(value)) for key, value in record.extra)
    return body


def _served_wire(m: ServedModel) -> dict[str, Any]:
    out: dict[str, Any] = {"name": m.name, "state": m.state, "in_flight": m.in_flight}
    if m.tools is not None:
        out["tools"] = m.tools
    if m.think is not None:
        out["think"] = m.think
    if m.size_bytes:
        out["bytes"] = m.size_bytes
    if m.ctx:
        out["ctx"] = m.ctx
    if m.slots:
        out["slots"] = m.slots
    if m.stages:
        out["stages"] = [list(st) for st in m.stages]
    if m.tps:
        out["tps"] = m.tps
    if m.ptps:
        out["ptps"] = m.ptps
    if m.shards:
        out["shards"] = [list(sh) for sh in m.shards]
    if m.ok:
        out["ok"] = m.ok
    if m.err:
        out["err"] = m.err
    out.update((key, json.loads(value)) for key, value in m.extra)
    return out


def to_wire(record: NodeRecord) -> dict[str, Any]:
    """The JSON-serializable form (bytes as base64)."""
    body = _wire_body(record)
    body["signature"] = b64(record.signature)
    return body


def wire_form(record: NodeRecord) -> tuple[dict[str, Any], int]:
    """`to_wire(record)` and the length of its compact JSON, cached: treat the dict as read-only."""
    hit = _WIRE.get(record.signature)
    if hit is None or (hit[0] is not record and hit[0] != record):
        hit = _cache_wire(record)
    return hit[1], hit[2]


def encoded_size(obj: dict[str, Any]) -> int:
    """len(compact JSON of a wire record), from the cache when `obj` came from `wire_form`."""
    hit = _PARSED.get(obj.get("signature"))  # type: ignore[arg-type]
    if hit is not None and hit[1] is obj:
        return hit[2]
    return len(json.dumps(obj, separators=(",", ":")))


def _cache_wire(record: NodeRecord) -> _Entry:
    wire = to_wire(record)
    entry = (record, wire, len(json.dumps(wire, separators=(",", ":"))))
    _remember(_WIRE, record, entry)
    _remember(_PARSED, record, entry, key=wire["signature"])
    return entry


def from_wire(obj: object) -> NodeRecord:
    """Parse a record from its wire form, strictly (ProtocolError); the signature is not checked
    here: call `verify`."""
    if not isinstance(obj, dict):
        raise ProtocolError("a node record must be an object")
    signature = obj.get("signature")
    hit = _PARSED.get(signature) if isinstance(signature, str) else None
    if hit is not None and (hit[1] is obj or (hit[1] == obj and _exact_numbers(obj))):
        return hit[0]
    record = _parse(obj)
    _cache_wire(record)
    return record


def _exact_numbers(obj: dict[str, Any]) -> bool:
    """Python's == takes True for 1 and 1.0 for 1: check the types `==` cannot see."""
    if type(obj["leaving"]) is not bool or type(obj["version"]) is not int or type(obj["in_flight"]) is not int:
        return False
    if type(obj["capacity_bytes"]) is not int:
        return False
    for m in obj["models_served"]:
        if type(m["in_flight"]) is not int or any(type(m.get(k, 0)) is not int for k in _SERVED_INTS):
            return False
        if any(k in m and type(m[k]) is not bool for k in ("tools", "think")):
            return False
        if any(type(v) is not int for row in (*m.get("stages", ()), *m.get("shards", ())) for v in row[1:]):
            return False
    for item in obj.get("demand", ()):  # [name, milli, as_of, last_wanted, pinned]
        if any(type(v) is not int for v in item[1:4]) or type(item[4]) is not bool:
            return False
    return all(type(v) is int for v in obj.get("rtt", {}).values())


def _parse(obj: dict[str, Any]) -> NodeRecord:
    keys = obj.keys()
    if not _FIELDS <= keys:
        raise ProtocolError(f"node record fields: missing {sorted(_FIELDS - keys)}")
    extra = _extra(obj, keys - _FIELDS - _OPTIONAL, MAX_EXTRA, MAX_EXTRA_BYTES, "node record")
    node_id = obj["node_id"]
    if not is_node_id(node_id):
        raise ProtocolError("node record: node_id must be 16 lowercase hex chars")
    served = _list(obj, "models_served", MAX_MODELS)
    record = NodeRecord(
        node_id=node_id,
        public_key=unb64(obj["public_key"], "public_key", PUBLIC_KEY_LEN),
        name=_str(obj, "name", MAX_NAME),
        addresses=tuple(_strings(obj, "addresses", MAX_ADDRESSES, MAX_ADDRESS)),
        role=_str(obj, "role", 16),
        capacity_bytes=_int(obj, "capacity_bytes"),
        models_on_disk=tuple(_strings(obj, "models_on_disk", MAX_MODELS, MAX_NAME)),
        models_served=tuple(_served(m) for m in served),
        in_flight=_int(obj, "in_flight"),
        version=_int(obj, "version"),
        software=_str(obj, "software", MAX_SOFTWARE),
        leaving=_bool(obj, "leaving"),
        signature=unb64(obj["signature"], "signature", SIGNATURE_LEN),
        rtt=_rtt(obj["rtt"]) if "rtt" in obj else (),
        llama_cpp=_str(obj, "llama_cpp", MAX_SOFTWARE) if "llama_cpp" in obj else "",
        demand=_demand(obj["demand"]) if "demand" in obj else (),
        extra=extra,
    )
    problem = _problem(record)
    if problem:
        raise ProtocolError(f"node record {node_id}: {problem}")
    return record


def _served(obj: object) -> ServedModel:
    if not isinstance(obj, dict) or not _SERVED_FIELDS <= obj.keys():
        raise ProtocolError(
            f"a served model must have exactly {sorted(_SERVED_FIELDS)}, optionally {sorted(_SERVED_OPTIONAL)}"
        )
    extra = _extra(obj, obj.keys() - _SERVED_FIELDS - _SERVED_OPTIONAL, MAX_SERVED_EXTRA, MAX_SERVED_EXTRA_BYTES,
                   "a served model")  # fmt: skip
    if "slots" in obj and type(obj["slots"]) is int and obj["slots"] > MAX_SLOTS:
        raise ProtocolError(f"node record: a served model's slots must be at most {MAX_SLOTS}")
    for key in ("tps", "ptps"):
        if key in obj and type(obj[key]) is int and obj[key] > MAX_TPS:
            raise ProtocolError(f"node record: a served model's {key} must be at most {MAX_TPS}")
    for key in ("ok", "err"):
        if key in obj and type(obj[key]) is int and obj[key] > MAX_REQUESTS:
            raise ProtocolError(f"node record: a served model's {key} must be at most {MAX_REQUESTS}")
    return ServedModel(
        name=_str(obj, "name", MAX_NAME),
        state=_str(obj, "state", 16),
        in_flight=_int(obj, "in_flight"),
        tools=_bool(obj, "tools") if "tools" in obj else None,
        think=_bool(obj, "think") if "think" in obj else None,
        size_bytes=_positive(obj, "bytes") if "bytes" in obj else 0,
        ctx=_positive(obj, "ctx") if "ctx" in obj else 0,
        slots=_positive(obj, "slots") if "slots" in obj else 0,
        stages=_stages(obj["stages"]) if "stages" in obj else (),
        tps=_positive(obj, "tps") if "tps" in obj else 0,
        ptps=_positive(obj, "ptps") if "ptps" in obj else 0,
        shards=_shards(obj["shards"]) if "shards" in obj else (),
        ok=_positive(obj, "ok") if "ok" in obj else 0,
        err=_positive(obj, "err") if "err" in obj else 0,
        extra=extra,
    )


def _extra(obj: dict[str, Any], keys: set[str], count: int, budget: int, what: str) -> tuple[tuple[str, str], ...]:
    """Fields a newer version added: kept verbatim as canonical JSON (so the signature over them still checks and
    gossip carries them on), bounded in number, name and size; ProtocolError past the bounds."""
    if not keys:
        return ()
    if len(keys) > count:
        raise ProtocolError(f"{what}: {len(keys)} unknown fields, more than the {count} a newer version may add")
    out = []
    for key in sorted(keys):
        if not _EXTRA_KEY.fullmatch(key):
            raise ProtocolError(f"{what}: unknown field {key[:40]!r} is not a field name (a-z, 0-9, _; ≤ 32)")
        try:
            out.append((key, canonical_json(obj[key])))
        except ValueError as exc:  # NaN or infinity: not JSON
            raise ProtocolError(f"{what}: unknown field {key!r} is not plain JSON ({exc})") from exc
    if sum(len(k) + len(v) for k, v in out) > budget:
        raise ProtocolError(f"{what}: unknown fields take more than {budget} bytes")
    return tuple(out)


def _shards(value: object) -> tuple[tuple[str, int, int, int], ...]:
    """An expert-sharded model's shards on the wire: [[node id, experts, agreement ‰ or -1, gate 1/0/-1], ...]."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_SHARDS:
        raise ProtocolError(f"a served model's shards must be a list of 1 to {MAX_SHARDS} [node id, experts, ‰, gate]")
    out = []
    for sh in value:
        if not (isinstance(sh, list) and len(sh) == 4 and is_node_id(sh[0])) or any(type(v) is not int for v in sh[1:]):
            raise ProtocolError("a shard must be [node id, experts, agreement in thousandths, gate]")
        node, experts, agreement, gate = sh
        if not (0 < experts <= 100_000 and -1 <= agreement <= 1000 and gate in (-1, 0, 1)):
            raise ProtocolError("a shard's experts must be 1 to 100000, its agreement -1 to 1000, its gate -1, 0 or 1")
        out.append((node, experts, agreement, gate))
    return tuple(out)


def _stages(value: object) -> tuple[tuple[str, int, int], ...]:
    """A split's stages on the wire: [[node id, first layer, last layer], ...], 1 to MAX_STAGES of them."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_STAGES:
        raise ProtocolError(f"a served model's stages must be a list of 1 to {MAX_STAGES} [node id, first, last]")
    out = []
    for st in value:
        if not (isinstance(st, list) and len(st) == 3 and is_node_id(st[0])):
            raise ProtocolError("a stage must be [node id, first layer, last layer]")
        first, last = st[1], st[2]
        if type(first) is not int or type(last) is not int or not 0 <= first <= last <= 100_000:
            raise ProtocolError("a stage's layers must be whole numbers, first ≤ last")
        out.append((st[0], first, last))
    return tuple(out)


def canonical_json(value: Any) -> str:
    """The one encoding of a JSON value: sorted keys, no spaces (what a record's signature covers)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _positive(obj: dict[str, Any], key: str) -> int:
    """An optional count that is left out when 0: present, it must be > 0 (one encoding per record)."""
    value = _int(obj, key)
    if value == 0:
        raise ProtocolError(f"node record: {key} is left out when 0, never sent as 0")
    return value


def _rtt(obj: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(obj, dict) or not obj or len(obj) > MAX_RTT:
        raise ProtocolError(f"node record: rtt must be a non-empty object of at most {MAX_RTT} peers")
    for peer, tenths in obj.items():
        if not is_node_id(peer) or type(tenths) is not int or not 0 <= tenths <= MAX_RTT_TENTHS:
            raise ProtocolError("node record: rtt maps node ids to round trips in tenths of a ms")
    return tuple(sorted(obj.items()))


def _demand(obj: object) -> tuple[demand_wire.Item, ...]:
    items = demand_wire.parse(obj)
    if not items:
        raise ProtocolError("node record: demand is left out when empty, never sent empty")
    return items


def _str(obj: dict[str, Any], key: str, max_len: int) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ProtocolError(f"node record: {key} must be a string")
    if len(value) > max_len:
        raise ProtocolError(f"node record: {key} is longer than {max_len} chars")
    return value


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj[key]
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise ProtocolError(f"node record: {key} must be a non-negative 64-bit integer")
    return value


def _bool(obj: dict[str, Any], key: str) -> bool:
    value = obj[key]
    if not isinstance(value, bool):
        raise ProtocolError(f"node record: {key} must be a boolean")
    return value


def _list(obj: dict[str, Any], key: str, max_items: int) -> list[Any]:
    value = obj[key]
    if not isinstance(value, list):
        raise ProtocolError(f"node record: {key} must be a list")
    if len(value) > max_items:
        raise ProtocolError(f"node record: {key} has more than {max_items} entries")
    return value


def _strings(obj: dict[str, Any], key: str, max_items: int, max_len: int) -> list[str]:
    items = _list(obj, key, max_items)
    for item in items:
        if not isinstance(item, str) or len(item) > max_len:
            raise ProtocolError(f"node record: {key} entries must be strings of at most {max_len} chars")
    return items


def _extra_problem(extra: object, count: int, known: frozenset[str]) -> str:
    if not isinstance(extra, tuple) or len(extra) > count:
        return f"extra must be a tuple of at most {count} (name, JSON) pairs"
    for item in extra:
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            return "extra must hold (name, JSON) string pairs"
        if item[0] in known or not _EXTRA_KEY.fullmatch(item[0]):
            return f"extra field {item[0][:40]!r} is a known field or not a field name"
    return ""


def _problem(r: NodeRecord) -> str:
    """What is wrong with a record's values, or '' (shared by `sign` and `from_wire`)."""
    if why := _extra_problem(r.extra, MAX_EXTRA, _FIELDS | _OPTIONAL):
        return why
    for m in r.models_served:
        if isinstance(m, ServedModel) and (
            why := _extra_problem(m.extra, MAX_SERVED_EXTRA, _SERVED_FIELDS | _SERVED_OPTIONAL)
        ):
            return why
        try:
            if isinstance(m, ServedModel) and m.stages:
                _stages([list(st) for st in m.stages])
            if isinstance(m, ServedModel) and m.shards:
                _shards([list(sh) for sh in m.shards])
        except ProtocolError as exc:
            return str(exc)
    if not is_node_id(r.node_id):
        return "node_id must be 16 lowercase hex chars"
    if len(r.public_key) != PUBLIC_KEY_LEN:
        return f"public_key must be {PUBLIC_KEY_LEN} bytes"
    for key in ("addresses", "models_on_disk", "models_served"):
        if not isinstance(getattr(r, key), tuple):
            return f"{key} must be a tuple"
    if r.role not in ROLES:
        return f"role {r.role!r} is not one of {sorted(ROLES)}"
    if not isinstance(r.name, str) or not 0 < len(r.name) <= MAX_NAME:
        return f"name must be 1 to {MAX_NAME} chars"
    if len(r.addresses) > MAX_ADDRESSES or any(not isinstance(a, str) or not _is_address(a) for a in r.addresses):
        return f"addresses must be at most {MAX_ADDRESSES} 'host:port' strings"
    if len(r.models_on_disk) > MAX_MODELS or any(
        not isinstance(m, str) or not 0 < len(m) <= MAX_NAME for m in r.models_on_disk
    ):
        return f"models_on_disk must be at most {MAX_MODELS} names of 1 to {MAX_NAME} chars"
    if len(r.models_served) > MAX_MODELS:
        return f"models_served has more than {MAX_MODELS} entries"
    for m in r.models_served:
        if (
            not isinstance(m, ServedModel)
            or not isinstance(m.name, str)
            or not 0 < len(m.name) <= MAX_NAME
            or m.state not in MODEL_STATES
            or type(m.in_flight) is not int
            or not 0 <= m.in_flight <= MAX_INT
            or (m.tools is not None and type(m.tools) is not bool)
            or (m.think is not None and type(m.think) is not bool)
            or type(m.size_bytes) is not int
            or not 0 <= m.size_bytes <= MAX_INT
            or type(m.ctx) is not int
            or not 0 <= m.ctx <= MAX_INT
            or type(m.slots) is not int
            or not 0 <= m.slots <= MAX_SLOTS
            or any(type(v) is not int or not 0 <= v <= MAX_TPS for v in (m.tps, m.ptps))
            or any(type(v) is not int or not 0 <= v <= MAX_REQUESTS for v in (m.ok, m.err))
        ):
            return f"served model {m!r:.160} is invalid (state must be one of {sorted(MODEL_STATES)})"
    for key in ("capacity_bytes", "in_flight", "version"):
        value = getattr(r, key)
        if type(value) is not int or not 0 <= value <= MAX_INT:
            return f"{key} must be a non-negative 64-bit integer"
    if not isinstance(r.software, str) or len(r.software) > MAX_SOFTWARE:
        return f"software must be a string of at most {MAX_SOFTWARE} chars"
    if not isinstance(r.llama_cpp, str) or len(r.llama_cpp) > MAX_SOFTWARE:
        return f"llama_cpp must be a string of at most {MAX_SOFTWARE} chars"
    if len(r.rtt) > MAX_RTT or list(r.rtt) != sorted(dict(r.rtt).items()):
        return f"rtt holds at most {MAX_RTT} peers, one entry each, sorted by node id"
    for peer, ms10 in r.rtt:
        if not is_node_id(peer) or type(ms10) is not int or not 0 <= ms10 <= MAX_RTT_TENTHS:
            return "rtt maps node ids to round trips in tenths of a ms"
    if not isinstance(r.leaving, bool):
        return "leaving must be a boolean"
    return demand_wire.problem(r.demand)


def _is_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return (
        bool(sep and host)
        and len(address) <= MAX_ADDRESS
        and port.isascii()
        and port.isdigit()
        and 0 < int(port) < 65536
    )


def tenths(tok_s: object) -> int:
    """A decode speed for the record: tenths of a token/s, 0 when unknown (or not a sane number)."""
    if isinstance(tok_s, bool) or not isinstance(tok_s, int | float) or not 0 < tok_s < MAX_TPS / 10:
        return 0
    return round(tok_s * 10)


def split_stages(placement: dict[str, Any] | None) -> tuple[tuple[str, int, int], ...]:
    """A split's stages for the record (serving/split.py's placement description), else ()."""
    if not placement or placement.get("kind") != "split":
        return ()
    try:
        return tuple((s["node_id"], int(s["layers"][0]), int(s["layers"][1])) for s in placement["stages"])[:32]
    except (KeyError, IndexError, TypeError, ValueError):
        return ()


def expert_shards(placement: dict[str, Any] | None) -> tuple[tuple[str, int, int, int], ...]:
    """An expert-sharded model's shards for the coordinator's record (serving/moe.py's placement description)."""
    if not placement or placement.get("kind") != "expert-shards":
        return ()
    try:
        experts = int(placement["experts_per_shard"])
        out = []
        for sh in placement["shards"][:MAX_SHARDS]:
            quality = sh.get("quality") or {}
            agreement = quality.get("agreement") if isinstance(quality, dict) else None
            milli = round(agreement * 1000) if isinstance(agreement, int | float) and 0 <= agreement <= 1 else -1
            gate = -1 if "passed" not in sh else int(bool(sh["passed"]))
            out.append((str(sh["node_id"]), experts, milli, gate))
        return tuple(out) if 0 < experts <= 100_000 and all(is_node_id(n) for n, *_ in out) else ()
    except (KeyError, TypeError, ValueError, AttributeError):
        return ()

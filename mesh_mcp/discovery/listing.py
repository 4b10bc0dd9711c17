"""The public listing of a mesh: what `--publish` announces and `--auto` / `discover` read (pure, no I/O).

One format for every transport (a Nostr event's content, an mDNS record's payload): a JSON object, UTF-8, at most
`MAX_LISTING_BYTES` encoded::

    {"v": 1, "mesh_id": "<16..64 lowercase hex>", "name": str|null, "region": str|null, "token": "mesh1…",
     "served": [model], "wanted": [model], "on_disk": [model], "capacity_bytes": int, "nodes": int,
     "clients": int, "max_clients": int (0 = no cap), "llama_cpp": "<build identity>", "protocol": int,
     "software": str, "published_at": <unix s>, "addresses": ["host:port", …]}

Listings come from strangers, so `Listing.from_bytes` is strict: the size is checked before parsing, nesting is
bounded, every known field must be present with its type and within its bound, and anything else is a
`ProtocolError` with a sentence (callers drop the listing and log it at debug level). Unknown fields are ignored,
so a later version can add some. The token is only checked for shape here (`mesh1…`, printable ASCII, bounded);
`Listing.invite()` decodes it and checks it belongs to the listed mesh before anyone dials it.

A public listing carries a joinable invite token: whoever reads it can join the mesh.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from mesh_mcp import jsonlimits
from mesh_mcp.errors import InvalidToken, ProtocolError
from mesh_mcp.mesh import tokens

__all__ = ["KIND", "MAX_LISTING_BYTES", "TAG", "VERSION", "Listing"]

KIND = 31990  # NIP-89 "handler information", an addressable (parameterized replaceable) kind: one per (key, d)
TAG = "mesh-llm"  # the `k` / `t` tag value every listing carries, what fetchers filter on
VERSION = 1

# Limits (untrusted input; each generous for a real mesh, small enough that 500 listings stay cheap).
MAX_LISTING_BYTES = 8192  # one listing, encoded; fits an mDNS TXT set and any relay's event limit
MAX_DEPTH = 4  # the format nests 2 levels (object → list of strings)
MAX_NAME = 64
MAX_REGION = 32
MAX_TOKEN = 2048  # a token with a few addresses is ~150-400 characters
MAX_MODELS = 64  # per list
MAX_MODEL_NAME = 128
MAX_BUILD = 128
MAX_SOFTWARE = 64
MAX_ADDRESSES = 16  # as in an invite token
MAX_INT = 2**63 - 1

_MESH_ID = re.compile(r"[0-9a-f]{16,64}")
_TOKEN = re.compile(r"[!-~]+")  # printable ASCII, no spaces
_MODEL_LISTS = ("served", "wanted", "on_disk")
_INTS = ("capacity_bytes", "nodes", "clients", "max_clients", "protocol", "published_at")


@dataclass(frozen=True)
class Listing:
    """One mesh as it announces itself. Constructing one validates it (`ProtocolError` if invalid)."""

    mesh_id: str
    token: str
    name: str | None = None
    region: str | None = None
    served: tuple[str, ...] = ()
    wanted: tuple[str, ...] = ()
    on_disk: tuple[str, ...] = ()
    capacity_bytes: int = 0
    nodes: int = 0
    clients: int = 0
    max_clients: int = 0  # 0 = no cap
    llama_cpp: str = ""
    protocol: int = 0
    software: str = ""
    published_at: int = 0
    addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_mesh_id(self.mesh_id)
        _check_text("token", self.token, MAX_TOKEN, nullable=False)
        if not self.token.startswith(tokens.PREFIX) or not _TOKEN.fullmatch(self.token):
            raise ProtocolError(f"listing of mesh {self.mesh_id[:8]}: the token is not an invite token (mesh1…)")
        _check_text("name", self.name, MAX_NAME, nullable=True)
        _check_text("region", self.region, MAX_REGION, nullable=True)
        for key in _MODEL_LISTS:
            _check_list(key, getattr(self, key), MAX_MODELS, MAX_MODEL_NAME)
        for key in _INTS:
            _check_int(key, getattr(self, key))
        _check_text("llama_cpp", self.llama_cpp, MAX_BUILD, nullable=False, empty=True)
        _check_text("software", self.software, MAX_SOFTWARE, nullable=False, empty=True)
        _check_list("addresses", self.addresses, MAX_ADDRESSES, 255)
        for address in self.addresses:
            try:
                tokens.split_address(address)
            except InvalidToken as exc:
                raise ProtocolError(f"listing of mesh {self.mesh_id[:8]}: {exc}") from exc

    @property
    def full(self) -> bool:
        """True when the mesh takes no more clients (`max_clients` reached)."""
        return self.max_clients > 0 and self.clients >= self.max_clients

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_bytes(self) -> bytes:
        """The wire form; `ProtocolError` when over `MAX_LISTING_BYTES` (see `trimmed`)."""
        data = json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()
        if len(data) > MAX_LISTING_BYTES:
            raise ProtocolError(
                f"listing of mesh {self.mesh_id[:8]} is {len(data)} bytes, over the {MAX_LISTING_BYTES} allowed: "
                "list fewer models (Listing.trimmed() drops models on disk, then wanted, then served)"
            )
        return data

    def trimmed(self) -> Listing:
        """This listing with models dropped (on disk first, then wanted, then served, from the end) until it fits
        `MAX_LISTING_BYTES`: what a publisher with a long model list sends."""
        listing = self
        for key in _MODEL_LISTS[::-1]:
            while _size(listing) > MAX_LISTING_BYTES and getattr(listing, key):
                listing = replace(listing, **{key: getattr(listing, key)[:-1]})
        return listing

    def invite(self) -> tokens.InviteToken:
        """The decoded invite token; `ProtocolError` when it is malformed or names another mesh than `mesh_id`
        (a listing that lies about its mesh). Call before dialing a listed mesh."""
        try:
            token = tokens.decode(self.token)
        except InvalidToken as exc:
            raise ProtocolError(f"listing of mesh {self.mesh_id[:8]} carries a bad invite token: {exc}") from exc
        if tokens.mesh_id_hex(token) != self.mesh_id:
            raise ProtocolError(
                f"listing of mesh {self.mesh_id[:8]} carries the token of another mesh "
                f"({tokens.mesh_id_hex(token)[:8]}): ignored"
            )
        return token

    @classmethod
    def from_dict(cls, obj: Any) -> Listing:
        """A listing from parsed JSON; `ProtocolError` when malformed. Unknown keys are ignored."""
        if not isinstance(obj, dict):
            raise ProtocolError("a listing must be a JSON object")
        version = obj.get("v")
        if type(version) is not int or version != VERSION:
            raise ProtocolError(f"listing version {version!r:.20} is not supported (this node reads {VERSION})")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in obj:
                raise ProtocolError(f"listing has no {f.name!r} field")
            value = obj[f.name]
            if f.name in (*_MODEL_LISTS, "addresses"):
                if not isinstance(value, list):
                    raise ProtocolError(f"listing field {f.name!r} must be a list of strings")
                value = tuple(value)
            values[f.name] = value
        return cls(**values)

    @classmethod
    def from_bytes(cls, data: bytes) -> Listing:
        """Parse a listing received from anyone; `ProtocolError` with a sentence when it is not a valid one."""
        if not isinstance(data, bytes | bytearray):
            raise ProtocolError("a listing must be bytes")
        if len(data) > MAX_LISTING_BYTES:
            raise ProtocolError(f"listing of {len(data)} bytes is over the {MAX_LISTING_BYTES} allowed")
        try:
            obj = jsonlimits.parse_object(bytes(data), max_depth=MAX_DEPTH, max_string=MAX_LISTING_BYTES)
        except jsonlimits.JsonRejected as exc:
            raise ProtocolError(
                f"listing is not a valid JSON object: {str(exc).replace('request body', 'it')}"
            ) from exc
        return cls.from_dict(obj)


def _size(listing: Listing) -> int:
    return len(json.dumps(listing.to_dict(), ensure_ascii=False, separators=(",", ":")).encode())


def _check_mesh_id(value: object) -> None:
    if not isinstance(value, str) or not _MESH_ID.fullmatch(value):
        raise ProtocolError(f"listing mesh_id {value!r:.80} is not 16 to 64 lowercase hex characters")


def _check_text(key: str, value: object, limit: int, *, nullable: bool, empty: bool = False) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, str):
        raise ProtocolError(f"listing field {key!r} must be a string{' or null' if nullable else ''}")
    if len(value) > limit:
        raise ProtocolError(f"listing field {key!r} is {len(value)} characters, over the {limit} allowed")
    if not value and not empty:
        raise ProtocolError(f"listing field {key!r} is empty{' (use null)' if nullable else ''}")
    if not value.isprintable():
        raise ProtocolError(f"listing field {key!r} holds characters that cannot be printed")


def _check_list(key: str, value: object, count: int, limit: int) -> None:
    if not isinstance(value, tuple):
        raise ProtocolError(f"listing field {key!r} must be a list of strings")
    if len(value) > count:
        raise ProtocolError(f"listing field {key!r} has {len(value)} entries, over the {count} allowed")
    for item in value:
        _check_text(f"{key}[]", item, limit, nullable=False)


def _check_int(key: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise ProtocolError(f"listing field {key!r} must be an integer from 0 to {MAX_INT}, not {value!r:.40}")

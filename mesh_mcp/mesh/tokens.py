"""Invite tokens: the copy-paste capability that lets a machine join a mesh (pure, no I/O).

Whoever holds a token can join the mesh, so treat it like a password; only `mesh_id_hex` is
fit for logs, and the secret never appears in a `repr`.

Text form: a bech32m string (BIP-350) with human-readable part ``mesh``, e.g.
``mesh1qyqqzqsrqszsvpcgpy9qkrqdpc8kgetxva5xj6...`` -- lowercase letters and digits only (URL-safe,
no padding, whole token selected by a double click; the bech32 alphabet leaves out ``1 b i o``).
Unlike BIP-173 there is no 90-character limit, and mixed case is accepted. `decode` ignores
whitespace anywhere (line breaks from terminals and mail wrapping, non-breaking spaces) and the
invisible characters some chat apps insert when wrapping (zero-width space, soft hyphen).

The 6-character checksum is a BCH code over the 5-bit symbols: any single-character substitution
and any damage confined to 6 adjacent characters (a transposition, say) is always detected;
other damage (truncation, deletions) slips through with probability about 1 in 10^9, and the
strict binary layout catches most of that too.

Binary payload, protocol 2 (integers big-endian)::

    1 byte    protocol version (the envelope above never changes, so a newer version is recognised)
    16 bytes  mesh id
    32 bytes  mesh secret
    4 bytes   secret epoch (>= 1)
    1 byte    address count n (1..16)
    n times:  1 byte length L (1..255), then L ASCII bytes "host:port"
    1 byte    owner count k (0..8)                               (protocol 2 only)
    k times:  32 bytes, an owner's Ed25519 public key

Owners are the nodes whose signature a key rotation needs (see `rotation.py`): a joiner checks rotations
against the owners in its token, not against whoever introduced it. Protocol 1 tokens (no owner list)
still decode, with no owners: a node that joined through one learns them from the first member it meets.

Addresses are UDP endpoints of the inviting node's QUIC listener: ``192.0.2.7:7000``,
``[2001:db8::1]:7000`` (IPv6 always in brackets) or ``node.example.org:7000``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from mesh_mcp.errors import InvalidToken

__all__ = [
    "MAX_ADDRESSES",
    "MAX_ADDRESS_BYTES",
    "MAX_OWNERS",
    "MAX_TOKEN_CHARS",
    "MESH_ID_BYTES",
    "PREFIX",
    "PROTOCOL_VERSION",
    "SECRET_BYTES",
    "InviteToken",
    "decode",
    "encode",
    "mesh_id_hex",
    "split_address",
]

PROTOCOL_VERSION = 2
"""The token format this code writes (it reads 1 too); tokens carry the version of the node that made them."""

MESH_ID_BYTES = 16
SECRET_BYTES = 32
MAX_ADDRESSES = 16
MAX_ADDRESS_BYTES = 255
MAX_EPOCH = 2**32 - 1
MAX_OWNERS = 8  # rotation.MAX_OWNERS
OWNER_KEY_BYTES = 32

_HRP = "mesh"
PREFIX = _HRP + "1"
"""Every invite token starts with this."""

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_CHAR_VALUE = {c: i for i, c in enumerate(_CHARSET)}
_CHECKSUM_CHARS = 6
_BECH32M_CONST = 0x2BC830A3
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)

_HEADER_BYTES = 1 + MESH_ID_BYTES + SECRET_BYTES + 4 + 1
_MAX_PAYLOAD_BYTES = _HEADER_BYTES + MAX_ADDRESSES * (1 + MAX_ADDRESS_BYTES) + 1 + MAX_OWNERS * OWNER_KEY_BYTES
MAX_TOKEN_CHARS = len(PREFIX) + -(-_MAX_PAYLOAD_BYTES * 8 // 5) + _CHECKSUM_CHARS
"""The longest token `encode` can produce; longer input is rejected before any work."""

# Zero-width space/non-joiner/joiner, word joiner, BOM, soft hyphen: inserted by some chat apps.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

_DAMAGED = "this invite token is damaged ({}): copy it again in full"
_MALFORMED = "this invite token is malformed ({}): ask the mesh for a new one"


@dataclass(frozen=True)
class InviteToken:
    """What a joining node needs: which mesh, the secret proving membership, whom to dial."""

    mesh_id: bytes
    secret: bytes = field(repr=False)
    addresses: tuple[str, ...]
    protocol: int = PROTOCOL_VERSION
    epoch: int = 1  # which rotation of the mesh secret `secret` is (see meshfile.rotate)
    owners: tuple[bytes, ...] = ()  # the mesh owners' public keys at `epoch`; () = unknown (a protocol 1 token)

    def __post_init__(self) -> None:
        if not isinstance(self.mesh_id, bytes) or len(self.mesh_id) != MESH_ID_BYTES:
            raise InvalidToken(f"a mesh id is {MESH_ID_BYTES} bytes")
        if not isinstance(self.secret, bytes) or len(self.secret) != SECRET_BYTES:
            raise InvalidToken(f"a mesh secret is {SECRET_BYTES} bytes")
        if not isinstance(self.addresses, tuple):
            raise InvalidToken("addresses must be a tuple of 'host:port' strings")
        if not 1 <= len(self.addresses) <= MAX_ADDRESSES:
            raise InvalidToken(f"an invite token carries 1 to {MAX_ADDRESSES} addresses, not {len(self.addresses)}")
        for address in self.addresses:
            split_address(address)
        if not 1 <= self.protocol <= 255:
            raise InvalidToken(f"protocol version {self.protocol} is out of range 1..255")
        if not 1 <= self.epoch <= MAX_EPOCH:
            raise InvalidToken(f"secret epoch {self.epoch} is out of range 1..{MAX_EPOCH}")
        if not isinstance(self.owners, tuple) or len(self.owners) > MAX_OWNERS:
            raise InvalidToken(f"an invite token names at most {MAX_OWNERS} owners")
        if any(not isinstance(o, bytes) or len(o) != OWNER_KEY_BYTES for o in self.owners):
            raise InvalidToken(f"an owner is a {OWNER_KEY_BYTES}-byte public key")


def mesh_id_hex(token: InviteToken) -> str:
    """The mesh id as 32 hex characters: safe to log (unlike the token or its secret)."""
    return token.mesh_id.hex()


def split_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` into host (IPv6 without brackets) and port; `InvalidToken` if malformed."""
    if not isinstance(address, str) or not address.isascii() or not address.isprintable():
        raise InvalidToken(f"address {address!r} must be printable ASCII 'host:port'")
    if len(address) > MAX_ADDRESS_BYTES:
        raise InvalidToken(f"address {address[:40]!r}... is longer than {MAX_ADDRESS_BYTES} characters")
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise InvalidToken(f"address {address!r} is not 'host:port'")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidToken(f"address {address!r} has no valid port (1..65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise InvalidToken(f"address {address!r}: {host!r} is not an IPv6 address") from exc
    elif ":" in host:
        raise InvalidToken(f"address {address!r}: write IPv6 addresses in brackets, like [::1]:7000")
    elif all(part.isdigit() for part in host.split(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as exc:
            raise InvalidToken(f"address {address!r}: {host!r} is not an IPv4 address") from exc
    elif len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
        raise InvalidToken(f"address {address!r}: {host!r} is not a valid host name")
    return host, int(port_text)


def encode(token: InviteToken) -> str:
    """The token's text form (see the module docstring)."""
    if token.protocol != PROTOCOL_VERSION:
        raise InvalidToken(f"this mesh-llm writes protocol {PROTOCOL_VERSION} tokens, not {token.protocol}")
    payload = bytearray([token.protocol])
    payload += token.mesh_id + token.secret + token.epoch.to_bytes(4, "big")
    payload.append(len(token.addresses))
    for address in token.addresses:
        raw = address.encode("ascii")
        payload.append(len(raw))
        payload += raw
    payload.append(len(token.owners))
    for owner in token.owners:
        payload += owner
    return _wrap(bytes(payload))


def decode(text: str) -> InviteToken:
    """Parse a token as pasted by a user; `InvalidToken` says what is wrong and what to do."""
    payload = _unwrap(text)
    protocol = payload[0]
    if protocol > PROTOCOL_VERSION:
        raise InvalidToken(
            f"this token is for mesh protocol {protocol}; upgrade mesh-llm (this version speaks protocol "
            f"{PROTOCOL_VERSION})"
        )
    if protocol < 1:
        raise InvalidToken(_MALFORMED.format(f"unknown protocol {protocol}"))
    if len(payload) < _HEADER_BYTES:
        raise InvalidToken(_MALFORMED.format("too short"))
    pos = 1
    mesh_id = payload[pos : pos + MESH_ID_BYTES]
    pos += MESH_ID_BYTES
    secret = payload[pos : pos + SECRET_BYTES]
    pos += SECRET_BYTES
    epoch = int.from_bytes(payload[pos : pos + 4], "big")
    pos += 4
    count = payload[pos]
    pos += 1
    addresses: list[str] = []
    for _ in range(count):
        if pos >= len(payload):
            raise InvalidToken(_MALFORMED.format("address list cut short"))
        length = payload[pos]
        raw = payload[pos + 1 : pos + 1 + length]
        if len(raw) != length:
            raise InvalidToken(_MALFORMED.format("address list cut short"))
        try:
            addresses.append(raw.decode("ascii"))
        except UnicodeDecodeError as exc:
            raise InvalidToken(_MALFORMED.format("address is not ASCII")) from exc
        pos += 1 + length
    owners: list[bytes] = []
    if protocol >= 2:
        if pos >= len(payload):
            raise InvalidToken(_MALFORMED.format("owner list missing"))
        n_owners = payload[pos]
        pos += 1
        if n_owners > MAX_OWNERS:
            raise InvalidToken(_MALFORMED.format(f"at most {MAX_OWNERS} owners"))
        for _ in range(n_owners):
            owner = payload[pos : pos + OWNER_KEY_BYTES]
            if len(owner) != OWNER_KEY_BYTES:
                raise InvalidToken(_MALFORMED.format("owner list cut short"))
            owners.append(owner)
            pos += OWNER_KEY_BYTES
    if pos != len(payload):
        raise InvalidToken(_MALFORMED.format(f"{len(payload) - pos} unexpected trailing bytes"))
    try:
        return InviteToken(
            mesh_id=mesh_id,
            secret=secret,
            addresses=tuple(addresses),
            protocol=protocol,
            epoch=epoch,
            owners=tuple(owners),
        )
    except InvalidToken as exc:
        raise InvalidToken(_MALFORMED.format(exc)) from exc


# --- bech32m envelope -------------------------------------------------------------------------


def _polymod(values: list[int]) -> int:
    chk = 1
    for value in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ value
        for i, gen in enumerate(_GEN):
            if (top >> i) & 1:
                chk ^= gen
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _wrap(payload: bytes) -> str:
    """bech32m-encode `payload` under the ``mesh`` prefix."""
    data = _regroup(payload, 8, 5)
    mod = _polymod(_hrp_expand(_HRP) + data + [0] * _CHECKSUM_CHARS) ^ _BECH32M_CONST
    data += [(mod >> 5 * (_CHECKSUM_CHARS - 1 - i)) & 31 for i in range(_CHECKSUM_CHARS)]
    return PREFIX + "".join(_CHARSET[v] for v in data)


def _unwrap(text: str) -> bytes:
    """Clean up pasted text, check prefix, alphabet and checksum; return the payload (non-empty)."""
    cleaned = "".join(text.translate(_INVISIBLE).split())
    if not cleaned:
        raise InvalidToken("the invite token is empty: paste the whole token (it starts with 'mesh1')")
    if len(cleaned) > MAX_TOKEN_CHARS:
        raise InvalidToken(f"this is too long to be an invite token ({len(cleaned)} characters)")
    for pos, char in enumerate(cleaned):
        if not char.isascii():  # checked before lower(): "\u212a".lower() == "k"
            raise InvalidToken(_DAMAGED.format(f"unexpected character {char!r} at position {pos + 1}"))
    lowered = cleaned.lower()
    if not lowered.startswith(PREFIX):
        if PREFIX.startswith(lowered):
            raise InvalidToken(_DAMAGED.format("cut short"))
        raise InvalidToken(f"this is not a mesh-llm invite token: invite tokens start with {PREFIX!r}")
    body = lowered[len(PREFIX) :]
    values: list[int] = []
    for pos, char in enumerate(body, start=len(PREFIX)):
        if char not in _CHAR_VALUE:
            raise InvalidToken(_DAMAGED.format(f"unexpected character {cleaned[pos]!r} at position {pos + 1}"))
        values.append(_CHAR_VALUE[char])
    if len(values) <= _CHECKSUM_CHARS:
        raise InvalidToken(_DAMAGED.format("cut short"))
    if _polymod(_hrp_expand(_HRP) + values) != _BECH32M_CONST:
        raise InvalidToken(_DAMAGED.format("checksum mismatch"))
    try:
        payload = bytes(_regroup(values[:-_CHECKSUM_CHARS], 5, 8, pad=False))
    except ValueError as exc:
        raise InvalidToken(_MALFORMED.format(exc)) from exc
    if not payload:
        raise InvalidToken(_MALFORMED.format("empty"))
    return payload


def _regroup(values: bytes | list[int], from_bits: int, to_bits: int, pad: bool = True) -> list[int]:
    """Repack a sequence of `from_bits`-bit integers as `to_bits`-bit integers (bech32 convertbits)."""
    acc = bits = 0
    out: list[int] = []
    mask = (1 << to_bits) - 1
    keep = (1 << (from_bits + to_bits - 1)) - 1
    for value in values:
        acc = ((acc << from_bits) | value) & keep
        bits += from_bits
        while bits >= to_bits:
            bits -= to_bits
            out.append((acc >> bits) & mask)
    if pad:
        if bits:
            out.append((acc << (to_bits - bits)) & mask)
    elif bits >= from_bits or (acc << (to_bits - bits)) & mask:
        raise ValueError("bad padding")
    return out

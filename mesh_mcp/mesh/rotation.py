"""Signed key-rotation statements: who may change the mesh secret, and the proof that one did (pure, no I/O).

A rotation is a statement signed by an owner of the mesh (an Ed25519 node key named in ``mesh.toml``)::

    mesh id, new epoch, sha256 of the new secret, the owners after it, the node ids it evicts, signer, signature

It carries a hash of the secret, never the secret: statements may be stored, relayed and logged freely; the
secret itself travels only over each member's own authenticated, encrypted connection. A member accepts a
chain of statements only if each one moves the epoch by exactly one, names this mesh, and is signed by an
owner as of the epoch before it (so owners named by one statement may sign the next). Anything else is a
`RotationRefused`.

Binary form (integers big-endian), also the wire and file form (as hex)::

    16 bytes  mesh id
    4 bytes   new epoch (2..2^32-1)
    32 bytes  sha256(new secret)
    1 byte    owner count n (1..MAX_OWNERS), then n × 32-byte Ed25519 public keys (distinct)
    1 byte    evicted count m (0..MAX_EVICT), then m × 8-byte node ids (distinct)
    32 bytes  the signer's public key
    64 bytes  Ed25519 signature over DOMAIN + everything above
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mesh_mcp.errors import RotationRefused
from mesh_mcp.mesh.identity import node_id_for

from .records import public_key_bytes

__all__ = [
    "MAX_CHAIN",
    "MAX_EVICT",
    "MAX_OWNERS",
    "Rotation",
    "check_chain",
    "from_hex",
    "secret_hash",
    "sign",
    "to_hex",
]

MAX_OWNERS = 8
"""Owners of one mesh: a handful of operators' nodes; bounds every token and statement."""
MAX_EVICT = 32
"""Node ids one statement may evict (repeat the rotation to evict more)."""
MAX_CHAIN = 8
"""Statements a node keeps and relays. A member can only authenticate within `meshfile.MAX_PREVIOUS_SECRETS`
rotations of the current epoch, so a longer chain would never be used."""

DOMAIN = b"mesh-llm rotation v1\0"
_PUB = 32
_SIG = 64
_NODE = 8
_MIN_BYTES = 16 + 4 + 32 + 1 + _PUB + 1 + _PUB + _SIG
_MAX_BYTES = 16 + 4 + 32 + 1 + MAX_OWNERS * _PUB + 1 + MAX_EVICT * _NODE + _PUB + _SIG
MAX_HEX = 2 * _MAX_BYTES
"""The longest hex form of a statement (bounds what a reader accepts)."""


@dataclass(frozen=True)
class Rotation:
    mesh_id: bytes
    epoch: int
    secret_sha256: bytes
    owners: tuple[bytes, ...]
    evicted: tuple[str, ...]
    signer: bytes
    signature: bytes = field(repr=False)

    @property
    def signer_id(self) -> str:
        return node_id_for(self.signer)

    def body(self) -> bytes:
        """What the signature covers (after `DOMAIN`)."""
        out = bytearray(self.mesh_id + self.epoch.to_bytes(4, "big") + self.secret_sha256)
        out.append(len(self.owners))
        for owner in self.owners:
            out += owner
        out.append(len(self.evicted))
        for node_id in self.evicted:
            out += bytes.fromhex(node_id)
        return bytes(out + self.signer)

    def to_bytes(self) -> bytes:
        return self.body() + self.signature


def secret_hash(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def _is_node_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == 2 * _NODE and all(c in "0123456789abcdef" for c in value)


def _check_lists(owners: Sequence[bytes], evicted: Sequence[str]) -> None:
    if not 1 <= len(owners) <= MAX_OWNERS:
        raise RotationRefused(f"a mesh has 1 to {MAX_OWNERS} owners, not {len(owners)}")
    if any(not isinstance(o, bytes) or len(o) != _PUB for o in owners) or len(set(owners)) != len(owners):
        raise RotationRefused("owners must be distinct 32-byte Ed25519 public keys")
    if len(evicted) > MAX_EVICT:
        raise RotationRefused(f"one rotation evicts at most {MAX_EVICT} nodes, not {len(evicted)}")
    if any(not _is_node_id(n) for n in evicted) or len(set(evicted)) != len(evicted):
        raise RotationRefused("evicted node ids must be distinct 16-hex-character node ids")


def sign(
    key: Ed25519PrivateKey,
    mesh_id: bytes,
    epoch: int,
    secret: bytes,
    owners: Iterable[bytes],
    evicted: Iterable[str] = (),
) -> Rotation:
    """A statement by `key`'s node that the mesh secret at `epoch` is `secret` (only its hash is in it)."""
    owners_t, evicted_t = tuple(owners), tuple(sorted(evicted))
    _check_lists(owners_t, evicted_t)
    if len(mesh_id) != 16 or not 2 <= epoch < 2**32:
        raise RotationRefused("a rotation names a 16-byte mesh id and an epoch in 2..2^32-1")
    unsigned = Rotation(mesh_id, epoch, secret_hash(secret), owners_t, evicted_t, public_key_bytes(key), b"")
    return replace(unsigned, signature=key.sign(DOMAIN + unsigned.body()))


def to_hex(rotation: Rotation) -> str:
    return rotation.to_bytes().hex()


def from_hex(text: object) -> Rotation:
    """Parse a statement strictly (layout, counts, sizes); the signature is checked by `check_chain`."""
    if not isinstance(text, str) or len(text) > MAX_HEX:
        raise RotationRefused("a rotation statement is a hex string of a bounded size")
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise RotationRefused("a rotation statement is not hex") from exc
    if not _MIN_BYTES <= len(raw) <= _MAX_BYTES:
        raise RotationRefused("a rotation statement has the wrong size")
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        chunk = raw[pos : pos + n]
        if len(chunk) != n:
            raise RotationRefused("a rotation statement is cut short")
        pos += n
        return chunk

    mesh_id = take(16)
    epoch = int.from_bytes(take(4), "big")
    digest = take(32)
    owners = tuple(take(_PUB) for _ in range(take(1)[0]))
    evicted = tuple(take(_NODE).hex() for _ in range(take(1)[0]))
    signer = take(_PUB)
    signature = take(_SIG)
    if pos != len(raw):
        raise RotationRefused("a rotation statement has trailing bytes")
    _check_lists(owners, evicted)
    if epoch < 2:
        raise RotationRefused("a rotation's epoch is at least 2")
    return Rotation(mesh_id, epoch, digest, owners, evicted, signer, signature)


def check_chain(
    chain: Sequence[Rotation], *, mesh_id: bytes, epoch: int, owners: Sequence[bytes]
) -> tuple[tuple[bytes, ...], frozenset[str]]:
    """Verify `chain` (oldest first) against a node at `epoch` with `owners`: each statement of this mesh,
    the epoch exactly one more than the last, signed by an owner as of the epoch before it. Returns the
    owners after the chain and every node id it evicts; `RotationRefused` says which rule broke."""
    if not chain:
        raise RotationRefused("an empty rotation")
    if len(chain) > MAX_CHAIN:
        raise RotationRefused(f"a rotation chain has at most {MAX_CHAIN} statements, not {len(chain)}")
    if not owners:
        raise RotationRefused("this node does not know its mesh's owners yet, so it cannot check a rotation")
    current = tuple(owners)
    evicted: set[str] = set()
    for statement in chain:
        if statement.mesh_id != mesh_id:
            raise RotationRefused("the rotation is for another mesh")
        if statement.epoch <= epoch:
            raise RotationRefused(
                f"a replay: the rotation to epoch {statement.epoch} is not newer than this mesh's epoch {epoch}"
            )
        if statement.epoch != epoch + 1:
            raise RotationRefused(
                f"an epoch jump: the rotation is to epoch {statement.epoch}, this mesh is at epoch {epoch} "
                "(rotations move the epoch by exactly one)"
            )
        if statement.signer not in current:
            raise RotationRefused(
                f"a forgery: the rotation to epoch {statement.epoch} is signed by node {statement.signer_id}, "
                "which is not an owner of this mesh"
            )
        try:
            Ed25519PublicKey.from_public_bytes(statement.signer).verify(statement.signature, DOMAIN + statement.body())
        except (InvalidSignature, ValueError) as exc:
            raise RotationRefused(f"a forgery: the rotation to epoch {statement.epoch} has a bad signature") from exc
        epoch, current = statement.epoch, statement.owners
        evicted.update(statement.evicted)
    return current, frozenset(evicted)

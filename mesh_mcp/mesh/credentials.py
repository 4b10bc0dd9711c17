"""What a node proves and accepts on a mesh connection (`Credentials`: its identity, the mesh id, the current and
superseded secrets, who is evicted) and its TLS certificate, self-signed by its Ed25519 node key — so the certificate
*is* its identity, on QUIC and on the data plane alike."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from mesh_mcp.errors import AuthError
from mesh_mcp.mesh.identity import Identity


@dataclass(frozen=True)
class Credentials:
    identity: Identity
    mesh_id: bytes
    secret: bytes  # the current secret: what this node proves with
    accepted: Callable[[str | None], tuple[bytes, ...]]  # secrets accepted from a node id (None: unknown)
    epoch: int = 0  # the current secret's epoch: told to a node refused for proving an older secret
    previous: tuple[bytes, ...] = ()  # superseded secrets: a new node proving one is told its token is old
    evicted: frozenset[str] = frozenset()  # node ids an owner removed: refused whatever they prove


def make_certificate(key: Ed25519PrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, None)
    )


def raw_public_key(public: Any) -> bytes:
    """The 32 raw bytes of a certificate's Ed25519 public key (`AuthError` for any other kind of key)."""
    if not isinstance(public, Ed25519PublicKey):
        raise AuthError("peer certificate is not an Ed25519 node key")
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

"""Mutual authentication of two mesh nodes over a fresh QUIC connection (pure: no I/O).

    client → server  HELLO     {v, mesh, nonce}                 protocol + mesh id, nothing secret
    server → client  CHALLENGE {v, nonce}
    client → server  AUTH      {node_id, public_key, mac, sig}  proves the mesh secret and its key
    server → client  WELCOME   {node_id, public_key, mac, sig}  the same, the other way

Both proofs cover one transcript: protocol, mesh id, both nonces and both public keys. The
server's public key is the one in its TLS certificate, so a man in the middle (which must present
its own certificate) makes the client's proof useless to the real server. A node without the
secret is refused at AUTH, having learned only the server's certificate; the refusal is logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from inference.errors import AuthError, ProtocolError

from ..identity import node_id_for
from .wire import field

VERSION = 1
NONCE_BYTES = 32


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str, size: int, what: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ProtocolError(f"{what} is not base64") from exc
    if len(data) != size:
        raise ProtocolError(f"{what} must be {size} bytes")
    return data


def nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def transcript(mesh_id: bytes, nonce_c: bytes, nonce_s: bytes, server_pub: bytes, client_pub: bytes) -> bytes:
    return b"mesh-llm/%d|" % VERSION + mesh_id + nonce_c + nonce_s + server_pub + client_pub


def _mac(secret: bytes, role: bytes, t: bytes) -> bytes:
    return hmac.new(secret, role + b"|" + t, hashlib.sha256).digest()


def hello(mesh_id: bytes, nonce_c: bytes) -> dict[str, object]:
    return {"type": "hello", "v": VERSION, "mesh": mesh_id.hex(), "nonce": b64(nonce_c)}


def check_hello(msg: dict[str, object], mesh_id: bytes) -> bytes:
    """The client's nonce; AuthError for another mesh or protocol version."""
    if msg.get("type") != "hello":
        raise ProtocolError("expected hello")
    if msg.get("v") != VERSION:
        raise AuthError(f"peer speaks mesh protocol {msg.get('v')!r}, this node {VERSION}")
    if field(msg, "mesh", str, 64) != mesh_id.hex():
        raise AuthError("peer is from another mesh")
    return unb64(field(msg, "nonce", str, 64), NONCE_BYTES, "nonce")


def challenge(nonce_s: bytes) -> dict[str, object]:
    return {"type": "challenge", "v": VERSION, "nonce": b64(nonce_s)}


def check_challenge(msg: dict[str, object]) -> bytes:
    if msg.get("type") == "refused":
        raise AuthError("the peer refused this node: " + str(msg.get("reason", "")))
    if msg.get("type") != "challenge" or msg.get("v") != VERSION:
        raise ProtocolError("expected challenge")
    return unb64(field(msg, "nonce", str, 64), NONCE_BYTES, "nonce")


def proof(role: str, key: Ed25519PrivateKey, public: bytes, secret: bytes, t: bytes) -> dict[str, object]:
    r = role.encode()
    return {
        "type": role,
        "node_id": node_id_for(public),
        "public_key": b64(public),
        "mac": b64(_mac(secret, r, t)),
        "sig": b64(key.sign(r + b"|" + t)),
    }


@dataclass(frozen=True)
class Peer:
    node_id: str
    public_key: bytes


def parse_public_key(msg: dict[str, object]) -> bytes:
    return unb64(field(msg, "public_key", str, 64), 32, "public_key")


def check_proof(role: str, msg: dict[str, object], secrets: tuple[bytes, ...], t: bytes) -> Peer:
    """Verify a peer's AUTH/WELCOME against transcript `t`; any of `secrets` may have made the MAC."""
    if msg.get("type") == "refused":
        raise AuthError("the peer refused this node: " + str(msg.get("reason", "")))
    if msg.get("type") != role:
        raise ProtocolError(f"expected {role}")
    public = parse_public_key(msg)
    node_id = field(msg, "node_id", str, 64)
    if node_id != node_id_for(public):
        raise AuthError("node id does not match its public key")
    r = role.encode()
    mac = unb64(field(msg, "mac", str, 64), 32, "mac")
    if not any(hmac.compare_digest(mac, _mac(s, r, t)) for s in secrets):
        raise AuthError("the peer does not hold the mesh secret (wrong or old invite token)")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(unb64(field(msg, "sig", str, 128), 64, "sig"), r + b"|" + t)
    except InvalidSignature as exc:
        raise AuthError("bad signature on the handshake") from exc
    return Peer(node_id=node_id, public_key=public)


def refused(reason: str) -> dict[str, object]:
    return {"type": "refused", "reason": reason}

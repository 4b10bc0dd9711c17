"""Mutual authentication of two mesh nodes over a fresh QUIC connection (pure: no I/O).

    client → server  HELLO     {v, mesh, nonce}                 protocol + mesh id, nothing secret
    server → client  CHALLENGE {v, nonce}
    client → server  AUTH      {node_id, public_key, mac, sig}  proves the mesh secret and its key
    server → client  WELCOME   {node_id, public_key, mac, sig}  the same, the other way

Both proofs cover one transcript: protocol, mesh id, both nonces and both public keys. The
server's public key is the one in its TLS certificate, so a man in the middle (which must present
its own certificate) makes the client's proof useless to the real server. A node without the
secret is refused at AUTH, having learned only the server's certificate; the refusal is logged.

A refusal (`{"type": "refused", "reason", "code", "epoch"?}`) names why with a code, so the refused node
can tell its user what to do (`explain`): ``other-mesh`` (HELLO named another mesh), ``old-token`` (the
proof used a secret from before a key rotation; the current epoch is given), ``bad-secret`` (no secret
this mesh ever had, as far as it remembers), ``evicted`` (the node's own key, proven by its signature, was
removed by an owner), ``protocol``. Codes reveal nothing secret: which of our secrets matched is only
told to a node that proved it holds that secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from inference.keys import is_small_order
from mesh_mcp.errors import AuthError, HandshakeRefused, ProtocolError
from mesh_mcp.mesh.identity import node_id_for

from .wire import field

VERSION = 1
NONCE_BYTES = 32
REFUSAL_CODES = ("old-token", "other-mesh", "bad-secret", "evicted", "protocol")
MAX_EPOCH = 2**32 - 1


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
        raise HandshakeRefused(f"peer speaks mesh protocol {msg.get('v')!r}, this node {VERSION}", "protocol")
    if field(msg, "mesh", str, 64) != mesh_id.hex():
        raise HandshakeRefused("peer is from another mesh", "other-mesh")
    return unb64(field(msg, "nonce", str, 64), NONCE_BYTES, "nonce")


def challenge(nonce_s: bytes) -> dict[str, object]:
    return {"type": "challenge", "v": VERSION, "nonce": b64(nonce_s)}


def check_challenge(msg: dict[str, object]) -> bytes:
    if msg.get("type") == "refused":
        raise refusal_error(msg)
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
    public = unb64(field(msg, "public_key", str, 64), 32, "public_key")
    if is_small_order(public):  # no private key owns it: an all-zero signature verifies for some messages
        raise AuthError("a weak public key (a point of small order)")
    return public


def check_proof(role: str, msg: dict[str, object], secrets: tuple[bytes, ...], t: bytes) -> Peer:
    """Verify a peer's AUTH/WELCOME against transcript `t`; any of `secrets` may have made the MAC."""
    if msg.get("type") == "refused":
        raise refusal_error(msg)
    if msg.get("type") != role:
        raise ProtocolError(f"expected {role}")
    public = parse_public_key(msg)
    node_id = field(msg, "node_id", str, 64)
    if node_id != node_id_for(public):
        raise AuthError("node id does not match its public key")
    if not holds_any(role, msg, secrets, t):
        raise HandshakeRefused("the peer does not hold the mesh secret (wrong or old invite token)", "bad-secret")
    _check_signature(role, msg, public, t)
    return Peer(node_id=node_id, public_key=public)


def _check_signature(role: str, msg: dict[str, object], public: bytes, t: bytes) -> None:
    r = role.encode()
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(unb64(field(msg, "sig", str, 128), 64, "sig"), r + b"|" + t)
    except InvalidSignature as exc:
        raise AuthError("bad signature on the handshake") from exc


def holds_any(role: str, msg: dict[str, object], secrets: tuple[bytes, ...], t: bytes) -> bool:
    """Whether the proof's MAC was made with one of `secrets` (constant time per secret)."""
    mac = unb64(field(msg, "mac", str, 64), 32, "mac")
    r = role.encode()
    return any(hmac.compare_digest(mac, _mac(s, r, t)) for s in secrets)


def check_auth(
    msg: dict[str, object],
    t: bytes,
    *,
    accepted: tuple[bytes, ...],
    previous: tuple[bytes, ...] = (),
    evicted: frozenset[str] = frozenset(),
) -> Peer:
    """Server side: verify a client's AUTH. HandshakeRefused names the code to refuse with: ``evicted`` for a
    removed node (only once its signature proves the key is its own), ``old-token`` for a MAC made with one of
    the `previous` secrets that `accepted` leaves out, else ``bad-secret``."""
    if msg.get("type") != "auth":
        raise ProtocolError("expected auth")
    public = parse_public_key(msg)
    if node_id_for(public) in evicted:
        _check_signature("auth", msg, public, t)
        raise HandshakeRefused(f"node {node_id_for(public)} was removed from this mesh", "evicted")
    try:
        return check_proof("auth", msg, accepted, t)
    except HandshakeRefused as exc:
        if exc.code == "bad-secret" and holds_any("auth", msg, previous, t):
            raise HandshakeRefused("the peer proved a secret from before a key rotation", "old-token") from exc
        raise


def refused(reason: str, code: str | None = None, epoch: int | None = None) -> dict[str, object]:
    """A refusal: `reason` in words (for logs), `code` one of `REFUSAL_CODES` for a failed handshake, `epoch`
    only with ``old-token`` (the client proved it held an older secret, so the current epoch is no news)."""
    msg: dict[str, object] = {"type": "refused", "reason": reason}
    if code is not None:
        msg["code"] = code
    if code == "old-token" and epoch is not None:
        msg["epoch"] = epoch
    return msg


def refusal_error(msg: dict[str, object]) -> HandshakeRefused:
    """A received refusal as an error whose message tells the user what happened and what to do."""
    code = msg.get("code")
    epoch = msg.get("epoch")
    epoch = epoch if type(epoch) is int and 1 <= epoch <= MAX_EPOCH else None
    if not isinstance(code, str) or code not in REFUSAL_CODES:
        reason = msg.get("reason")
        text = "".join(c for c in reason[:200] if c.isprintable()) if isinstance(reason, str) else ""
        return HandshakeRefused(f"the node refused this one: {text or 'no reason given'}", "unknown")
    return HandshakeRefused(explain(code, epoch), code, epoch)


def explain(code: str, epoch: int | None = None) -> str:
    """A refusal in words a user can act on."""
    if code == "old-token":
        now = f" (this mesh is now at epoch {epoch})" if epoch is not None else ""
        return (
            f"the mesh refused this node: its invite token is from before a key rotation{now}; ask a member of "
            "the mesh for a new invite token (an owner's `mesh-llm rotate-key` prints one)"
        )
    if code == "other-mesh":
        return (
            "the mesh refused this node: its invite token is for another mesh (the node it names belongs to a "
            "different mesh); check that you copied the right token, or ask a member of your mesh for a new one"
        )
    if code == "evicted":
        return (
            "the mesh refused this node: you were removed from this mesh by an owner (`mesh-llm rotate-key "
            "--evict`), and this node stays refused whatever token it uses; ask an owner if that was a mistake"
        )
    if code == "protocol":
        return (
            "the mesh refused this node: it speaks another version of the mesh protocol; run the same mesh-llm "
            "version on both machines"
        )
    return (
        "the mesh refused this node: wrong secret (the invite token is invalid or forged, or older than the "
        "mesh's last few key rotations); ask a member of the mesh for a new invite token"
    )

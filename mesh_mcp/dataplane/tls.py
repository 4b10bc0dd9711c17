"""TLS 1.3 and the mesh handshake on a data-plane connection: a blocking socket's TLS state, usable by one
reading and one writing thread, and both sides of the handshake that authenticates the peer inside it.

1. TLS 1.3. The worker's certificate is self-signed by its Ed25519 node key (as on QUIC); the
   host presents none. No session tickets, so after the handshake the TLS state only moves when
   data does.
2. Mutual authentication inside TLS with the mesh handshake (`handshake.py`): HELLO → CHALLENGE
   → AUTH → WELCOME, both sides proving the mesh secret (HMAC) and their node key (Ed25519) over
   a transcript of both nonces and both public keys, prefixed `rpc|` so a proof made here is not
   one made for the QUIC plane. The worker's key in the transcript is the one the host saw in the
   TLS certificate, so the host's proof only holds on a TLS session the real worker terminates: a
   man in the middle gains nothing. A peer that fails (no TLS, wrong secret or mesh, garbage,
   too slow) is refused and logged before anything is connected to rpc-server.

Why `ssl.SSLObject` over memory BIOs: two threads copy on each tunnel (`splice.py`), and two threads on one
`ssl.SSLSocket` are as fast, but OpenSSL forbids using an SSL object from two threads at once and CPython
does not lock it (cpython#151508: a crash). So the TLS state lives in an `SSLObject` over memory BIOs:
socket I/O outside the lock, only the in-memory encrypt/decrypt inside it. The reading thread never sends
(what TLS would send in answer waits in the BIO for the writing thread), so a full send buffer can never
block the reader.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh_mcp.dataplane import limits
from mesh_mcp.errors import AuthError, ProtocolError
from mesh_mcp.mesh import handshake as hs
from mesh_mcp.mesh.credentials import Credentials, make_certificate, raw_public_key
from mesh_mcp.mesh.identity import Identity
from mesh_mcp.mesh.wire import decode_json, encode_json

CredentialsProvider = Callable[[], Credentials]


def nodelay(sock: socket.socket) -> None:
    """TCP_NODELAY: RPC is small-message ping-pong."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Tls:
    """An `ssl.SSLObject` over memory BIOs on a blocking socket.

    Before the splice one thread uses it (handshake, control frames). While splicing, one thread
    calls `recv_into` and another `send`; `_lock` serialises the in-memory TLS work only, never
    socket I/O. `recv_into` never sends: bytes TLS queues while reading wait for the next `send`.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        self._lock = threading.Lock()
        self._buf = memoryview(bytearray(limits.CHUNK))
        self._plain = bytearray()  # plaintext read ahead by the control-frame reader
        self._more = False
        self._deadline = time.monotonic() + limits.HANDSHAKE_TIMEOUT_S  # for everything before the splice

    def handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._feed():
                    raise ProtocolError("peer closed the connection during the TLS handshake") from None
        self._flush()
        if self._obj.selected_alpn_protocol() != limits.ALPN:
            raise ProtocolError("peer does not speak the mesh-llm RPC data plane (ALPN)")

    def peer_public_key(self) -> bytes:
        der = self._obj.getpeercert(binary_form=True)
        if not der:
            raise AuthError("peer presented no certificate")
        return raw_public_key(x509.load_der_x509_certificate(der).public_key())

    def _flush(self) -> None:
        if self._out.pending:
            self.sock.sendall(self._out.read())

    def _feed(self) -> bool:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete handshake within {limits.HANDSHAKE_TIMEOUT_S:.0f}s")
        self.sock.settimeout(left)
        n = self.sock.recv_into(self._buf)
        if n:
            self._in.write(self._buf[:n])
        return bool(n)

    # --- control frames (one thread) ---

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send(encode_json(obj))

    def _read_plain(self, size: int) -> bytes:
        while len(self._plain) < size:
            try:
                self._plain += cast(bytes, self._obj.read(limits.CHUNK))
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                raise ProtocolError("peer closed the connection during the handshake") from None
            if not self._feed():
                raise ProtocolError("peer closed the connection during the handshake")
        data = bytes(self._plain[:size])
        del self._plain[:size]
        return data

    def read_json(self) -> dict[str, Any]:
        size = int.from_bytes(self._read_plain(4), "big")
        if size > limits.FRAME_LIMIT:
            raise ProtocolError(f"control frame of {size} bytes exceeds {limits.FRAME_LIMIT}")
        return decode_json(self._read_plain(size))

    def quiet(self) -> bool:
        """Nothing read ahead, decrypted or not: the connection may leave TLS here (`native.py`)."""
        return not self._plain and not self._in.pending and not self._obj.pending()

    def take_read_ahead(self) -> bytes:
        data, self._plain = bytes(self._plain), bytearray()
        return data

    # --- splicing (one reading thread, one writing thread) ---

    def send(self, data: bytes | memoryview) -> None:
        with self._lock:
            self._obj.write(data)  # memory BIO: always writes everything
            out = self._out.read()
        self.sock.sendall(out)

    def recv_into(self, raw: memoryview, out: memoryview) -> int:
        """Block until plaintext arrives; decrypt into `out`. 0 at the end of the stream."""
        obj, incoming, lock, size = self._obj, self._in, self._lock, len(out)
        while True:
            got = 0
            if incoming.pending or self._more:
                with lock:
                    # Read while whole records may be there; skip the read that would only raise
                    # SSLWantReadError (the exception costs more than the check).
                    while got < size and (incoming.pending or obj.pending()):
                        try:
                            got += cast(int, obj.read(size - got, out[got:]))
                        except ssl.SSLWantReadError:
                            break
                        except ssl.SSLZeroReturnError:  # close_notify
                            return got
                    self._more = got == size  # `out` is full: more may be decrypted already
            if got:
                return got
            n = self.sock.recv_into(raw)
            if not n:
                return 0
            with lock:
                incoming.write(raw[:n])


def server_context(identity: Identity) -> ssl.SSLContext:
    """The worker's TLS: TLS 1.3 only, no session tickets, a certificate self-signed by its node key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.num_tickets = 0
    ctx.set_alpn_protocols([limits.ALPN])
    cert = make_certificate(identity.key, identity.node_id)
    key_pem = identity.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with tempfile.TemporaryDirectory(prefix="mesh-llm-tls-") as d:  # 0700; ssl loads only from files
        cert_path, key_path = Path(d) / "cert.pem", Path(d) / "key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def client_context() -> ssl.SSLContext:
    """The connecting side's TLS: no certificate of its own, none checked (the mesh handshake checks the key)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the mesh handshake checks the certificate's key instead
    ctx.set_alpn_protocols([limits.ALPN])
    return ctx


def _transcript(mesh_id: bytes, nonce_c: bytes, nonce_s: bytes, server_pub: bytes, client_pub: bytes) -> bytes:
    return b"rpc|" + hs.transcript(mesh_id, nonce_c, nonce_s, server_pub, client_pub)


def authenticate_client(tls: Tls, me: Identity, creds: Credentials) -> hs.Peer:
    """The listening side of the mesh handshake: check the connecting peer's proof, prove ourselves."""
    try:
        nonce_c = hs.check_hello(tls.read_json(), creds.mesh_id)
        nonce_s = hs.nonce()
        tls.send_json(hs.challenge(nonce_s))
        auth = tls.read_json()
        client_pub = hs.parse_public_key(auth)
        t = _transcript(creds.mesh_id, nonce_c, nonce_s, me.public_bytes, client_pub)
        claimed = auth.get("node_id") if isinstance(auth.get("node_id"), str) else None
        peer = hs.check_proof("auth", auth, creds.accepted(claimed), t)
    except AuthError:
        with contextlib.suppress(OSError):
            tls.send_json(hs.refused("authentication failed"))
        raise
    tls.send_json(hs.proof("welcome", me.key, me.public_bytes, creds.secret, t))
    return peer


def authenticate_server(tls: Tls, me: Identity, creds: Credentials, remote: str, expect_node_id: str | None) -> hs.Peer:
    """The connecting side of the mesh handshake: prove ourselves, check the server's proof and key."""
    nonce_c = hs.nonce()
    tls.send_json(hs.hello(creds.mesh_id, nonce_c))
    nonce_s = hs.check_challenge(tls.read_json())
    server_pub = tls.peer_public_key()
    t = _transcript(creds.mesh_id, nonce_c, nonce_s, server_pub, me.public_bytes)
    tls.send_json(hs.proof("auth", me.key, me.public_bytes, creds.secret, t))
    peer = hs.check_proof("welcome", tls.read_json(), creds.accepted(None) or (creds.secret,), t)
    if peer.public_key != server_pub:
        raise AuthError("worker's handshake key differs from its TLS certificate")
    if expect_node_id is not None and peer.node_id != expect_node_id:
        raise AuthError(f"{remote} is node {peer.node_id}, not {expect_node_id}")
    return peer

"""Ed25519 public keys no private key owns: the points of small order. OpenSSL's verify accepts them, and for
the all-zero key an all-zero signature verifies about one message in four, so an "identity" under such a key can
be forged by anyone. Every place that takes a peer's key (node records, the handshake, blackboard posts) refuses
them with `is_small_order`.
"""

from __future__ import annotations

# libsodium's `ge25519_has_small_order` list (the sign bit, the top bit of the last byte, is ignored). Found by
# tests/security/test_fuzz_wire.py: the all-zero key with an all-zero signature passed `records.verify`.
_SMALL_ORDER = tuple(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)


def is_small_order(public_key: bytes) -> bool:
    """Whether a raw Ed25519 public key is a point of small order, which no private key owns: refuse it."""
    masked = public_key[:31] + bytes([public_key[31] & 0x7F]) if len(public_key) == 32 else public_key
    return masked in _SMALL_ORDER

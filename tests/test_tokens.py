"""Invite tokens: round trips, and every kind of copy-paste damage gives a clear InvalidToken."""

from __future__ import annotations

import dataclasses
import random
import string
from collections.abc import Callable

import pytest

from mesh_mcp.errors import ConfigError, InvalidToken
from mesh_mcp.mesh import tokens
from mesh_mcp.mesh.tokens import (
    MAX_ADDRESSES,
    MAX_TOKEN_CHARS,
    PREFIX,
    PROTOCOL_VERSION,
    InviteToken,
    decode,
    encode,
    mesh_id_hex,
    split_address,
)

MESH_ID = bytes(range(16))
SECRET = bytes(range(100, 132))


def token(*addresses: str, epoch: int = 1) -> InviteToken:
    return InviteToken(
        mesh_id=MESH_ID,
        secret=SECRET,
        addresses=addresses or ("192.168.1.20:7000",),
        protocol=PROTOCOL_VERSION,
        epoch=epoch,
    )


SAMPLE = token("192.168.1.20:7000", "[fd00::1]:7000", epoch=3)
SAMPLE_TEXT = encode(SAMPLE)


def test_sample_format() -> None:
    assert SAMPLE_TEXT.startswith(PREFIX)
    assert set(SAMPLE_TEXT) <= set(string.ascii_lowercase + string.digits)
    assert not set(SAMPLE_TEXT[len(PREFIX) :]) & set("1bio")
    assert decode(SAMPLE_TEXT) == SAMPLE


@pytest.mark.parametrize(
    "addresses",
    [
        ("10.0.0.1:1",),
        ("[::1]:7000",),
        ("[2001:db8::8a2e:370:7334]:65535",),
        ("[fe80::1%eth0]:7000",),
        ("localhost:7000",),
        ("gpu-box.example.org:443", "192.0.2.7:7000", "[::1]:7001"),
        tuple(f"10.0.0.{i}:7000" for i in range(MAX_ADDRESSES)),
        ("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61 + ":1",),  # 253-char host, 255 in all
    ],
)
def test_round_trip(addresses: tuple[str, ...]) -> None:
    t = token(*addresses)
    assert decode(encode(t)) == t


def test_round_trip_random() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        n = rng.randint(1, MAX_ADDRESSES)
        addrs = tuple(f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.1:{rng.randint(1, 65535)}" for _ in range(n))
        t = InviteToken(
            mesh_id=rng.randbytes(16),
            secret=rng.randbytes(32),
            addresses=addrs,
            epoch=rng.randint(1, 2**32 - 1),
        )
        assert decode(encode(t)) == t


def test_longest_token_fits_the_limit() -> None:
    addr = ".".join(["h" * 63] * 3 + ["h" * 57]) + ":65535"
    assert len(addr) == 255
    owners = tuple(bytes([i]) * 32 for i in range(tokens.MAX_OWNERS))
    t = dataclasses.replace(token(*[addr] * MAX_ADDRESSES), owners=owners)
    text = encode(t)
    assert len(text) == MAX_TOKEN_CHARS
    assert decode(text) == t
    with pytest.raises(InvalidToken, match="too long"):
        decode(text + "q")


def test_secret_stays_out_of_repr_and_mesh_id_hex() -> None:
    assert SECRET.hex() not in repr(SAMPLE)
    assert repr(SECRET) not in repr(SAMPLE)
    assert mesh_id_hex(SAMPLE) == MESH_ID.hex()


def test_invalid_token_is_a_config_error() -> None:
    assert issubclass(InvalidToken, ConfigError)


# --- damage -----------------------------------------------------------------------------------


def test_every_single_character_substitution_is_rejected() -> None:
    alphabet = string.printable.strip() + "\u212a\u00e9"  # Kelvin sign lowercases to "k"
    tried = 0
    for pos, original in enumerate(SAMPLE_TEXT):
        for char in alphabet:
            if char.lower() == original:
                continue  # the same character, or a case change: tolerated by design
            damaged = SAMPLE_TEXT[:pos] + char + SAMPLE_TEXT[pos + 1 :]
            with pytest.raises(InvalidToken):
                decode(damaged)
            tried += 1
    assert tried > 10_000


def test_substitution_in_body_says_copy_again() -> None:
    pos = len(SAMPLE_TEXT) // 2
    swap = "q" if SAMPLE_TEXT[pos] != "q" else "p"
    with pytest.raises(InvalidToken, match=r"damaged \(checksum mismatch\): copy it again in full"):
        decode(SAMPLE_TEXT[:pos] + swap + SAMPLE_TEXT[pos + 1 :])


def test_character_outside_alphabet_is_located() -> None:
    pos = 20
    with pytest.raises(InvalidToken, match=r"unexpected character 'b' at position 21"):
        decode(SAMPLE_TEXT[:pos] + "b" + SAMPLE_TEXT[pos + 1 :])


def test_every_truncation_is_rejected() -> None:
    for n in range(len(SAMPLE_TEXT)):
        with pytest.raises(InvalidToken):
            decode(SAMPLE_TEXT[:n])
        if n:
            with pytest.raises(InvalidToken):
                decode(SAMPLE_TEXT[n:])


def test_truncated_message() -> None:
    with pytest.raises(InvalidToken, match=r"damaged.*copy it again"):
        decode(SAMPLE_TEXT[:-10])
    with pytest.raises(InvalidToken, match="cut short"):
        decode("mes")
    with pytest.raises(InvalidToken, match="empty"):
        decode(" \n ")


def test_every_deletion_and_transposition_is_rejected() -> None:
    for pos in range(len(SAMPLE_TEXT)):
        with pytest.raises(InvalidToken):
            decode(SAMPLE_TEXT[:pos] + SAMPLE_TEXT[pos + 1 :])
    for pos in range(len(SAMPLE_TEXT) - 1):
        a, b = SAMPLE_TEXT[pos], SAMPLE_TEXT[pos + 1]
        if a != b:
            with pytest.raises(InvalidToken):
                decode(SAMPLE_TEXT[:pos] + b + a + SAMPLE_TEXT[pos + 2 :])


@pytest.mark.parametrize("text", ["mash1qqqqqqqqqqqq", "sk-abcdef", "https://example.org/invite"])
def test_wrong_prefix(text: str) -> None:
    with pytest.raises(InvalidToken, match=r"not a mesh-llm invite token.*start with 'mesh1'"):
        decode(text)


# --- tolerated --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: f"  {t}\n",
        lambda t: "\n".join(t[i : i + 40] for i in range(0, len(t), 40)),  # terminal/mail wrapping
        lambda t: "\r\n  ".join(t[i : i + 64] for i in range(0, len(t), 64)),
        lambda t: t[:30] + "\u00a0" + t[30:] + "\t",  # non-breaking space
        lambda t: t[:30] + "\u200b" + t[30:60] + "\u00ad" + t[60:],  # zero-width space, soft hyphen
        str.upper,
        lambda t: t[0].upper() + t[1:],  # autocapitalised
    ],
)
def test_whitespace_and_case_are_tolerated(mangle: Callable[[str], str]) -> None:
    assert decode(mangle(SAMPLE_TEXT)) == SAMPLE


# --- versions ---------------------------------------------------------------------------------


def payload(protocol: int) -> bytes:
    body = MESH_ID + SECRET + (1).to_bytes(4, "big") + b"\x01" + bytes([9]) + b"[::1]:700"
    return bytes([protocol]) + body


def test_newer_protocol_says_upgrade() -> None:
    text = tokens._wrap(payload(PROTOCOL_VERSION + 1))
    with pytest.raises(
        InvalidToken, match=rf"this token is for mesh protocol {PROTOCOL_VERSION + 1}; upgrade mesh-llm"
    ):
        decode(text)


def test_newer_protocol_with_another_layout_still_says_upgrade() -> None:
    with pytest.raises(InvalidToken, match="mesh protocol 7; upgrade"):
        decode(tokens._wrap(b"\x07future"))


def test_protocol_zero_is_malformed() -> None:
    with pytest.raises(InvalidToken, match="malformed"):
        decode(tokens._wrap(payload(0)))


def test_encode_refuses_other_protocols() -> None:
    with pytest.raises(InvalidToken):
        encode(dataclasses.replace(SAMPLE, protocol=PROTOCOL_VERSION + 1))


# --- malformed payloads with a valid checksum (made by a buggy or hostile encoder) ------------


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (payload(1)[:40], "too short"),
        (payload(1) + b"\x00", "trailing"),
        (payload(1)[:-1], "cut short"),
        (payload(1)[:53] + b"\x00", "1 to 16 addresses"),
        (payload(1)[:53] + b"\x11" + b"\x09[::1]:700" * 17, "1 to 16 addresses"),
        (payload(1)[:53] + b"\x01\x09[::1]:\xff00", "not ASCII"),
        (payload(1)[:53] + b"\x01\x09[::1]:000", "port"),
        (payload(1)[:49] + b"\x00\x00\x00\x00" + payload(1)[53:], "epoch"),
    ],
)
def test_malformed_payload(raw: bytes, why: str) -> None:
    with pytest.raises(InvalidToken, match=f"malformed.*{why}"):
        decode(tokens._wrap(raw))


def test_nonzero_padding_bits_are_malformed() -> None:
    text = encode(SAMPLE)
    values = [tokens._CHAR_VALUE[c] for c in text[len(PREFIX) : -6]]
    assert (len(values) * 5) % 8  # the last symbol ends in padding bits
    values[-1] |= 1
    mod = tokens._polymod([*tokens._hrp_expand("mesh"), *values, 0, 0, 0, 0, 0, 0]) ^ tokens._BECH32M_CONST
    values += [(mod >> 5 * (5 - i)) & 31 for i in range(6)]
    with pytest.raises(InvalidToken, match=r"malformed.*padding"):
        decode(PREFIX + "".join(tokens._CHARSET[v] for v in values))


def test_checksum_is_bech32m() -> None:
    """Pinned to the BIP-350 test vectors, so other bech32m tools can read and check tokens."""
    for vector in ["a1lqfn3a", "abcdef1l7aum6echk45nj3s0wdvt2fg8x9yrzpqzd3ryx", "?1v759aa"]:
        hrp, _, data = vector.rpartition("1")
        values = [tokens._CHAR_VALUE[c] for c in data]
        assert tokens._polymod(tokens._hrp_expand(hrp) + values) == tokens._BECH32M_CONST


# --- construction and addresses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"mesh_id": b"short"}, "16 bytes"),
        ({"secret": b"x" * 31}, "32 bytes"),
        ({"addresses": ()}, "1 to 16"),
        ({"addresses": tuple(f"10.0.0.{i}:1" for i in range(17))}, "1 to 16"),
        ({"addresses": ["10.0.0.1:1"]}, "tuple"),
        ({"epoch": 0}, "epoch"),
        ({"epoch": 2**32}, "epoch"),
        ({"protocol": 0}, "protocol"),
    ],
)
def test_construction_is_validated(kwargs: dict[str, object], why: str) -> None:
    fields: dict[str, object] = {"mesh_id": MESH_ID, "secret": SECRET, "addresses": ("10.0.0.1:1",), **kwargs}
    with pytest.raises(InvalidToken, match=why):
        InviteToken(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("192.168.1.20:7000", ("192.168.1.20", 7000)),
        ("[::1]:7000", ("::1", 7000)),
        ("[fd00::1]:1", ("fd00::1", 1)),
        ("node-1.example.org:65535", ("node-1.example.org", 65535)),
        ("localhost:7000", ("localhost", 7000)),
    ],
)
def test_split_address(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("::1:7000", "brackets"),
        ("[::g]:7000", "not an IPv6"),
        ("[10.0.0.1]:7000", "not an IPv6"),
        ("999.1.1.1:7000", "not an IPv4"),
        ("10.0.0:7000", "not an IPv4"),
        ("host", "host:port"),
        (":7000", "host:port"),
        ("host:0", "port"),
        ("host:65536", "port"),
        ("host:http", "port"),
        ("host:-1", "port"),
        ("bad_host:7000", "host name"),
        ("-bad.example:7000", "host name"),
        ("a..b:7000", "host name"),
        ("héte:7000", "ASCII"),
        ("host name:7000", "host name"),
        ("host:70 00", "port"),
        ("a" * 64 + ":7000", "host name"),
        ("h" * 250 + ":65535", "longer than 255"),
    ],
)
def test_bad_addresses(address: str, why: str) -> None:
    with pytest.raises(InvalidToken, match=why):
        split_address(address)
    with pytest.raises(InvalidToken):
        token(address)

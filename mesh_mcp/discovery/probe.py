"""Latency to a listed mesh without joining it: a QUIC version-negotiation round trip (issue 15, `discover`, `--auto`).

A listing names its publisher's QUIC endpoints. To rank meshes by distance before holding any token's secret, the
probe sends one datagram shaped as a QUIC Initial of a reserved version (`0x?a?a?a?a`, RFC 9000 §15: never a real
one) from an ephemeral UDP socket; every QUIC server — ours is aioquic's — answers a version it does not speak with
a Version Negotiation packet, statelessly, before any handshake, crypto or admission. The time to that answer is one
network round trip plus the peer's packet parsing: no state is created there, nothing is authenticated, and the
answer (tens of bytes) is smaller than the 1200-byte probe, so probing amplifies nothing. A listed address that
answers nothing within the bound is unknown (None), not an error: listings are untrusted, and addresses may be
unreachable from here (NAT, another LAN).

Each address is probed `TRIES` times, the median kept; the addresses of one listing are probed at once and the best
kept; at most `MAX_ADDRESSES` per listing, so a hostile listing cannot make us spray packets.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Sequence

import anyio

TRIES = 3
MAX_ADDRESSES = 4
PROBE_BYTES = 1200  # the smallest Initial a server may answer (RFC 9000 §14.1)
PROBE_VERSION = 0x1A2A3A4A  # reserved for version negotiation (RFC 9000 §15)


def probe_packet(dcid: bytes, scid: bytes) -> bytes:
    """A long-header packet of a reserved version, padded to `PROBE_BYTES`."""
    head = bytes([0xC0]) + PROBE_VERSION.to_bytes(4, "big") + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
    return head + bytes(PROBE_BYTES - len(head))


def is_answer(data: bytes, scid: bytes) -> bool:
    """A Version Negotiation packet (long header, version 0) addressed to our source connection id."""
    if len(data) < 7 or not data[0] & 0x80 or data[1:5] != b"\0\0\0\0":
        return False
    dlen = data[5]
    return data[6 : 6 + dlen] == scid


class _Probe(asyncio.DatagramProtocol):
    def __init__(self, scid: bytes) -> None:
        self.scid = scid
        self.answered = asyncio.Event()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if is_answer(data, self.scid):
            self.answered.set()


async def _once(host: str, port: int, within_s: float) -> float | None:
    loop = asyncio.get_running_loop()
    scid, dcid = os.urandom(8), os.urandom(8)
    try:
        transport, protocol = await loop.create_datagram_endpoint(lambda: _Probe(scid), remote_addr=(host, port))
    except OSError:
        return None
    try:
        started = time.perf_counter()
        transport.sendto(probe_packet(dcid, scid))
        with anyio.move_on_after(within_s):
            await protocol.answered.wait()
            return (time.perf_counter() - started) * 1000
        return None
    finally:
        transport.close()


def _split(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        return None
    return host.strip("[]"), int(port)


async def rtt_ms(address: str, within_s: float = 1.0) -> float | None:
    """The median of `TRIES` round trips to one "host:port", in ms; None when it never answered."""
    target = _split(address)
    if target is None:
        return None
    samples = [s for s in [await _once(*target, within_s) for _ in range(TRIES)] if s is not None]
    return statistics.median(samples) if samples else None


async def best_rtt_ms(addresses: Sequence[str], within_s: float = 1.0) -> float | None:
    """The lowest `rtt_ms` over a listing's first `MAX_ADDRESSES` addresses, probed at once."""
    results: list[float] = []

    async def one(address: str) -> None:
        if (ms := await rtt_ms(address, within_s)) is not None:
            results.append(ms)

    async with anyio.create_task_group() as tg:
        for address in addresses[:MAX_ADDRESSES]:
            tg.start_soon(one, address)
    return min(results) if results else None

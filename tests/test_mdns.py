"""LAN discovery over mDNS (mesh_mcp/discovery/mdns.py), on real multicast: the TXT codec (pure), announcer and
browse in one process on 127.0.0.1 (two AsyncZeroconf instances), and two network namespaces joined by a veth pair
(as root) where a listing announced in one is browsed, byte for byte, in the other — with no relay anywhere.

Waits are bounded polls of `browse` (each a 2 s window) or of zeroconf's own browser events; the deadlines are
generous because mDNS spaces its packets on purpose (probing ~0.75 s, answers delayed 20-120 ms, queries backing
off 1 s, 2 s, ...)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import ServiceInfo, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

from mesh_mcp.discovery import mdns
from mesh_mcp.discovery.mdns import (
    CHUNK_BYTES,
    MAX_LISTING_BYTES,
    MAX_TXT_BYTES,
    SERVICE_TYPE,
    LanAnnouncer,
    browse,
    decode_txt,
    encode_txt,
)
from mesh_mcp.errors import ProtocolError

ROOT = Path(__file__).resolve().parent.parent
LO = ["127.0.0.1"]
DEADLINE_S = 40.0  # for something to appear in (or vanish from) a browse: many mDNS rounds, on a loaded machine
WINDOW_S = 2.0


def txt(*strings: bytes) -> bytes:
    return b"".join(bytes((len(s),)) + s for s in strings)


def fresh_id() -> str:
    return uuid.uuid4().hex


def listing_for(mesh_id: str, size: int = 300) -> bytes:
    """A listing-shaped payload that names its mesh (browse moves bytes; it does not parse them)."""
    head = json.dumps({"v": 1, "mesh_id": mesh_id, "pad": ""}).encode()
    return head[:-2] + b"x" * max(0, size - len(head)) + head[-2:]


def run(fn: Callable[[], Awaitable[Any]], limit_s: float = 120) -> Any:
    async def main() -> Any:
        with anyio.fail_after(limit_s):
            return await fn()

    return anyio.run(main)


async def browse_until(check: Callable[[list[bytes]], bool], what: str) -> list[bytes]:
    """Browse on 127.0.0.1 until `check(listings)` holds; fail after DEADLINE_S saying `what` never happened."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        got = await browse(WINDOW_S, interfaces=LO)
        if check(got):
            return got
        assert time.monotonic() < deadline, f"{what} within {DEADLINE_S:.0f} s; last browse: {got!r:.300}"


# --- the TXT codec (pure) ---------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=MAX_LISTING_BYTES))
def test_txt_round_trips_every_listing_within_the_limits(listing: bytes) -> None:
    raw = encode_txt(listing)
    assert len(raw) <= MAX_TXT_BYTES
    assert decode_txt(raw) == listing
    # zeroconf's own reading of the record sees the keys this module wrote: one TXT string each, none over 255
    props = ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", properties=raw).properties
    assert props[b"v"] == b"1" and int(props[b"n"] or b"0") == -(-len(listing) // CHUNK_BYTES)


def test_the_largest_listing_fits_one_mdns_packet() -> None:
    raw = encode_txt(b"z" * MAX_LISTING_BYTES)
    assert len(raw) <= MAX_TXT_BYTES < 8966 - 12 - 110  # zeroconf's packet limit less the header and the name


@pytest.mark.parametrize("listing", [b"", b"z" * (MAX_LISTING_BYTES + 1)])
def test_an_empty_or_oversized_listing_is_refused(listing: bytes) -> None:
    with pytest.raises(ProtocolError, match="listing"):
        encode_txt(listing)


FULL = b"a" * CHUNK_BYTES
BAD_TXT = {
    "missing chunk": txt(b"v=1", b"n=3", b"l0=" + FULL, b"l2=tail"),
    "count too small": txt(b"v=1", b"n=1", b"l0=" + FULL, b"l1=tail"),
    "count not a number": txt(b"v=1", b"n=two", b"l0=x"),
    "count zero": txt(b"v=1", b"n=0"),
    "count huge": txt(b"v=1", b"n=99999", b"l0=x"),
    "oversized": txt(b"v=1", b"n=34", *(b"l%d=" % i + FULL for i in range(34))),
    "short middle chunk": txt(b"v=1", b"n=2", b"l0=short", b"l1=tail"),
    "empty chunk": txt(b"v=1", b"n=1", b"l0="),
    "wrong version": txt(b"v=2", b"n=1", b"l0=x"),
    "no version": txt(b"n=1", b"l0=x"),
    "duplicate key": txt(b"v=1", b"v=1", b"n=1", b"l0=x"),
    "key without value": txt(b"v=1", b"n=1", b"l0"),
    "truncated string": b"\x03v=1\x05n=1\xfal0=x",
    "garbage": b"\xff" + bytes(range(40)),
    "nothing of ours": txt(b"hello=world"),
}


@pytest.mark.parametrize("raw", BAD_TXT.values(), ids=BAD_TXT.keys())
def test_malformed_txt_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_txt(raw)


def test_unknown_keys_are_ignored_for_later_versions() -> None:
    assert decode_txt(txt(b"v=1", b"future=yes", b"n=1", b"l0=hi", b"flag")) == b"hi"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2 * MAX_TXT_BYTES))
def test_any_bytes_decode_or_raise_protocol_error(raw: bytes) -> None:
    try:
        decode_txt(raw)
    except ProtocolError:
        pass


def test_addresses_keep_only_ip_literals() -> None:
    got = mdns._ips(["10.0.0.1:7000", "[fe80::1]:7000", "::1", "0.0.0.0:7000", "host.lan:7000", "10.0.0.1"])
    assert got == ["10.0.0.1", "fe80::1", "::1"]


# --- announcer and browse on 127.0.0.1 ------------------------------------------------------------------------------


def test_a_listing_is_browsed_byte_for_byte_updated_and_withdrawn() -> None:
    mesh_id = fresh_id()
    first, second = listing_for(mesh_id, MAX_LISTING_BYTES), listing_for(mesh_id, 700)

    async def main() -> None:
        async with LanAnnouncer(interfaces=LO) as lan:
            await lan.start(first, 7000, ["127.0.0.1:7000"], mesh_id=mesh_id, node_id=fresh_id()[:16])
            got = await browse_until(lambda ls: first in ls, "the announced listing was not browsed")
            assert not [x for x in got if mesh_id.encode() in x and x != first]
            await lan.update(second)
            await browse_until(
                lambda ls: second in ls and first not in ls, "the updated listing did not replace the first"
            )
        await browse_until(lambda ls: all(mesh_id.encode() not in x for x in ls), "the stopped listing lingered")

    run(main)


def test_stop_sends_a_goodbye_that_withdraws_the_service_at_once() -> None:
    """Without the goodbye a browser would keep the service until its records' TTL (75 min for the PTR)."""
    mesh_id = fresh_id()

    async def main() -> None:
        events: list[tuple[str, ServiceStateChange]] = []

        def on_change(zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            events.append((name, state_change))

        watcher = AsyncZeroconf(interfaces=LO)
        browser = AsyncServiceBrowser(watcher.zeroconf, SERVICE_TYPE, handlers=[on_change])
        lan = LanAnnouncer(interfaces=LO)
        try:
            await lan.start(listing_for(mesh_id), 7000, ["127.0.0.1"], mesh_id=mesh_id, node_id="0123456789abcdef")
            name = lan.name
            assert name is not None
            with anyio.fail_after(DEADLINE_S):
                while (name, ServiceStateChange.Added) not in events:
                    await anyio.sleep(0.05)
            await lan.stop()
            await lan.stop()  # idempotent
            with anyio.fail_after(DEADLINE_S):
                while (name, ServiceStateChange.Removed) not in events:
                    await anyio.sleep(0.05)
        finally:
            await lan.stop()
            await browser.async_cancel()
            await watcher.async_close()

    run(main)


def test_malformed_announcements_are_skipped_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    """Strangers' bad TXT records arrive (the debug log names each one dropped) and never reach the caller."""
    mesh_id = fresh_id()
    good = listing_for(mesh_id)
    bad = {f"{fresh_id()[:12]}-{key.replace(' ', '-')}.{SERVICE_TYPE}": raw for key, raw in BAD_TXT.items()}

    async def main() -> None:
        stranger = AsyncZeroconf(interfaces=LO)
        try:
            async with anyio.create_task_group() as tg:
                for i, (name, raw) in enumerate(bad.items()):
                    info = ServiceInfo(
                        SERVICE_TYPE, name, port=7000, properties=raw, server=f"s{i}.local.", parsed_addresses=LO
                    )
                    tg.start_soon(_register, stranger, info)
            async with LanAnnouncer(interfaces=LO) as lan:
                await lan.start(good, 7000, LO, mesh_id=mesh_id, node_id="feedfacefeedface")

                def settled(listings: list[bytes]) -> bool:
                    dropped = {name for name in bad if f"dropped the announcement {name}" in caplog.text}
                    return good in listings and dropped == set(bad)

                with caplog.at_level(logging.DEBUG, "mesh_llm.discovery"):
                    got = await browse_until(settled, "the good listing was not browsed, or a bad one not dropped")
                fragments = {b"x", b"tail", b"short", b"shorttail", FULL, FULL + b"tail", b"hi"}
                assert not fragments & set(got)
        finally:
            await stranger.async_close()

    run(main)


async def _register(azc: AsyncZeroconf, info: ServiceInfo) -> None:
    await (await azc.async_register_service(info))


def test_browse_keeps_at_most_max_services() -> None:
    mesh_ids = [fresh_id() for _ in range(3)]

    async def main() -> None:
        lans = [LanAnnouncer(interfaces=LO) for _ in mesh_ids]
        try:
            async with anyio.create_task_group() as tg:
                for lan, mesh_id in zip(lans, mesh_ids, strict=True):
                    start = partial(lan.start, listing_for(mesh_id), 7000, LO, mesh_id=mesh_id, node_id=mesh_id[:16])
                    tg.start_soon(start)
            await browse_until(lambda ls: all(listing_for(m) in ls for m in mesh_ids), "all three were not browsed")
            assert len(await browse(WINDOW_S, interfaces=LO, max_services=2)) <= 2
        finally:
            for lan in lans:
                await lan.stop()

    run(main)


def test_the_announcer_refuses_no_listing_and_a_second_start() -> None:
    async def main() -> None:
        lan = LanAnnouncer(interfaces=LO)
        with pytest.raises(ProtocolError, match="empty listing"):
            await lan.start(b"", 7000, LO, mesh_id=fresh_id(), node_id="0123456789abcdef")
        assert lan.name is None
        with pytest.raises(RuntimeError, match="before start"):
            await lan.update(b"{}")
        async with lan:
            await lan.start(b"{}", 7000, LO, mesh_id=fresh_id(), node_id="0123456789abcdef")
            with pytest.raises(RuntimeError, match="already announcing"):
                await lan.start(b"{}", 7000, LO, mesh_id=fresh_id(), node_id="0123456789abcdef")
        assert lan.name is None

    run(main)


# --- two network namespaces joined by a veth pair -------------------------------------------------------------------

ANNOUNCE = """
import sys, anyio
from mesh_mcp.discovery.mdns import LanAnnouncer
async def main():
    listing, mesh_id, node_id, addr = bytes.fromhex(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    async with LanAnnouncer() as lan:
        await lan.start(listing, 7000, [addr + ":7000"], mesh_id=mesh_id, node_id=node_id)
        print("announced", flush=True)
        while (line := await anyio.to_thread.run_sync(sys.stdin.readline)).strip() != "stop":
            await lan.update(bytes.fromhex(line.strip()))
            print("updated", flush=True)
    print("stopped", flush=True)
anyio.run(main)
"""
BROWSE = """
import sys, anyio
from mesh_mcp.discovery.mdns import browse
print(" ".join(x.hex() for x in anyio.run(browse, float(sys.argv[1]))) or "-", flush=True)
"""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str, str]]:
    """Namespaces `a` (NET.1) and `b` (NET.2) joined by a veth pair, nothing else: no route out, no relay.
    Yields (a, b, NET); both are deleted (with the veth pair) even when the test fails."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`; the loopback tests cover mDNS here")
    tag = f"{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
    a, b = f"mlm{tag}a", f"mlm{tag}b"
    made: list[str] = []
    try:
        for ns in (a, b):
            r = _ip("netns", "add", ns)
            if r.returncode:
                pytest.skip(f"`ip netns add` failed here ({r.stderr.strip()}): no network namespaces to test in")
            made.append(ns)
        net = 10 + int(uuid.uuid4().hex[:4], 16) % 200
        steps = [
            ("link", "add", f"v{tag}a", "netns", a, "type", "veth", "peer", "name", f"v{tag}b", "netns", b),
            ("-n", a, "addr", "add", f"10.77.{net}.1/24", "dev", f"v{tag}a"),
            ("-n", b, "addr", "add", f"10.77.{net}.2/24", "dev", f"v{tag}b"),
            ("-n", a, "link", "set", f"v{tag}a", "up", "multicast", "on"),
            ("-n", b, "link", "set", f"v{tag}b", "up", "multicast", "on"),
            ("-n", a, "link", "set", "lo", "up"),
            ("-n", b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            r = _ip(*step)
            assert r.returncode == 0, f"ip {' '.join(step)}: {r.stderr}"
        yield a, b, f"10.77.{net}"
    finally:
        for ns in made:
            _ip("netns", "del", ns)  # takes its end of the veth pair with it


def test_two_namespaces_find_each_others_listing_over_a_veth_pair(two_namespaces: tuple[str, str, str]) -> None:
    a, b, net = two_namespaces
    mesh_id = fresh_id()
    first, second = listing_for(mesh_id, MAX_LISTING_BYTES), listing_for(mesh_id, 500)

    def in_ns(ns: str, code: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args]

    def browse_b_until(check: Callable[[list[bytes]], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            out = subprocess.run(in_ns(b, BROWSE, str(WINDOW_S)), capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert out.returncode == 0, out.stderr
            got = [bytes.fromhex(x) for x in out.stdout.split() if x != "-"]
            if check(got):
                return
            assert time.monotonic() < deadline, f"{what} within {DEADLINE_S:.0f} s; saw {len(got)} listings"

    announcer = subprocess.Popen(
        in_ns(a, ANNOUNCE, first.hex(), mesh_id, "a1a1a1a1a1a1a1a1", f"{net}.1"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert announcer.stdin is not None and announcer.stdout is not None
        assert announcer.stdout.readline().strip() == "announced", announcer.stderr and announcer.stderr.read()
        browse_b_until(lambda ls: first in ls, "namespace b did not see namespace a's listing")  # 8 KiB: fragmented
        announcer.stdin.write(second.hex() + "\n")
        announcer.stdin.flush()
        assert announcer.stdout.readline().strip() == "updated"
        browse_b_until(lambda ls: second in ls and first not in ls, "namespace b did not see the update")
        announcer.stdin.write("stop\n")
        announcer.stdin.flush()
        assert announcer.stdout.readline().strip() == "stopped"
        assert announcer.wait(timeout=30) == 0
        browse_b_until(lambda ls: not any(mesh_id.encode() in x for x in ls), "the stopped listing lingered in b")
    finally:
        if announcer.poll() is None:
            announcer.kill()
        announcer.communicate(timeout=30)

"""The discovery flow around the pure rules: merging what the relays and the LAN say (`finder.merge`), `--auto`'s
decision at start (`choose`: join the best, join the named mesh's smallest id, create one, or — a client — wait and
give up with a clear error) over the Finder's LAN seam on a fake clock, and the takeover turns of live members."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import anyio
import pytest

from mesh_mcp.discovery import choose as choose_mod
from mesh_mcp.discovery.choose import choose
from mesh_mcp.discovery.finder import Finder, merge
from mesh_mcp.discovery.publisher import TAKEOVER_STEP_S, Publisher
from mesh_mcp.discovery.score import Wants
from mesh_mcp.errors import ConfigError
from mesh_mcp.mesh.records import NodeRecord
from mesh_mcp.testing import FakeClock
from tests.test_listing import NOW
from tests.test_listing import make as make_listing

ME = Wants(protocol=1, llama_cpp="b1")


def make(n: int = 1, **kw: Any) -> Any:
    """A valid listing that names no address: nothing is probed (no datagram leaves the test)."""
    return make_listing(n, **({"addresses": ()} | kw))


def lan(*payloads: bytes) -> Finder:
    """A finder whose LAN answers `payloads` (the mDNS seam) and that asks no relay."""

    async def browse(within_s: float) -> list[bytes]:
        return list(payloads)

    return Finder(None, lan=True, browse=browse)


def test_merge_keeps_the_newest_listing_of_each_mesh_and_where_it_was_seen() -> None:
    old, new, other = make(1, published_at=NOW - 30), make(1, published_at=NOW, nodes=5), make(2)
    found = merge([old, other], [new])
    assert [(f.listing.mesh_id, f.listing.nodes, f.via) for f in found] == [
        (make(1).mesh_id, 5, ("lan", "nostr")),
        (make(2).mesh_id, 2, ("nostr",)),
    ]


def run(coro: Any) -> Any:
    return anyio.run(lambda: coro)


@pytest.mark.parametrize(
    ("payloads", "name", "joins", "says"),
    [
        ([make(1, name="x"), make(2)], None, 2, "joining the best of 2 mesh(es) listed"),  # unnamed first
        ([make(3, name="x"), make(1, name="x"), make(2)], "x", 1, "the smallest id of"),
        ([make(2)], "x", None, "no mesh called 'x' is listed on the relays or the LAN: creating mesh 'x'"),
        ([], None, None, "no public mesh is listed: creating a mesh"),
        ([make(1, protocol=99)], None, None, "1 mesh(es) listed, none suitable: creating a mesh"),
    ],
)
def test_auto_joins_the_best_or_the_named_mesh_or_creates_one(
    payloads: list[Any], name: str | None, joins: int | None, says: str
) -> None:
    clock = FakeClock(NOW)
    finder = lan(*(p.to_bytes() for p in payloads), b"not a listing")  # junk on the LAN is dropped
    choice = anyio.run(lambda: choose(finder, ME, None, clock, name=name))
    assert (None if choice.listing is None else choice.listing.mesh_id) == (
        None if joins is None else make(joins).mesh_id
    )
    assert says in choice.reasons[0], choice.reasons


def test_a_listing_whose_token_names_another_mesh_is_never_joined() -> None:
    liar = make(1, token=make(2).token)
    choice = anyio.run(lambda: choose(lan(liar.to_bytes()), ME, None, FakeClock(NOW)))
    assert choice.listing is None


def test_a_client_waits_for_a_mesh_then_gives_up_saying_what_to_do() -> None:
    client = Wants(protocol=1, llama_cpp="", client=True)
    near = make(4)

    async def main() -> list[Any]:
        clock = FakeClock(NOW)
        seen: list[float] = []
        payloads: list[bytes] = []

        async def browse(within_s: float) -> list[bytes]:
            seen.append(clock.monotonic())
            return list(payloads)

        got: list[Any] = []

        async def attempt(finder: Finder) -> None:
            try:
                got.append(await choose(finder, client, None, clock))
            except ConfigError as exc:
                got.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt, Finder(None, browse=browse))
            await clock.run_until(lambda: len(seen) >= 3, within=3 * choose_mod.RETRY_S + 1, step=0.5)
            payloads.append(near.to_bytes())  # a mesh appears: the client joins it
            await clock.run_until(lambda: bool(got), within=choose_mod.RETRY_S + 1, step=0.5)
            payloads.clear()
            tg.start_soon(attempt, Finder(None, browse=browse))
            await clock.run_until(lambda: len(got) == 2, within=choose_mod.CLIENT_WAIT_S + 2 * choose_mod.RETRY_S,
                                  step=0.5)  # fmt: skip
        return got

    got = anyio.run(main)
    assert got[0].listing.mesh_id == near.mesh_id
    assert isinstance(got[1], ConfigError)
    assert "--client --auto found no mesh to join in 300 s" in str(got[1]) and "--join TOKEN" in str(got[1])


async def _empty() -> list[bytes]:
    return []


def test_live_members_take_over_in_turns_by_hash() -> None:
    ids = [f"{i:016x}" for i in range(5)]
    records = [NodeRecord(n, b"", n, (), "host", 1) for n in ids]
    turns = {}
    for n in ids:
        p = Publisher(lambda now: make(1), FakeClock(NOW), node_id=n, port=1, nostr=None, lan=None,
                      publishing=False, members=lambda: records)  # fmt: skip
        turns[n] = p._turn()
    assert sorted(turns.values()) == [i * TAKEOVER_STEP_S for i in range(5)]  # one each, none at the same time


def test_a_mesh_left_with_avoid_mesh_is_never_joined() -> None:
    finder = lan(make(1).to_bytes(), make(2, name="x").to_bytes())
    choice = anyio.run(lambda: choose(finder, ME, None, FakeClock(NOW), avoid=frozenset({make(1).mesh_id[:8]})))
    assert choice.listing is not None and choice.listing.mesh_id == make(2).mesh_id  # named, but the only one left


def test_a_mesh_that_answers_the_probe_beats_a_better_ranked_one_that_does_not() -> None:
    """The sticky mesh ranks first, but its listed address answers nothing (another LAN): the reachable one wins."""

    class VersionNegotiation(asyncio.DatagramProtocol):  # what any QUIC server answers the probe
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            dcid = data[6 : 6 + data[5]]
            scid = data[7 + data[5] : 7 + data[5] + data[6 + data[5]]]
            vn = bytes([0x80]) + b"\0\0\0\0" + bytes([len(scid)]) + scid + bytes([len(dcid)]) + dcid + b"\0\0\0\1"
            self.transport.sendto(vn, addr)  # type: ignore[attr-defined]

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        server, _ = await loop.create_datagram_endpoint(VersionNegotiation, local_addr=("127.0.0.1", 0))
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        try:
            near = make(2, addresses=(f"127.0.0.1:{server.get_extra_info('sockname')[1]}",))
            sticky = make(1, addresses=(f"127.0.0.1:{silent.getsockname()[1]}",))
            return await choose(lan(near.to_bytes(), sticky.to_bytes()), ME, sticky.mesh_id, FakeClock(NOW))
        finally:
            server.close()
            silent.close()

    choice = anyio.run(main)
    assert choice.listing is not None and choice.listing.mesh_id == make(2).mesh_id
    sticky_line = next(r for r in choice.reasons if "the last mesh this node joined (sticky)" in r)
    assert sticky_line.startswith(make(1).mesh_id[:8]) or make(1).mesh_id[:8] in sticky_line  # it ranked first

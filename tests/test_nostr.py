"""The Nostr transport of public listings, against a real `nostr-relay` on loopback (tests/relay.py).

The relay stores whatever it is sent (no validators), so every check that a malformed, expired or forged event is
ignored is the client's own; each such test also reads the relay's store to show the event really was there.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import nostr_sdk as nostr
import pytest

from mesh_mcp.discovery.listing import KIND, TAG, Listing
from mesh_mcp.discovery.nostr import NostrDirectory, load_or_create_keys
from mesh_mcp.errors import ConfigError
from mesh_mcp.mesh import tokens
from mesh_mcp.testing import FakeClock
from tests.harness import free_port
from tests.relay import Relay, relay_fixture  # noqa: F401  (the `relay` fixture)

T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn)


def listing(n: int, **kw: Any) -> Listing:
    mesh_id = bytes([n]) * 16
    token = tokens.encode(tokens.InviteToken(mesh_id=mesh_id, secret=bytes(32), addresses=(f"10.0.0.{n}:7000",)))
    fields: dict[str, Any] = {
        "mesh_id": mesh_id.hex(),
        "token": token,
        "served": ("SmolLM2-135M",),
        "nodes": n,
        "protocol": 1,
        "llama_cpp": "b1234",
        "addresses": (f"10.0.0.{n}:7000",),
    }
    return Listing(**(fields | kw))


def directory(tmp_path: Path, relay: Relay, who: str = "a", **kw: Any) -> NostrDirectory:
    return NostrDirectory(tmp_path / who / "nostr.key", [relay.url], **kw)


def listings_on(relay: Relay) -> list[dict[str, Any]]:
    return [e for e in relay.stored() if e["kind"] == KIND]


def test_two_meshes_from_two_keys_are_both_found_with_their_fields(tmp_path: Path, relay: Relay) -> None:
    a, b = directory(tmp_path, relay, "a"), directory(tmp_path, relay, "b")
    one, two = listing(1, name="poker-night", region="eu", wanted=("Qwen3-8B",), max_clients=4), listing(2)

    async def go() -> list[Listing]:
        assert await a.publish(one) == [relay.url]
        assert await b.publish(two) == [relay.url]
        return await directory(tmp_path, relay, "reader").fetch()

    found = run(go)
    assert [x.mesh_id for x in found] == [one.mesh_id, two.mesh_id]
    got = found[0]
    assert (got.name, got.region, got.wanted, got.max_clients, got.token) == (
        "poker-night",
        "eu",
        ("Qwen3-8B",),
        4,
        one.token,
    )
    assert abs(got.published_at - time.time()) < 60  # set by publish to the event's time
    assert got.invite().addresses == ("10.0.0.1:7000",)
    stored = listings_on(relay)
    assert {e["pubkey"] for e in stored} == {a.public_key, b.public_key}
    for e in stored:
        tags = {t[0]: t[1] for t in e["tags"]}
        assert tags["k"] == tags["t"] == TAG
        assert int(tags["expiration"]) == e["created_at"] + 120
        assert tags["d"] == json.loads(e["content"])["mesh_id"]


def test_a_republish_replaces_the_listing(tmp_path: Path, relay: Relay) -> None:
    a = directory(tmp_path, relay)

    async def go() -> list[Listing]:
        await a.publish(listing(1, nodes=1))
        await a.publish(listing(1, nodes=5))  # in the same second: still strictly newer
        return await a.fetch()

    found = run(go)
    assert [x.nodes for x in found] == [5]
    assert [json.loads(e["content"])["nodes"] for e in listings_on(relay)] == [5]  # one event per (key, d)


def test_withdraw_removes_the_listing(tmp_path: Path, relay: Relay) -> None:
    a = directory(tmp_path, relay)

    async def go() -> tuple[list[Listing], list[Listing]]:
        await a.publish(listing(1))
        await a.publish(listing(2))
        before = await a.fetch()
        assert await a.withdraw(listing(1).mesh_id) == [relay.url]
        return before, await directory(tmp_path, relay, "reader").fetch()

    before, after = run(go)
    assert [x.mesh_id for x in before] == [listing(1).mesh_id, listing(2).mesh_id]
    assert [x.mesh_id for x in after] == [listing(2).mesh_id]
    assert [e["tags"][0][1] for e in listings_on(relay) if e["content"]] == [listing(2).mesh_id]


def test_withdraw_works_from_a_restarted_node(tmp_path: Path, relay: Relay) -> None:
    """A node that restarted no longer knows its event ids: the tombstone replaces the listing anyway."""
    run(lambda: directory(tmp_path, relay).publish(listing(1)))
    run(lambda: directory(tmp_path, relay).withdraw(listing(1).mesh_id))
    assert run(directory(tmp_path, relay, "reader").fetch) == []


def test_an_expired_listing_is_not_returned(tmp_path: Path, relay: Relay) -> None:
    past = FakeClock(start=time.time() - 1000)  # a publisher whose listing expired 880 s ago
    run(lambda: directory(tmp_path, relay, "old", clock=past).publish(listing(1)))
    run(lambda: directory(tmp_path, relay, "new").publish(listing(2)))
    assert len(listings_on(relay)) == 2  # the relay still serves it: dropping it is the client's job
    assert [x.mesh_id for x in run(directory(tmp_path, relay, "reader").fetch)] == [listing(2).mesh_id]


def _signed(keys: nostr.Keys, content: str, *, kind: int = KIND, tags: list[list[str]] | None = None) -> dict[str, Any]:
    expires = str(int(time.time()) + 120)
    tags = tags if tags is not None else [["d", "01" * 16], ["k", TAG], ["t", TAG], ["expiration", expires]]
    event = nostr.EventBuilder(nostr.Kind(kind), content).tags([nostr.Tag.parse(t) for t in tags]).finalize(keys)
    out: dict[str, Any] = json.loads(event.as_json())
    return out


def test_malformed_events_are_ignored(tmp_path: Path, relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    keys = nostr.Keys.generate()
    good = listing(1)
    body = good.to_dict() | {"published_at": int(time.time())}
    expires = str(int(time.time()) + 120)
    tags = [["d", good.mesh_id], ["k", TAG], ["t", TAG], ["expiration", expires]]
    forged = _signed(keys, json.dumps(body), tags=tags) | {"content": json.dumps(body | {"nodes": 999})}
    bad = {
        "garbage": _signed(keys, "not json {", tags=[*tags[:3], ["d", "02" * 16], tags[3]]),
        "oversized": _signed(keys, json.dumps(body | {"pad": "x" * 20000}), tags=[["d", "03" * 16], *tags[1:]]),
        "wrong kind": _signed(keys, json.dumps(body), kind=1, tags=tags[1:]),
        "wrong types": _signed(keys, json.dumps(body | {"nodes": "3"}), tags=[["d", "04" * 16], *tags[1:]]),
        "bad signature": forged,
        "d is not mesh id": _signed(keys, json.dumps(body), tags=[["d", "05" * 16], *tags[1:]]),
        "no expiration": _signed(keys, json.dumps(body), tags=[["d", good.mesh_id], *tags[1:3]]),
        "array content": _signed(keys, "[" * 5000, tags=[["d", "06" * 16], *tags[1:]]),
    }
    for event in bad.values():
        assert '"OK"' in relay.inject(event)
    assert len(relay.stored()) == len(bad)  # the relay kept every one of them
    caplog.set_level(logging.DEBUG, logger="mesh_llm.discovery")
    assert run(directory(tmp_path, relay).fetch) == []
    # ...and one good listing among them is still found
    run(lambda: directory(tmp_path, relay, "good").publish(good))
    assert [x.mesh_id for x in run(directory(tmp_path, relay).fetch)] == [good.mesh_id]
    assert "ignoring Nostr event" in caplog.text


def test_unreachable_relays_are_a_warning_not_an_error(
    tmp_path: Path, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"ws://127.0.0.1:{free_port()}"
    both = NostrDirectory(tmp_path / "k", [dead, relay.url])
    with caplog.at_level(logging.WARNING, logger="mesh_llm.discovery"):
        assert run(lambda: both.publish(listing(1))) == [relay.url]
        assert [x.mesh_id for x in run(both.fetch)] == [listing(1).mesh_id]
        assert run(lambda: both.withdraw(listing(1).mesh_id)) == [relay.url]
    assert caplog.text.count(f"{dead} cannot be reached") == 1  # warned once, not every minute
    none = NostrDirectory(tmp_path / "k", [dead])  # nothing answers: empty results, no exception, no hang
    assert run(lambda: none.publish(listing(1))) == []
    assert run(none.fetch) == []


def test_the_key_file_is_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "home" / "nostr.key"
    first = load_or_create_keys(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_keys(path).public_key().to_hex() == first.public_key().to_hex()
    os.chmod(path, 0o644)
    load_or_create_keys(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # tightened
    path.write_text("not a key\n")
    with pytest.raises(ConfigError, match="not a valid Nostr key"):
        load_or_create_keys(path)


def test_a_bad_relay_url_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--nostr-relay"):
        NostrDirectory(tmp_path / "k", ["http//nope"])
    with pytest.raises(ConfigError, match="at least one"):
        NostrDirectory(tmp_path / "k", [])

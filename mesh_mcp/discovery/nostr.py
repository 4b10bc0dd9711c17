"""Public mesh listings on Nostr relays: publish, withdraw and fetch `Listing`s (the Nostr transport).

A listing is an addressable (NIP-33 parameterized replaceable) event of kind `listing.KIND` (31990), signed by the
node's Nostr key, tagged ``d`` = mesh id (so a key has one listing per mesh: a republish replaces it), ``k`` and
``t`` = ``mesh-llm`` (what fetchers filter on) and a NIP-40 ``expiration`` (`ttl_s` after publishing: a node that
dies is delisted without help); its content is the listing's bytes. `withdraw` replaces the listing with an empty
one expiring at once and sends a NIP-09 deletion (kind 5) naming it by id and by address.

Every operation opens its own client, connects to the relays (at most `CONNECT_TIMEOUT_S`), does one bounded
exchange and shuts the client down: no background reconnect loop, nothing to leak between a publish every 60 s.
A relay that cannot be reached is a warning (once, until it answers again), never an error; the operations return
what the reachable relays said.

Fetched events are untrusted: at most `MAX_EVENTS` are read, each must carry a valid signature (the SDK checks,
and so do we), the right kind and tags, an expiration in the future, content within `MAX_LISTING_BYTES` that parses
as a `Listing` whose mesh id is the event's ``d`` tag; anything else is dropped with a debug log. Only the newest
event per (author, ``d``) counts.

Library: `nostr-sdk` (the rust-nostr project's official Python bindings, released in step with the Rust crates):
it signs events, verifies signatures on receipt, knows NIP-40 expiration and addressable events, and bounds relay
messages. The pure-Python alternatives (pynostr, aionostr, monstr) see few releases and would leave signing and
verification to us. The secret key is kept at `keys_path` (hex, mode 0600), created on first use and reused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import anyio
import nostr_sdk as nostr

from mesh_mcp.clock import SYSTEM_CLOCK, Clock
from mesh_mcp.discovery.listing import KIND, MAX_LISTING_BYTES, TAG, Listing
from mesh_mcp.errors import ConfigError, ProtocolError

__all__ = ["DEFAULT_RELAYS", "MAX_EVENTS", "NostrDirectory", "load_or_create_keys"]

log = logging.getLogger("mesh_llm.discovery")

DEFAULT_RELAYS = (
    "wss://relay.damus.io",
    "wss://nos.lol",
    "wss://relay.nostr.band",
    "wss://relay.primal.net",
    "wss://nostr.mom",
)
CONNECT_TIMEOUT_S = 5.0  # per operation, all relays in parallel
SEND_TIMEOUT_S = 10.0  # for the relays' OK to a published event
LOOKUP_TIMEOUT_S = 3.0  # withdraw's look-up of this key's own events
MAX_OWN_EVENTS = 20  # versions of one listing a relay may still hold (NIP-33: one; some keep a few)
MAX_EVENTS = 500  # listings read per fetch: more than any directory of live meshes, cheap to check
MAX_EVENT_BYTES = MAX_LISTING_BYTES + 4096  # a listing plus its tags, id, key and signature
MAX_MESSAGE_BYTES = 2 * MAX_EVENT_BYTES  # any relay message; longer ones are dropped by the SDK
KEY_FILE_MODE = 0o600


def load_or_create_keys(path: Path) -> nostr.Keys:
    """The Nostr key at `path` (a hex secret key), created with mode 0600 on first use; `ConfigError` if unreadable."""
    if path.exists():
        try:
            keys = nostr.Keys(nostr.SecretKey.parse(path.read_text().strip()))
        except (OSError, UnicodeDecodeError, nostr.NostrSdkError) as exc:
            raise ConfigError(f"{path} is not a valid Nostr key; move it away to make a new one") from exc
        if path.stat().st_mode & 0o077:
            os.chmod(path, KEY_FILE_MODE)
        return keys
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = nostr.Keys.generate()
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_FILE_MODE)
    with os.fdopen(fd, "w") as fh:
        fh.write(keys.secret_key().to_hex() + "\n")
    os.replace(tmp, path)
    return keys


def _relay_url(url: str) -> nostr.RelayUrl:
    try:
        return nostr.RelayUrl.parse(url)
    except nostr.NostrSdkError as exc:
        raise ConfigError(f"Nostr relay {url!r} is not a ws:// or wss:// URL (check --nostr-relay)") from exc


def _tag(event: nostr.Event, name: str) -> str | None:
    """The first value of tag `name`, or None."""
    for tag in event.tags():
        values = tag.to_vec()
        if len(values) >= 2 and values[0] == name:
            return values[1]
    return None


class NostrDirectory:
    """Listings on a set of Nostr relays, signed by the key at `keys_path`."""

    def __init__(self, keys_path: Path, relays: Sequence[str] = DEFAULT_RELAYS, clock: Clock = SYSTEM_CLOCK) -> None:
        if not relays:
            raise ConfigError("no Nostr relay to publish or search on: give at least one --nostr-relay")
        self._urls = [_relay_url(url) for url in dict.fromkeys(relays)]
        self._keys = load_or_create_keys(keys_path)
        self._clock = clock
        self._last_created: dict[str, int] = {}  # mesh id → created_at of our last event for it
        self._published: dict[str, set[str]] = {}  # mesh id → ids of our events for it (for withdraw)
        self._down: set[str] = set()  # relays warned about, until they answer again

    @property
    def relays(self) -> list[str]:
        return [str(url) for url in self._urls]

    @property
    def public_key(self) -> str:
        """This node's Nostr public key (hex): the author of its listings."""
        return self._keys.public_key().to_hex()

    async def publish(self, listing: Listing, ttl_s: int = 120) -> list[str]:
        """Publish (or refresh) `listing`, expiring `ttl_s` from now; returns the relays that stored it.

        Its `published_at` is set to the event's time. `ProtocolError` when the listing is too big to publish."""
        created = self._next_created(listing.mesh_id)
        content = replace(listing, published_at=created).to_bytes().decode()
        event = self._event(KIND, content, listing.mesh_id, created, expires=created + ttl_s)
        self._published.setdefault(listing.mesh_id, set()).add(event.id().to_hex())
        stored = await self._send([event], f"listing of mesh {listing.mesh_id[:8]}")
        if stored:
            log.debug("mesh %s listed on %d of %d Nostr relays", listing.mesh_id[:8], len(stored), len(self._urls))
        return stored

    async def withdraw(self, mesh_id: str) -> list[str]:
        """Delist mesh `mesh_id` (as published by this key); returns the relays that took the deletion.

        This key's events for the mesh are looked up on the relays first (a restarted node no longer knows their
        ids), so the deletion names them all and the tombstone is dated after the newest: it replaces the listing
        even on relays that ignore deletions."""
        ids = self._published.pop(mesh_id, set())
        mine = nostr.Filter().kind(nostr.Kind(KIND)).author(self._keys.public_key()).identifier(mesh_id)
        async with self._client() as client:
            if client is None:
                log.warning("no Nostr relay could be reached to withdraw mesh %s: it expires on its own", mesh_id[:8])
                return []
            with anyio.move_on_after(LOOKUP_TIMEOUT_S + 5):
                found = await client.fetch_events(
                    nostr.ReqTarget.auto([mine.limit(MAX_OWN_EVENTS)]), timedelta(seconds=LOOKUP_TIMEOUT_S)
                )
                for event in found[:MAX_OWN_EVENTS]:
                    ids.add(event.id().to_hex())
                    seen = event.created_at().as_secs()
                    self._last_created[mesh_id] = max(self._last_created.get(mesh_id, 0), seen)
            created = self._next_created(mesh_id)
            tombstone = self._event(KIND, "", mesh_id, created, expires=created + 1)  # replaces it where NIP-09 is not
            tags = [nostr.Tag.parse(["e", i]) for i in sorted(ids | {tombstone.id().to_hex()})]
            tags += [nostr.Tag.parse(["a", f"{KIND}:{self.public_key}:{mesh_id}"]), nostr.Tag.parse(["k", str(KIND)])]
            deletion = (
                nostr.EventBuilder(nostr.Kind(5), "mesh withdrawn")
                .tags(tags)
                .custom_created_at(nostr.Timestamp.from_secs(created))
                .finalize(self._keys)
            )
            return await self._send_on(client, [tombstone, deletion], f"withdrawal of mesh {mesh_id[:8]}")

    async def fetch(self, within_s: float = 5.0) -> list[Listing]:
        """The live listings on the relays, newest per (author, mesh id); waits at most about `within_s`."""
        now = int(self._clock.time())
        query = nostr.Filter().kind(nostr.Kind(KIND)).hashtag(TAG).limit(MAX_EVENTS)
        events: list[nostr.Event] = []
        async with self._client() as client:
            if client is not None:
                with anyio.move_on_after(within_s + 5):
                    events = await client.fetch_events(
                        nostr.ReqTarget.auto([query]), timedelta(seconds=within_s), max_events=MAX_EVENTS
                    )
        newest: dict[tuple[str, str], tuple[int, str, Listing]] = {}
        for event in events[:MAX_EVENTS]:
            found = self._read(event, now)
            if found is None:
                continue
            key = (event.author().to_hex(), found.mesh_id)
            rank = (event.created_at().as_secs(), event.id().to_hex())
            old = newest.get(key)
            if old is None or rank[0] > old[0] or (rank[0] == old[0] and rank[1] < old[1]):  # NIP-01: lower id wins
                newest[key] = (*rank, found)
        return [listing for _, _, listing in sorted(newest.values(), key=lambda v: (v[2].mesh_id, v[0], v[1]))]

    def _read(self, event: nostr.Event, now: int) -> Listing | None:
        """The listing in `event`, or None (with a debug log) when the event is not a valid live listing."""
        event_id = event.id().to_hex()[:12]
        problem = None
        expires = _tag(event, "expiration")
        if event.kind().as_u16() != KIND:
            problem = f"kind {event.kind().as_u16()} is not {KIND}"
        elif not event.verify():
            problem = "its signature is invalid"
        elif _tag(event, "t") != TAG and _tag(event, "k") != TAG:
            problem = f"it is not tagged {TAG!r}"
        elif expires is None or not expires.isdigit() or int(expires) <= now:
            problem = "it has expired" if expires and expires.isdigit() else "it has no valid expiration"
        elif len(event.content().encode()) > MAX_LISTING_BYTES:
            problem = f"its content is over {MAX_LISTING_BYTES} bytes"
        else:
            try:
                listing = Listing.from_bytes(event.content().encode())
            except ProtocolError as exc:
                problem = str(exc)
            else:
                if _tag(event, "d") == listing.mesh_id:
                    return listing
                problem = "its d tag is not its mesh id"
        log.debug("ignoring Nostr event %s from %s: %s", event_id, event.author().to_hex()[:12], problem)
        return None

    def _next_created(self, mesh_id: str) -> int:
        """Now, but strictly after our previous event for this mesh (a replacement must be newer to win)."""
        created = max(int(self._clock.time()), self._last_created.get(mesh_id, 0) + 1)
        self._last_created[mesh_id] = created
        return created

    def _event(self, kind: int, content: str, mesh_id: str, created: int, *, expires: int) -> nostr.Event:
        tags = [
            nostr.Tag.identifier(mesh_id),
            nostr.Tag.parse(["k", TAG]),
            nostr.Tag.hashtag(TAG),
            nostr.Tag.expiration(nostr.Timestamp.from_secs(expires)),
        ]
        return (
            nostr.EventBuilder(nostr.Kind(kind), content)
            .tags(tags)
            .custom_created_at(nostr.Timestamp.from_secs(created))
            .finalize(self._keys)
        )

    async def _send(self, events: list[nostr.Event], what: str) -> list[str]:
        async with self._client() as client:
            if client is None:
                log.warning("no Nostr relay could be reached for the %s: check --nostr-relay and the network", what)
                return []
            return await self._send_on(client, events, what)

    async def _send_on(self, client: nostr.Client, events: list[nostr.Event], what: str) -> list[str]:
        """Send `events` in order; the relays that accepted the last one."""
        stored: list[str] = []
        for event in events:
            with anyio.move_on_after(SEND_TIMEOUT_S + 5):
                out = await client.send_event(event, ok_timeout=timedelta(seconds=SEND_TIMEOUT_S))
                stored = sorted(str(url) for url in out.success)
                for url, why in out.failed.items():
                    log.debug("Nostr relay %s did not take the %s: %s", url, what, why)
        if not stored:
            log.warning("no Nostr relay took the %s: check the relays (--nostr-relay) and the network", what)
        return stored

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[nostr.Client | None]:
        """A client connected to the relays that answered within `CONNECT_TIMEOUT_S`; None when none did."""
        limits = nostr.RelayLimits().message_max_size(MAX_MESSAGE_BYTES).event_max_size(MAX_EVENT_BYTES)
        options = nostr.RelayOptions().limits(limits).reconnect(False)
        client = nostr.ClientBuilder().build()
        try:
            for url in self._urls:
                await client.add_relay(url, opts=options)
            up: list[str] = []
            with anyio.move_on_after(CONNECT_TIMEOUT_S + 5):
                out = await client.try_connect(timedelta(seconds=CONNECT_TIMEOUT_S))
                up = [str(url) for url in out.success]
                for url, why in out.failed.items():
                    log.debug("Nostr relay %s: %s", url, why)
                    await client.remove_relay(url, force=True)  # else every send and query waits for it
            self._note_reachable(up)
            yield client if up else None
        finally:
            with anyio.move_on_after(5, shield=True):
                await client.shutdown()

    def _note_reachable(self, up: list[str]) -> None:
        for url in map(str, self._urls):
            if url in up and url in self._down:
                self._down.discard(url)
                log.info("Nostr relay %s is reachable again", url)
            elif url not in up and url not in self._down:
                self._down.add(url)
                log.warning("Nostr relay %s cannot be reached: mesh listings skip it until it answers", url)

"""The blackboard one node carries: the only way posts enter or leave its store.

Two ways in, one order of checks each:
- `post` (CLI, HTTP, MCP on this node): control, bidi and invisible format characters are stripped
  from text and author (inference/controls.py; the author becomes one line), both are scrubbed of
  personal data, one post is spent from three rate limits at once — the author's, the sending
  client's (`source`, its address) and this node's — then the post is signed with this node's key
  and stored;
- `receive` (from a peer): each post must parse (which refuses control, bidi and format
  characters: a signed post cannot be cleaned), verify (signature, id, origin key, not expired),
  come from an origin that is within its quota and its rate limit, and be *already clean* — it is
  scrubbed again and a post that still changes is refused, since its signature forbids storing an
  edited copy (an honest origin scrubbed it before signing; one that did not is logged). A post
  refused for rate is not lost: the anti-entropy sync offers it again later.
Either way an accepted post goes to `on_accept(post, sender)`, which the mesh link uses to pass it
on (blackboard/sync.py decides to whom). Queries (search, feed) and the anti-entropy reads
(digest, ids, get) go straight to the store.

The store and the scrubber block (SQLite, presidio), so they run in worker threads; one lock keeps
the store to one thread at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import anyio
from anyio.abc import TaskStatus
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from inference.controls import strip_controls
from mesh_mcp.errors import BlackboardError, ProtocolError, RateLimited

from .limits import AUTHOR_LIMIT, NODE_LIMIT, ORIGIN_LIMIT, SOURCE_LIMIT, Limit, RateLimiter, take_all
from .post import TTL_S, Post, check_post_id, from_wire, make_post, one_line, verify
from .store import Store

log = logging.getLogger("mesh_llm.blackboard")

EXPIRE_EVERY_S = 60.0
MAX_RESULTS = 100
ORIGIN_QUOTA = 20_000  # live posts one origin node may have in our store (48 h)
LOCAL_SOURCE = "local"  # the rate-limit key of posts that name no client (this process's own)
# Refusals of a peer's posts are logged at most this often per peer/origin: a hostile member must not flood the log.
WARN_LIMIT = Limit(burst=20, per_hour=600)


class Scrubs(Protocol):
    def scrub(self, text: str) -> Any: ...  # -> blackboard.scrub.Scrubbed


class Board:
    def __init__(
        self,
        store: Store,
        key: Ed25519PrivateKey,
        node_id: str,
        default_author: str,
        scrubber: Callable[[], Scrubs],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.default_author = default_author
        self.on_accept: Callable[[Post, str | None], None] | None = None
        self._key = key
        self._scrubber_factory = scrubber
        self._scrubber: Scrubs | None = None
        self._clock = clock
        self._lock = anyio.Lock()
        self._authors = RateLimiter(AUTHOR_LIMIT)
        self._sources = RateLimiter(SOURCE_LIMIT)
        self._node = RateLimiter(NODE_LIMIT)
        self._origins = RateLimiter(ORIGIN_LIMIT)
        self._warnings = RateLimiter(WARN_LIMIT)
        self._origin_counts: dict[str, int] = {}
        self._refused_origins: set[str] = set()
        self.unavailable: str | None = None  # why the scrubber could not load: nothing is posted or taken in

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Load the scrubber (presidio takes a second or two), then expire old posts every minute. A scrubber that
        cannot load (a model file missing or changed, a broken install) leaves the board `unavailable`: it refuses
        to post and takes no posts in, saying why; the node goes on."""
        try:
            await anyio.to_thread.run_sync(self._load_scrubber)
        except (BlackboardError, ImportError, OSError) as exc:
            self.unavailable = f"the scrubber could not load: {exc}"
            log.error("blackboard unavailable: %s", self.unavailable)
            task_status.started()
            await anyio.sleep_forever()
        await self._recount()
        task_status.started()
        while True:
            await anyio.sleep(EXPIRE_EVERY_S)
            try:
                removed = await self._store(self.store.expire, self._clock())
            except BlackboardError as exc:  # a full disk, say: expired posts stay hidden; the next round retries
                log.warning("blackboard: expiring old posts failed: %s", exc)
                continue
            if removed:
                log.info("blackboard: %d post(s) expired", removed)
                await self._recount()

    def _load_scrubber(self) -> Scrubs:
        scrubber = self._scrubber
        if scrubber is None:
            scrubber = self._scrubber = self._scrubber_factory()
        return scrubber

    async def _scrub(self, text: str) -> Any:
        if self.unavailable is not None:
            raise BlackboardError(f"this node's blackboard is unavailable: {self.unavailable}")
        scrubber = self._scrubber
        if scrubber is None:
            scrubber = await anyio.to_thread.run_sync(self._load_scrubber)
        return await anyio.to_thread.run_sync(scrubber.scrub, text)

    async def _store(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async with self._lock:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    async def _recount(self) -> None:
        self._origin_counts = await self._store(self.store.count_by_origin, self._clock())

    # --- ways in ------------------------------------------------------------------------------------

    async def post(
        self, text: str, author: str | None = None, reply_to: str | None = None, *, source: str | None = None
    ) -> Post:
        """Clean, scrub, rate-limit, sign and store a post written on this node; `BlackboardError` says why
        not. `source` names the client that sent it (its address) for the per-client limit."""
        if not isinstance(text, str):
            raise BlackboardError("a post's text must be a string")
        if reply_to is not None:
            check_post_id(reply_to, "reply-to id")
        source = source or LOCAL_SOURCE
        self._spend(None, source, self._clock(), check_only=True)  # before the scrubber's work
        text = strip_controls(text)
        name = one_line(author or "") or one_line(self.default_author)
        clean = (await self._scrub(text)).text
        name = (await self._scrub(name)).text
        now = self._clock()
        post = make_post(clean, name, self._key, now, reply_to)  # checks the limits on text and name
        self._spend(post.author, source, now)
        await self._store(self.store.add, post, now)  # raises BlackboardError when the store is full
        self._count(post.origin)
        log.info("blackboard: %s posted %s %s", post.author, post.kind or "a note", post.id)
        if self.on_accept is not None:
            self.on_accept(post, None)
        return post

    async def receive(self, wires: Iterable[object], sender: str) -> list[Post]:
        """Posts from a peer: the new, genuine and clean ones are stored and returned; others are logged."""
        accepted: list[Post] = []
        for wire in wires:
            try:
                post = from_wire(wire)
            except ProtocolError as exc:
                self._warn(sender, "blackboard: refused a post from %s: %s", sender, exc)
                continue
            if post.origin == self.node_id or await self._store(self.store.has, post.id):
                continue
            now = self._clock()
            try:
                verify(post, now)
            except ProtocolError as exc:
                if post.expires > now:  # an expired post is routine near the 48 h edge, not news
                    self._warn(sender, "blackboard: refused a post from %s: %s", sender, exc)
                continue
            if self._origin_counts.get(post.origin, 0) >= ORIGIN_QUOTA:
                if post.origin not in self._refused_origins:
                    self._refused_origins.add(post.origin)
                    log.warning("blackboard: node %s has %d live posts; refusing more", post.origin, ORIGIN_QUOTA)
                continue
            wait = self._origins.take(post.origin, now)
            if wait:
                self._warn(
                    post.origin,
                    "blackboard: node %s posts faster than %d at once and %.0f an hour; refusing its posts for %.0f s "
                    "(the sync brings them later)",
                    post.origin,
                    ORIGIN_LIMIT.burst,
                    ORIGIN_LIMIT.per_hour,
                    wait,
                )
                continue
            try:
                dirty = [f for part in (post.text, post.author) for f in (await self._scrub(part)).findings]
            except BlackboardError as exc:  # no scrubber: nothing is taken in (the sync brings it once one loads)
                self._warn(sender, "blackboard: not taking posts from %s: %s", sender, exc)
                return accepted
            if dirty:
                kinds = ", ".join(sorted({f.entity for f in dirty}))
                self._warn(
                    sender,
                    "blackboard: refused post %s from %s (origin %s): it carries personal data (%s)",
                    post.id,
                    sender,
                    post.origin,
                    kinds,
                )
                continue
            try:
                if not await self._store(self.store.add, post, now):
                    continue
            except BlackboardError as exc:
                log.warning("blackboard: cannot keep post %s: %s", post.id, exc)
                continue
            self._count(post.origin)
            accepted.append(post)
            if self.on_accept is not None:
                self.on_accept(post, sender)
        return accepted

    def _count(self, origin: str) -> None:
        self._origin_counts[origin] = self._origin_counts.get(origin, 0) + 1

    def _spend(self, author: str | None, source: str, now: float, *, check_only: bool = False) -> None:
        """Spend one local post from the author's, the client's and the node's buckets (with `check_only`:
        the client's and the node's, spending nothing), or raise `RateLimited` saying which is empty."""
        buckets = [(self._sources, source), (self._node, "")]
        if author is not None:
            buckets.append((self._authors, author.casefold()))
        if check_only:
            waits = [limiter.check(key, now) for limiter, key in buckets]
            wait, which = max(waits), waits.index(max(waits))
        else:
            wait, which = take_all(buckets, now)
        if not wait:
            return
        limiter = buckets[which][0]
        allowance = f"at most {limiter.limit.burst} posts at once and {limiter.limit.per_hour:.0f} an hour"
        retry = f"retry in {math.ceil(wait)} s"
        if limiter is self._authors:
            message = f"{author} is posting too fast: {allowance}; {retry}"
        elif limiter is self._sources:
            message = f"too many posts from this client ({source}): {allowance}, whatever the author names; {retry}"
        else:
            message = f"this node takes {allowance} from all its clients together; {retry}"
        raise RateLimited(message, retry_after=wait)

    def _warn(self, key: str, message: str, *args: object) -> None:
        """Log a refusal of a peer's post, at most `WARN_LIMIT` per `key` (a peer or an origin)."""
        if not self._warnings.take(key, self._clock()):
            log.warning(message, *args)

    # --- ways out -----------------------------------------------------------------------------------

    async def search(
        self,
        query: str,
        *,
        author: str | None = None,
        kind: str | None = None,
        since_hours: float | None = None,
        limit: int = 20,
    ) -> list[Post]:
        now = self._clock()
        since, limit = _window(since_hours, limit, now)
        if not query.strip():
            return await self.feed(author=author, kind=kind, since_hours=since_hours, limit=limit)
        return await self._store(
            self.store.search, query, author=author, kind=_kind(kind), since=since, limit=limit, now=now
        )

    async def feed(
        self, *, author: str | None = None, kind: str | None = None, since_hours: float | None = None, limit: int = 20
    ) -> list[Post]:
        now = self._clock()
        since, limit = _window(since_hours, limit, now)
        return await self._store(self.store.feed, author=author, kind=_kind(kind), since=since, limit=limit, now=now)

    async def count(self) -> int:
        return await self._store(self.store.count)

    async def digest(self) -> dict[int, str]:
        return await self._store(self.store.digest, self._clock())

    async def ids_in(self, buckets: Iterable[int]) -> dict[int, list[str]]:
        return await self._store(self.store.ids_in, list(buckets), self._clock())

    async def get(self, ids: Iterable[str]) -> list[Post]:
        return await self._store(self.store.get, list(ids))


def _window(since_hours: float | None, limit: int, now: float) -> tuple[float | None, int]:
    if since_hours is not None and not 0 < since_hours <= TTL_S / 3600:
        raise BlackboardError(f"since is in hours, more than 0 and at most {TTL_S // 3600}")
    if not 1 <= limit <= MAX_RESULTS:
        raise BlackboardError(f"limit is between 1 and {MAX_RESULTS}")
    return (now - since_hours * 3600 if since_hours is not None else None), limit


def _kind(kind: str | None) -> str | None:
    return kind.strip().upper() or None if kind is not None else None

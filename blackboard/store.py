"""The node's blackboard storage: every live post, searchable, on SQLite with FTS5.

Responsibility. Keep the posts this node knows (its own and those gossiped to it) until they
expire (`post.TTL_S` after `created`), answer agents' searches and feeds, and give anti-entropy
what it needs to compare stores with a peer (`digest`, `ids_in`, `get`). Posts are stored with
every field, public key and signature included, so they can be re-sent verbatim and survive a
restart. Checking signatures is not done here: `post.verify` runs before `add`.

Design.

- One SQLite file in the node's home (or ":memory:" for tests), WAL journal, `synchronous=NORMAL`
  (a power cut may lose the last commits, never corrupt the file; the blackboard is replicated and
  anti-entropy refills what was lost), `PRAGMA user_version` for the schema.
- Rows are keyed by time: a post's rowid is its `created` in milliseconds shifted left 10 bits,
  plus 10 bits of its id (bumped on the rare clash). So rowid order is time order: "live" and
  "since" are rowid ranges, which FTS5 and every index apply natively, and "newest first" is
  `ORDER BY rowid DESC` (posts of the same millisecond in id-hash order). Range bounds are whole
  milliseconds (`created` rounded, which is monotonic); the exact `created` tests are applied to
  the rows returned.
- `posts_fts` is an external-content FTS5 index over `posts.text` and `posts.tags`
  (tokenize='porter unicode61': case- and diacritic-insensitive, English stemming, so "billing
  refactor" finds "refactoring billing"). `tags` holds two hash tokens, of the author (case-folded)
  and of the kind, so the author and kind filters are FTS5 terms intersected inside the index
  instead of a join per match. The store writes the index in the same transaction as the row
  (an FTS5 insert from a trigger flushes FTS5's pending data on every row: 2-3x slower); a trigger
  removes deleted rows from it. Other indexes: `id` (unique: the dedup), `author_key`, `kind`
  (the feed's filters; SQLite appends the rowid, so both come in time order),
  `(bucket, id, created)` for anti-entropy and `(origin, created)` for `count_by_origin`.
- Search. The query is free text, never FTS syntax: it is split on white space and each piece is
  one quoted FTS5 phrase (`"` doubled, NULs dropped), restricted to the text column, so no input
  can raise an FTS5 error; a piece like `invoice.py` is the phrase "invoice py". Common English
  words are dropped when the query has others. Posts matching every phrase come first (an AND
  query), then, if fewer than `limit` did, posts matching some (an OR query, where bm25 favours
  more and rarer phrases); each group ordered by bm25, ties newest first. bm25 costs about 2 µs per
  match, so it ranks at most the newest `CANDIDATES` matches of each group: a word in most posts
  ranks among the recent ones only. A query of common words only is not ranked at all (bm25
  gives such words no weight, yet computing it scans their whole posting lists): newest first.
  Filters (author: exact, case-insensitive; kind: exact, upper case; since: created ≥ since)
  combine, apply to search and feed alike, and expired posts are never returned, whether or not
  `expire` has run. An empty query is the feed; one with no letter or digit matches nothing.
- Anti-entropy. Posts fall into hour buckets, `int(created // 3600)`. `digest` maps each bucket
  holding live posts to 16 hex digits of sha256 over its live ids, sorted and concatenated; equal
  digests mean equal live posts. Hashes of buckets that cannot be partly expired are cached and
  dropped when a post lands in them.
- Capacity. At most `cap` posts: an `add` that finds the store full first expires old posts, then
  refuses with `BlackboardError` if it is still full.
- A file that SQLite finds corrupt, or that is not a database, or that a newer schema wrote, does
  not stop the node: it is renamed `<name>.corrupt-<unix time>` (with its -wal and -shm), a warning
  is logged and the store starts empty (peers send the live posts again). This is checked at open
  (`PRAGMA quick_check`) and on any later corruption error, after which the operation is retried
  once on the fresh file. A file that cannot be opened for another reason (permissions, a directory
  in its place, locked by another process, disk full) is a `BlackboardError` naming the file and
  what to do.
- A full disk on a write (SQLITE_FULL) is a `BlackboardDiskFull`: the transaction is rolled back (a
  failed COMMIT included, so the connection takes the next write), what was stored stays, searches
  go on, and writes work again once there is room.

Threading. One SQLite connection, opened with `check_same_thread=False` so the node can call the
store from worker threads (`anyio.to_thread.run_sync`) and keep disk work off the event loop.
Every public method holds a lock, so calls from several threads are serialised: one runs at a
time, and a long `expire` delays a search. Statements are prepared once and reused from the
connection's statement cache.

Modules. The query language and the keys (free text to FTS5 phrases, filters to FTS5 terms and SQL
bounds, time-ordered rowids, tag tokens) are `blackboard.store_query`, pure. This module is one
responsibility, the SQLite file that holds the posts (schema, writes, reads, anti-entropy digests,
expiry, and surviving corruption and a full disk), so it runs past ~400 lines.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mesh_mcp.errors import BlackboardDiskFull, BlackboardError

from .post import TTL_S, Post
from .store_query import MS_BITS, Filters, check_time, query_phrases, tag_tokens, time_rowid

__all__ = [
    "BUCKET_S",
    "CANDIDATES",
    "MAX_LIMIT",
    "Store",
    "bucket_hash",
    "bucket_of",
]

log = logging.getLogger("mesh_llm.blackboard")

SCHEMA_VERSION = 1
BUCKET_S = 3600  # anti-entropy buckets are hours of `created`
MAX_LIMIT = 500  # the most posts one search or feed returns
CANDIDATES = 1000  # the most matches per query group that bm25 ranks (the newest ones)
MAX_CREATED = 1e11  # as `post.from_wire` bounds it
_PAD = 8  # extra rows fetched to make up for ones the exact time test drops
_CHUNK = 500  # ids per `IN (...)` (SQLite's oldest variable limit is 999)
_CORRUPT = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}

_T = TypeVar("_T")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS posts (
    rowid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    author TEXT NOT NULL,
    author_key TEXT NOT NULL,
    origin TEXT NOT NULL,
    created REAL NOT NULL,
    bucket INTEGER NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    tags TEXT NOT NULL,
    reply_to TEXT,
    public_key BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS posts_author ON posts(author_key);
CREATE INDEX IF NOT EXISTS posts_kind ON posts(kind);
CREATE INDEX IF NOT EXISTS posts_bucket ON posts(bucket, id, created);
CREATE INDEX IF NOT EXISTS posts_origin ON posts(origin, created);
CREATE VIRTUAL TABLE IF NOT EXISTS posts_fts USING fts5(
    text, tags, content='posts', content_rowid='rowid', tokenize='porter unicode61'
);
CREATE TRIGGER IF NOT EXISTS posts_ad AFTER DELETE ON posts BEGIN
    INSERT INTO posts_fts(posts_fts, rowid, text, tags) VALUES ('delete', old.rowid, old.text, old.tags);
END;
PRAGMA user_version = {SCHEMA_VERSION};
"""

_COLUMNS = "p.id, p.author, p.origin, p.created, p.text, p.kind, p.reply_to, p.public_key, p.signature"
_INSERT = (
    "INSERT INTO posts (rowid, id, author, author_key, origin, created, bucket, kind, text, tags, reply_to, "
    "public_key, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
)
_INDEX = "INSERT INTO posts_fts (rowid, text, tags) VALUES (?, ?, ?)"
# The newest CANDIDATES matches, ranked by bm25 (the tags column weighs nothing), the best few joined to their rows.
_SEARCH = (
    f"SELECT {_COLUMNS}, p.author_key FROM ("
    " SELECT r, score FROM ("
    "  SELECT rowid AS r, bm25(posts_fts, 1.0, 0.0) AS score FROM posts_fts"
    f"  WHERE posts_fts MATCH ? AND rowid >= ? ORDER BY rowid DESC LIMIT {CANDIDATES}"
    " ) ORDER BY score, r DESC LIMIT ?"
    ") c JOIN posts p ON p.rowid = c.r ORDER BY c.score, c.r DESC"
)
# The newest matches, unranked.
_SEARCH_NEWEST = (
    f"SELECT {_COLUMNS}, p.author_key FROM ("
    " SELECT rowid AS r FROM posts_fts WHERE posts_fts MATCH ? AND rowid >= ? ORDER BY rowid DESC LIMIT ?"
    ") c JOIN posts p ON p.rowid = c.r ORDER BY c.r DESC"
)


class _Unusable(Exception):
    """The file is not a usable blackboard database (corrupt, not SQLite, newer schema)."""


def bucket_of(created: float) -> int:
    """The anti-entropy bucket of a post created at `created`."""
    return int(created // BUCKET_S)


def bucket_hash(ids: Iterable[str]) -> str:
    """16 hex digits of sha256 over the ids, sorted and concatenated (ids are fixed-length hex)."""
    return hashlib.sha256("".join(sorted(ids)).encode()).hexdigest()[:16]


def _is_full(exc: sqlite3.Error) -> bool:
    """SQLITE_FULL: the disk (or a quota SQLite reports as full) has no room for the write."""
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_FULL


def _is_corrupt(exc: sqlite3.Error) -> bool:
    """Whether SQLite says the file is damaged or not a database (extended codes included)."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _CORRUPT


def _post(row: tuple[Any, ...]) -> Post:
    return Post(
        id=row[0],
        author=row[1],
        origin=row[2],
        created=row[3],
        text=row[4],
        kind=row[5],
        reply_to=row[6],
        public_key=bytes(row[7]),
        signature=bytes(row[8]),
    )


def _chunks(items: list[str], size: int = _CHUNK) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Store:
    """This node's posts in one SQLite file (see the module docstring). Safe to call from any thread;
    a lock runs one call at a time."""

    def __init__(self, path: Path | str, *, cap: int = 200_000) -> None:
        if cap < 1:
            raise BlackboardError(f"the blackboard's cap must be at least 1 post, not {cap}")
        self.path: Path | str = path if path == ":memory:" else Path(path)
        self.cap = cap
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._count = 0
        self._buckets: dict[int, str | None] = {}  # every bucket holding stored posts -> its cached hash
        self._open()

    # -- opening, corruption ------------------------------------------------------------------

    def _open(self) -> None:
        try:
            self._conn = self._connect()
        except _Unusable as exc:
            self._quarantine(str(exc))
            try:
                self._conn = self._connect()
            except _Unusable as again:  # even a fresh file is unusable: the disk or SQLite is at fault
                raise BlackboardError(
                    f"the blackboard database {self.path} cannot be created: {again}; check the disk and "
                    "the node's home directory"
                ) from again

    def _recount(self, conn: sqlite3.Connection) -> None:
        self._count = conn.execute("SELECT count(*) FROM posts").fetchone()[0]
        self._buckets = {b: None for (b,) in conn.execute("SELECT DISTINCT bucket FROM posts")}

    def _connect(self) -> sqlite3.Connection:
        """A connection to a usable, up-to-date database; `_Unusable` if the file is not one."""
        if isinstance(self.path, Path):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BlackboardError(
                    f"cannot create the directory for the blackboard database {self.path}: {exc}"
                ) from exc
        try:
            conn = sqlite3.connect(str(self.path), timeout=5.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._open_error(exc) from exc
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise _Unusable(f"a newer mesh-llm wrote it (schema {version}; this one reads {SCHEMA_VERSION})")
            if conn.execute("PRAGMA quick_check(1)").fetchone()[0] != "ok":
                raise _Unusable("SQLite's quick_check found it damaged")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA journal_size_limit=16777216")
            conn.execute("PRAGMA cache_size=-32768")  # 32 MiB: the hot part of the FTS index stays in memory
            conn.executescript(_SCHEMA)
            self._recount(conn)
        except _Unusable:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            if _is_corrupt(exc):
                raise _Unusable(str(exc)) from exc
            raise self._open_error(exc) from exc
        return conn

    def _full_error(self) -> BlackboardDiskFull:
        where = self.path.parent if isinstance(self.path, Path) else "memory"
        return BlackboardDiskFull(
            f"the disk holding the blackboard ({where}) is full, so this was not stored; the posts already on "
            "the blackboard are kept. Free some space on that disk and try again"
        )

    def _open_error(self, exc: sqlite3.Error) -> BlackboardError:
        name = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            hint = "another process (a second node with the same home?) is using it; stop that process"
        elif name.startswith("SQLITE_FULL"):
            hint = "the disk is full; free some space"
        else:
            hint = "check that the path is a file the node's user can read and write, or move it away"
        return BlackboardError(f"cannot open the blackboard database {self.path}: {exc} ({name}); {hint}")

    def _quarantine(self, why: str) -> None:
        """Move an unusable database (and its -wal and -shm files) aside so that a fresh one can start."""
        if not isinstance(self.path, Path):
            raise BlackboardError(f"the in-memory blackboard database is unusable: {why}")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for n in range(1, 100):
            if not aside.exists():
                break
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}-{n}")
        try:
            for suffix in ("", "-wal", "-shm"):
                source = self.path.with_name(self.path.name + suffix)
                if source.exists():
                    source.rename(aside.with_name(aside.name + suffix))
        except OSError as exc:
            raise BlackboardError(
                f"the blackboard database {self.path} is unusable ({why}) and could not be moved aside ({exc}); "
                "delete it (the other nodes will send the posts again) and restart the node"
            ) from exc
        log.warning(
            "the blackboard database %s is unusable (%s): moved it to %s and started an empty one; "
            "peers will send the live posts again",
            self.path,
            why,
            aside,
        )

    def _db(self, op: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `op` under the lock; on a corruption error move the file aside, reopen, retry once."""
        with self._lock:
            if self._conn is None:
                raise BlackboardError("the blackboard store is closed")
            try:
                return op(self._conn)
            except sqlite3.Error as exc:
                if _is_full(exc):
                    raise self._full_error() from exc
                if not _is_corrupt(exc):
                    raise BlackboardError(f"the blackboard database {self.path} failed: {exc}") from exc
                self._conn.close()
                self._conn = None
                self._quarantine(str(exc))
                self._open()
                assert self._conn is not None
                try:
                    return op(self._conn)
                except sqlite3.Error as again:
                    raise BlackboardError(f"the blackboard database {self.path} failed: {again}") from again

    # -- writing -------------------------------------------------------------------------------

    def add(self, post: Post, now: float) -> bool:
        """Store a post; False if it is already stored or expired. `BlackboardError` if the store is
        full of live posts."""
        return bool(self.add_many([post], now))

    def add_many(self, posts: Iterable[Post], now: float) -> list[Post]:
        """Store several posts in one transaction (several times faster than one `add` each); returns
        those that were new. At the cap, the posts before the one refused stay stored and
        `BlackboardError` is raised."""
        batch = list(posts)
        now = check_time(now, "now")
        return self._db(lambda conn: self._insert(conn, batch, now))

    def _insert(self, conn: sqlite3.Connection, posts: list[Post], now: float) -> list[Post]:
        added: list[Post] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for post in posts:
                created = check_time(post.created, f"post {post.id}: created")
                if not 0 <= created < MAX_CREATED:
                    raise BlackboardError(f"post {post.id}: created {created} is not a time")
                if created + TTL_S <= now:
                    continue
                if self._count >= self.cap:
                    if conn.execute("SELECT 1 FROM posts WHERE id = ?", (post.id,)).fetchone():
                        continue
                    self._expire(conn, now)
                    if self._count >= self.cap:
                        raise BlackboardError(
                            f"the blackboard is full: this node keeps at most {self.cap} live posts; "
                            "try again when older posts expire"
                        )
                if self._insert_one(conn, post, created):
                    added.append(post)
        except BlackboardError:
            self._commit(conn)  # keep the posts stored before the refused one
            raise
        except BaseException:
            self._rollback(conn)
            raise
        self._commit(conn)
        return added

    def _commit(self, conn: sqlite3.Connection) -> None:
        """COMMIT, or (when that fails: a full disk, say) roll back so that the connection takes the next write."""
        try:
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise

    def _insert_one(self, conn: sqlite3.Connection, post: Post, created: float) -> bool:
        author_key = post.author.casefold()
        tags = tag_tokens(author_key, post.kind)
        bucket = bucket_of(created)
        rowid = time_rowid(created) + (zlib.crc32(post.id.encode()) & ((1 << MS_BITS) - 1))
        while True:
            row = (
                rowid,
                post.id,
                post.author,
                author_key,
                post.origin,
                created,
                bucket,
                post.kind,
                post.text,
                tags,
                post.reply_to,
                post.public_key,
                post.signature,
            )
            try:
                cursor = conn.execute(_INSERT, row)
            except UnicodeEncodeError as exc:
                raise BlackboardError(f"post {post.id}: its text or author is not valid Unicode") from exc
            except sqlite3.IntegrityError as exc:
                if getattr(exc, "sqlite_errorname", "") != "SQLITE_CONSTRAINT_PRIMARYKEY":
                    raise
                rowid += 1  # another post has this millisecond and these id bits
                continue
            break
        if not cursor.rowcount:
            return False
        conn.execute(_INDEX, (rowid, post.text, tags))
        self._count += 1
        self._buckets[bucket] = None
        return True

    def _rollback(self, conn: sqlite3.Connection) -> None:
        """Undo the open transaction and recount what is stored (the in-memory counts ran ahead)."""
        try:
            if conn.in_transaction:  # SQLite may have rolled back already (it does on some SQLITE_FULL errors)
                conn.execute("ROLLBACK")
            self._recount(conn)
        except sqlite3.Error as exc:  # the connection is past saving; the caller's error says why
            log.debug("rollback on %s failed: %s", self.path, exc)

    def expire(self, now: float) -> int:
        """Delete the posts past `created + TTL_S`; how many were deleted."""
        now = check_time(now, "now")

        def op(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                deleted = self._expire(conn, now)
            except BaseException:
                self._rollback(conn)
                raise
            self._commit(conn)
            return deleted

        return self._db(op)

    def _expire(self, conn: sqlite3.Connection, now: float) -> int:
        cutoff = now - TTL_S
        # Rows of later milliseconds hold no expired post, bar the rare rowid bumped past its millisecond.
        bound = time_rowid(cutoff) + (2 << MS_BITS)
        deleted = conn.execute("DELETE FROM posts WHERE rowid < ? AND created <= ?", (bound, cutoff)).rowcount
        if deleted:
            self._count -= deleted
            edge = bucket_of(cutoff)
            for bucket in [b for b in self._buckets if b <= edge]:
                del self._buckets[bucket]
            if conn.execute("SELECT 1 FROM posts WHERE bucket = ? LIMIT 1", (edge,)).fetchone():
                self._buckets[edge] = None
        return deleted

    # -- reading -------------------------------------------------------------------------------

    def has(self, post_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("SELECT 1 FROM posts WHERE id = ?", (post_id,)).fetchone() is not None

        return self._db(op)

    def get(self, ids: Iterable[str]) -> list[Post]:
        """The stored posts with these ids, in the order asked, each once; unknown ids are skipped.
        Expired posts that `expire` has not yet deleted are included (the caller checks `post.expires`)."""
        wanted = list(dict.fromkeys(i for i in ids if isinstance(i, str)))

        def op(conn: sqlite3.Connection) -> list[Post]:
            found: dict[str, Post] = {}
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(f"SELECT {_COLUMNS} FROM posts p WHERE p.id IN ({marks})", chunk):
                    found[row[0]] = _post(row)
            return [found[i] for i in wanted if i in found]

        return self._db(op)

    def count(self) -> int:
        """How many posts are stored (expired ones that `expire` has not yet deleted included)."""
        with self._lock:
            return self._count

    def count_by_origin(self, now: float) -> dict[str, int]:
        """Live posts per origin node (a covering-index scan: about 12 ms at 100 000 posts)."""
        cutoff = check_time(now, "now") - TTL_S
        sql = "SELECT origin, count(*) FROM posts WHERE created > ? GROUP BY origin"
        return self._db(lambda conn: {origin: n for origin, n in conn.execute(sql, (cutoff,))})

    def feed(
        self,
        *,
        author: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        limit: int = 20,
        now: float,
    ) -> list[Post]:
        """The newest live posts that pass the filters, newest first."""
        filters = Filters(author, kind, since, now)
        limit = min(int(limit), MAX_LIMIT)
        if limit < 1:
            return []
        where, params = filters.sql()
        sql = f"SELECT {_COLUMNS} FROM posts p WHERE {where} ORDER BY p.rowid DESC LIMIT ?"
        return self._db(lambda conn: [_post(row) for row in conn.execute(sql, (*params, limit))])

    def search(
        self,
        query: str,
        *,
        author: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        limit: int = 20,
        now: float,
    ) -> list[Post]:
        """Live posts matching the free-text `query` and the filters, best first: those with every
        word first, then those with some. An empty query gives the feed."""
        if not isinstance(query, str):
            raise BlackboardError("a search query must be a string")
        if not query.strip():
            return self.feed(author=author, kind=kind, since=since, limit=limit, now=now)
        filters = Filters(author, kind, since, now)
        limit = min(int(limit), MAX_LIMIT)
        phrases, rank = query_phrases(query)
        if limit < 1 or not phrases:
            return []
        sql = _SEARCH if rank else _SEARCH_NEWEST

        def ranked(conn: sqlite3.Connection, operator: str, n: int) -> list[Post]:
            rows = conn.execute(sql, (filters.match(phrases, operator), filters.low, n + _PAD))
            return [_post(row) for row in rows if filters.keep(row[3], row[9], row[5])][:n]

        def op(conn: sqlite3.Connection) -> list[Post]:
            found = ranked(conn, "AND", limit)
            if len(found) < limit and len(phrases) > 1:
                seen = {p.id for p in found}
                more = ranked(conn, "OR", limit + len(found))
                found += [p for p in more if p.id not in seen][: limit - len(found)]
            return found

        return self._db(op)

    # -- anti-entropy --------------------------------------------------------------------------

    def digest(self, now: float) -> dict[int, str]:
        """Bucket → hash of its live ids (`bucket_hash`), for every bucket holding live posts."""
        cutoff = check_time(now, "now") - TTL_S
        edge = bucket_of(cutoff)  # the one bucket that can be partly expired

        def op(conn: sqlite3.Connection) -> dict[int, str]:
            out: dict[int, str] = {}
            for bucket in sorted(self._buckets):
                if bucket < edge:
                    continue
                cached = self._buckets[bucket]
                if bucket > edge and cached is not None:
                    out[bucket] = cached
                    continue
                ids = self._live_ids(conn, bucket, cutoff)
                if ids:
                    out[bucket] = bucket_hash(ids)
                    if bucket > edge:
                        self._buckets[bucket] = out[bucket]
            return out

        return self._db(op)

    def ids_in(self, buckets: Iterable[int], now: float) -> dict[int, list[str]]:
        """The live ids (sorted) in each of these buckets; an empty list for a bucket with none."""
        cutoff = check_time(now, "now") - TTL_S
        wanted = list(dict.fromkeys(int(b) for b in buckets))
        return self._db(lambda conn: {b: self._live_ids(conn, b, cutoff) for b in wanted})

    @staticmethod
    def _live_ids(conn: sqlite3.Connection, bucket: int, cutoff: float) -> list[str]:
        rows = conn.execute("SELECT id FROM posts WHERE bucket = ? AND created > ? ORDER BY id", (bucket, cutoff))
        return [i for (i,) in rows]

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database (idempotent); later calls raise `BlackboardError`."""
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.execute("PRAGMA optimize")
            except sqlite3.Error as exc:
                log.debug("PRAGMA optimize on %s failed: %s", self.path, exc)
            finally:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""How the blackboard store keys, tags and finds posts: free-text queries as FTS5 phrases, filters as FTS5 terms
and SQL bounds, and the time-ordered rowids and hash tags those bounds and terms rely on.

Pure (no SQLite connection): `blackboard.store` writes rows with `time_rowid` and `tags` and runs the
expressions built here. The design (why rowids are times, why tags are hash tokens, how a query is ranked) is in
`blackboard.store`'s docstring.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

from mesh_mcp.errors import BlackboardError

from .post import TTL_S

__all__ = [
    "MAX_TERMS",
    "MS_BITS",
    "STOPWORDS",
    "Filters",
    "check_time",
    "query_phrases",
    "tag_tokens",
    "time_rowid",
]

MAX_TERMS = 16  # query pieces beyond this are ignored
MS_BITS = 10  # rowid = created in ms << MS_BITS | 10 bits of the id
_EDGES = re.compile(r"^[\W_]+|[\W_]+$")  # punctuation around a word

# Dropped from a query that has other words: they match nearly every post and only slow bm25 down.
STOPWORDS = frozenset(
    """a about after again all also am an and any are as at be because been before being both but by can could
    did do does doing down during each few for from further had has have having he her here hers him his how i if
    in into is it its itself just me more most my no nor not now of off on once only or other our ours out over
    own same she should so some such than that the their theirs them then there these they this those through
    to too under until up very was we were what when where which while who whom why will with would you your
    yours""".split()
)


def query_phrases(query: str) -> tuple[list[str], bool]:
    """The free-text query as FTS5 phrases, one quoted phrase per white-space separated piece, and
    whether to rank them by bm25.

    Quoting makes every piece literal text (operators, `*`, `:`, `(` and `-` are only separators
    inside a phrase). Pieces with no letter or digit, and repeats, are dropped, and so are common
    English words (`STOPWORDS`) when other words remain; at most `MAX_TERMS` are kept. A query of
    common words only is not ranked (bm25 gives a word in most posts no weight; computing that
    costs a pass over the word's whole posting list): its matches come newest first."""
    pieces: list[str] = []
    seen: set[str] = set()
    for piece in _clean(query).replace("\x00", " ").split():
        key = piece.casefold()
        if key in seen or not any(c.isalnum() for c in piece):
            continue
        seen.add(key)
        pieces.append(piece)
    content = [p for p in pieces if _EDGES.sub("", p.casefold()) not in STOPWORDS]
    phrases = ['"' + p.replace('"', '""') + '"' for p in (content or pieces)[:MAX_TERMS]]
    return phrases, bool(content)


def _clean(text: str) -> str:
    """`text` as valid Unicode: lone surrogates (which SQLite cannot take) become "?"."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _tag(prefix: str, value: str) -> str:
    """One FTS5 token standing for an exact value (the tokenizer keeps letters and digits together)."""
    return prefix + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def tag_tokens(author_key: str, kind: str) -> str:
    return f"{_tag('a', author_key)} {_tag('k', kind)}"


def time_rowid(t: float) -> int:
    """The smallest rowid of a post created at `t`, to the nearest millisecond (clamped to SQLite's range).

    Monotonic in `t`, so `created > t` implies `rowid >= time_rowid(t)`, and exact for the
    millisecond times `make_post` gives, so posts a millisecond apart never share a key."""
    ms = round(max(-1e15, min(1e15, t)) * 1000)
    return max(-(2**52), min(2**52, ms)) << MS_BITS


def check_time(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BlackboardError(f"{what} must be a finite number of unix seconds")
    return float(value)


class Filters:
    """A search's or feed's filters, as SQL bounds, FTS5 terms and an exact test of each row."""

    def __init__(self, author: str | None, kind: str | None, since: float | None, now: float) -> None:
        now = check_time(now, "now")
        self.cutoff = now - TTL_S  # live: created > cutoff
        self.since = None if since is None else check_time(since, "since")
        self.author_key = None if author is None else _clean(str(author)).strip().casefold()
        self.kind = None if kind is None else _clean(str(kind)).strip().upper()
        self.low = time_rowid(self.cutoff if self.since is None else max(self.cutoff, self.since))
        self.terms: list[str] = []
        if self.author_key is not None:
            self.terms.append(f'tags : "{_tag("a", self.author_key)}"')
        if self.kind is not None:
            self.terms.append(f'tags : "{_tag("k", self.kind)}"')

    def keep(self, created: float, author_key: str, kind: str) -> bool:
        return (
            created > self.cutoff
            and (self.since is None or created >= self.since)
            and (self.author_key is None or author_key == self.author_key)
            and (self.kind is None or kind == self.kind)
        )

    def sql(self) -> tuple[str, list[Any]]:
        """The condition on `posts p` and its parameters."""
        where = ["p.rowid >= ?", "p.created > ?"]
        params: list[Any] = [self.low, self.cutoff]
        if self.since is not None:
            where.append("p.created >= ?")
            params.append(self.since)
        if self.author_key is not None:
            where.append("p.author_key = ?")
            params.append(self.author_key)
        if self.kind is not None:
            where.append("p.kind = ?")
            params.append(self.kind)
        return " AND ".join(where), params

    def match(self, phrases: list[str], operator: str) -> str:
        """The FTS5 expression: the phrases (in the text column) joined by `operator`, and the filter terms."""
        words = f" {operator} ".join(f"text : {p}" for p in phrases)
        return " AND ".join([f"({words})", *self.terms]) if self.terms else words

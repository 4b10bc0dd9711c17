"""Blackboard abuse: control, bidi and invisible characters in posts (terminal escape injection, hidden text) and
rate-limit evasion (a new author per post, a flooding origin, key cycling against the limit tables).

Pure `Board` tests run a real SQLite store and the real scrubber with a fake clock; one test runs a real node and
`mesh-llm blackboard` as a user would.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import subprocess
import sys
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from blackboard import post as post_module
from blackboard.board import Board
from blackboard.limits import NODE_LIMIT, ORIGIN_LIMIT, SOURCE_LIMIT, Limit, RateLimiter, take_all
from blackboard.post import MAX_AUTHOR, Post, from_wire, make_post, parse_kind, to_wire
from blackboard.scrub import Scrubber, default_scrubber
from blackboard.store import Store
from inference.controls import is_hidden, printable, strip_controls
from mesh_mcp.errors import BlackboardError, ProtocolError, RateLimited
from tests.harness import NodeProcess

NOW = 1_800_000_000.0
T = TypeVar("T")

# What a hostile post carries: clear screen, bell, carriage return, a right-to-left override, a one-byte CSI (C1),
# an OSC title change, a zero-width space, a bidi isolate, a BOM and invisible tag characters ("hi" in tags).
HOSTILE = "\x1b[2J\x07\r\u202e\x9b31m\x1b]0;pwned\x07\u200b\u2066\ufeff\U000e0068\U000e0069"
HIDDEN_BYTES = [c.encode() for c in HOSTILE if is_hidden(c)]


# --- helpers --------------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def node_id(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signed_wire(text: str, author: str, key: Ed25519PrivateKey, now: float) -> dict[str, Any]:
    """A post signed as it is, without `make_post`'s checks: what a hostile (or an older) node can send."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    body: dict[str, Any] = {
        "author": author,
        "origin": node_id(key),
        "created": round(now, 3),
        "text": text,
        "reply_to": None,
        "public_key": base64.b64encode(raw).decode(),
    }
    data = post_module._signing_bytes(body)
    signature = base64.b64encode(key.sign(data)).decode()
    return {**body, "id": hashlib.sha256(data).hexdigest()[:32], "signature": signature}


def unchecked_post(wire: dict[str, Any]) -> Post:
    return Post(
        id=wire["id"],
        author=wire["author"],
        origin=wire["origin"],
        created=wire["created"],
        text=wire["text"],
        kind=parse_kind(wire["text"]),
        reply_to=None,
        public_key=base64.b64decode(wire["public_key"]),
        signature=base64.b64decode(wire["signature"]),
    )


@pytest.fixture(scope="module")
def scrubber() -> Scrubber:
    return default_scrubber()  # the real one, made once per process (a second or two)


@pytest.fixture
def board(tmp_path: Path, scrubber: Scrubber) -> Iterator[Board]:
    key = Ed25519PrivateKey.generate()
    with Store(tmp_path / "blackboard.db") as store:
        yield Board(store, key, node_id(key), "me", lambda: scrubber, clock=Clock())


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn)


async def attempt(board: Board, text: str, author: str, source: str) -> float:
    """0 if the post was accepted, else the retry_after of its refusal."""
    try:
        await board.post(text, author=author, source=source)
    except RateLimited as exc:
        assert exc.retry_after > 0
        return exc.retry_after
    return 0.0


# --- the one definition of hidden characters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "char",
    list("\x00\x07\x08\x0b\x0c\r\x1b\x7f\x85\x9b\u061c\u00ad\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e")
    + list("\u2060\u2066\u2067\u2068\u2069\ufeff\U000e0001\U000e0041\U000e007f"),
)
def test_controls_bidi_and_format_characters_are_hidden(char: str) -> None:
    assert is_hidden(char)
    assert strip_controls(f"a{char}b") == "ab" and printable(f"a{char}b") == "a\ufffdb"


@pytest.mark.parametrize("char", ["\n", "\t", " ", "a", "é", "\u00a0", "中", "\u200c", "\u200d", "👩", "\u2028"])
def test_text_layout_and_joiners_are_kept(char: str) -> None:
    assert not is_hidden(char) and strip_controls(f"a{char}b") == f"a{char}b"


def test_the_hidden_set_is_unicodes_format_and_control_characters() -> None:
    """The written-out class equals its definition (C0 but tab/newline, DEL, C1, Cf but the joiners) for this
    Python's Unicode; only Egyptian hieroglyph format controls that Unicode 15 added may be extra."""
    newer = set(range(0x13439, 0x13440))
    for code in range(0x110000):
        char = chr(code)
        expected = (code < 0x20 and char not in "\t\n") or 0x7F <= code <= 0x9F
        expected = expected or (unicodedata.category(char) == "Cf" and char not in "\u200c\u200d") or code in newer
        assert is_hidden(char) == expected, f"U+{code:04X}"


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_stripping_leaves_nothing_hidden_and_is_idempotent(text: str) -> None:
    clean = strip_controls(text)
    assert not any(is_hidden(c) for c in clean)
    assert strip_controls(clean) == clean and clean.count("\n") == text.count("\n")
    shown = printable(text)
    assert len(shown) == len(text) and not any(is_hidden(c) for c in shown)
    assert all(unicodedata.category(c) != "Cc" or c in "\n\t" for c in shown)


# --- stripped at the one way in -------------------------------------------------------------------------------------


def test_a_post_is_stored_without_control_bidi_or_format_characters(board: Board) -> None:
    text = f"STATUS: line one{HOSTILE} done\n\tindented 👩\u200d💻 ok"
    post = run(lambda: board.post(text, author="mal\x1b[31mlory\u202e\n\tthe\u00a0second\u200b", source="127.0.0.1"))
    assert post.text == "STATUS: line one[2J31m]0;pwned done\n\tindented 👩\u200d💻 ok"
    assert post.author == "mal[31mlory the second" and post.kind == "STATUS"
    assert from_wire(to_wire(post)) == post, "what an honest node signs, every receiver accepts"
    stored = run(lambda: board.feed())
    assert [(p.text, p.author) for p in stored] == [(post.text, post.author)]


def test_an_author_of_only_hidden_characters_becomes_the_nodes_name(board: Board) -> None:
    post = run(lambda: board.post("NOTE: hi", author="\u202e\x1b\u200b"))
    assert post.author == "me"


def test_a_zero_width_space_does_not_hide_personal_data_from_the_scrubber(board: Board) -> None:
    post = run(lambda: board.post("FINDING: write to jane.doe\u200b@exam\u200bple.com", author="al\u200bice"))
    assert "jane.doe" not in post.text and "example" not in post.text and post.author == "alice"


def test_make_post_never_signs_what_receivers_refuse() -> None:
    with pytest.raises(BlackboardError, match="control, bidi or invisible format"):
        make_post("NOTE: \x1b[2J", "alice", Ed25519PrivateKey.generate(), NOW)
    with pytest.raises(BlackboardError, match="printable"):
        make_post("NOTE: ok", "al\u202eice", Ed25519PrivateKey.generate(), NOW)


# --- refused when relayed -------------------------------------------------------------------------------------------


def test_a_relayed_post_carrying_hidden_characters_is_refused(board: Board, caplog: pytest.LogCaptureFixture) -> None:
    peer = Ed25519PrivateKey.generate()
    dirty = [
        signed_wire(f"NOTE: {char}clear", "rogue", peer, NOW) for char in ("\x1b[2J", "\x07", "\r", "\u202e", "\u200b")
    ]
    dirty_author = signed_wire("NOTE: fine text", "ro\u202egue", peer, NOW)
    clean = signed_wire("NOTE: a fair post", "rogue", peer, NOW)
    with caplog.at_level(logging.WARNING, logger="mesh_llm.blackboard"):
        accepted = run(lambda: board.receive([*dirty, dirty_author, clean], "feedfacefeedface"))
    assert [p.text for p in accepted] == ["NOTE: a fair post"]
    assert [p.text for p in run(lambda: board.feed())] == ["NOTE: a fair post"]
    assert caplog.text.count("control, bidi or invisible format characters") == len(dirty)
    assert "\x1b" not in caplog.text and "\u202e" not in caplog.text


def test_unknown_fields_are_named_briefly(board: Board) -> None:
    wire = {**signed_wire("NOTE: x", "rogue", Ed25519PrivateKey.generate(), NOW)}
    wire.update({f"\x1b[2Jfield{i}" + "x" * 1000: i for i in range(10_000)})
    with pytest.raises(ProtocolError) as err:
        from_wire(wire)
    message = str(err.value)
    assert len(message) < 400 and "and 9997 more" in message and "\x1b" not in message


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FUZZ_KEY = Ed25519PrivateKey.generate()
FIELDS = ("id", "author", "origin", "created", "text", "reply_to", "public_key", "signature")


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        JSON,
        st.fixed_dictionaries({f: JSON | st.text(max_size=60) for f in FIELDS}),
        st.builds(
            lambda text, author: signed_wire(text, author, FUZZ_KEY, NOW),
            st.text(min_size=1, max_size=60),
            st.text(min_size=1, max_size=10),
        ),
    )
)
def test_any_wire_post_parses_or_is_a_protocol_error(wire: object) -> None:
    """Fuzzing the post parser: 1000 inputs (JSON, post-shaped objects, signed posts of any text); 0 crashes, and
    whatever parses is free of hidden characters."""
    try:
        post = from_wire(wire)
    except ProtocolError:
        return
    assert strip_controls(post.text) == post.text and post.author.isprintable()


# --- rate limits ----------------------------------------------------------------------------------------------------


def test_a_client_naming_a_new_author_per_post_is_limited(board: Board) -> None:
    """Regression: 1000 posts with 1000 author names from one client were all accepted."""

    async def flood() -> list[float]:
        return [await attempt(board, f"NOTE: flood {i}", f"author{i}", "127.0.0.1") for i in range(1000)]

    waits = run(flood)
    burst = SOURCE_LIMIT.burst
    assert waits[:burst] == [0.0] * burst and all(w > 0 for w in waits[burst:])
    assert run(board.count) == burst
    with pytest.raises(RateLimited, match=r"too many posts from this client \(127\.0\.0\.1\).*retry in \d+ s"):
        run(lambda: board.post("NOTE: one more", author="someone-new", source="127.0.0.1"))
    # another client still posts, and this one again once its bucket refills
    assert run(lambda: attempt(board, "NOTE: from elsewhere", "bob", "10.0.0.9")) == 0
    clock = board._clock
    assert isinstance(clock, Clock)
    clock.now += SOURCE_LIMIT.refill_s
    assert run(lambda: attempt(board, "NOTE: later", "carol", "127.0.0.1")) == 0
    assert len(board._authors) <= burst + 2, "refused posts leave no author behind"


def test_the_node_as_a_whole_is_limited_across_clients(board: Board) -> None:
    async def flood() -> list[float]:
        return [await attempt(board, f"NOTE: {i}", f"a{i}", f"10.0.{i // 250}.{i % 250}") for i in range(400)]

    waits = run(flood)
    assert waits[: NODE_LIMIT.burst] == [0.0] * NODE_LIMIT.burst and all(w > 0 for w in waits[NODE_LIMIT.burst :])
    with pytest.raises(RateLimited, match="this node takes at most"):
        run(lambda: board.post("NOTE: x", author="z", source="10.9.9.9"))


def test_an_author_keeps_their_own_limit() -> None:
    async def main(board: Board) -> list[float]:
        return [await attempt(board, f"STATUS: {i}", "alice", "127.0.0.1") for i in range(25)]

    key = Ed25519PrivateKey.generate()
    with Store(":memory:") as store:
        board = Board(store, key, node_id(key), "me", default_scrubber, clock=Clock())
        waits = anyio.run(main, board)
    assert waits[:20] == [0.0] * 20 and all(w > 0 for w in waits[20:])


def test_a_flooding_origin_is_limited_and_others_are_not(board: Board, caplog: pytest.LogCaptureFixture) -> None:
    flooder, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    flood = [signed_wire(f"NOTE: flood {i}", f"author{i}", flooder, NOW - i) for i in range(ORIGIN_LIMIT.burst + 100)]
    with caplog.at_level(logging.WARNING, logger="mesh_llm.blackboard"):
        accepted = run(lambda: board.receive(flood, node_id(other)))
        assert len(accepted) == ORIGIN_LIMIT.burst
        assert len(run(lambda: board.receive([signed_wire("NOTE: calm", "bob", other, NOW)], "0" * 16))) == 1
    assert 1 <= caplog.text.count("posts faster than 500 at once") <= 20, "refusals are logged, boundedly"
    # the refused ones are not lost: offered again (as the anti-entropy sync does), they fit as the bucket refills
    clock = board._clock
    assert isinstance(clock, Clock)
    clock.now += 10 * ORIGIN_LIMIT.refill_s
    again = run(lambda: board.receive(flood, node_id(other)))
    assert len(again) == 10 and run(board.count) == ORIGIN_LIMIT.burst + 11


def test_limit_tables_stay_bounded_when_keys_cycle() -> None:
    limiter = RateLimiter(Limit(burst=5, per_hour=360), max_keys=100)  # one post per 10 s after the burst
    busy = 0
    for i in range(10_000):
        busy += limiter.take("busy", i / 10) == 0  # a key that keeps trying is remembered, with its debt
        assert limiter.take(f"fresh{i}", i / 10) == 0
        assert len(limiter) <= 100
    assert busy <= 5 + 1000 / 10 + 1, "cycling 10 000 other keys did not forgive the busy key"
    assert limiter.check("fresh0", 1000) == 0, "a key not used for long is forgotten (it was full anyway)"


def test_take_all_spends_from_every_bucket_or_none() -> None:
    a, b = RateLimiter(Limit(burst=1, per_hour=3600)), RateLimiter(Limit(burst=3, per_hour=360))
    assert take_all([(a, "k"), (b, "k")], 0) == (0.0, -1)
    wait, which = take_all([(a, "k"), (b, "k")], 0)
    assert which == 0 and wait == pytest.approx(1)
    assert b.check("k", 0) == 0 and len(b) == 1, "the refused post spent nothing from b"
    assert take_all([(a, "k"), (b, "k")], 1)[0] == 0 and take_all([(a, "k"), (b, "k")], 2)[0] == 0
    wait, which = take_all([(a, "k"), (b, "k")], 3)
    assert which == 1 and wait == pytest.approx(7), "the wait is the longest bucket's, not the first's"


def test_author_limit_keeps_its_documented_bounds() -> None:
    assert MAX_AUTHOR == 64 and SOURCE_LIMIT.burst < NODE_LIMIT.burst < ORIGIN_LIMIT.burst
    assert NODE_LIMIT.per_hour * 2 <= ORIGIN_LIMIT.per_hour, "an honest origin never meets the relay limit"


# --- a real node and the CLI ----------------------------------------------------------------------------------------


def cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "MESH_LLM_HOME": str(node.home)}
    return subprocess.run(
        [sys.executable, "-m", "mesh_mcp.cli", "blackboard", *args], capture_output=True, timeout=60, env=env
    )


@pytest.mark.slow
def test_a_real_node_strips_posts_prints_nothing_raw_and_limits_a_flooding_client(
    spawn: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    # a post stored before this node stripped anything (an older version's database)
    old = signed_wire(f"NOTE: legacy{HOSTILE}tail", "old\u202eauthor", Ed25519PrivateKey.generate(), time.time())
    (tmp_path / "alice").mkdir()
    with Store(tmp_path / "alice" / "blackboard.db") as store:
        assert store.add(unchecked_post(old), time.time())
    node = spawn("--mesh-host", "127.0.0.2", "--name", "alice", "--blackboard", name="alice")
    node.wait_for("blackboard", lambda s: (s.get("blackboard") or {}).get("state") == "ready", timeout=60)

    with httpx2.Client(base_url=node.console, timeout=30) as http:
        started = time.monotonic()  # the client's bucket refills from here on
        r = http.post("/api/blackboard", json={"text": f"FINDING: hostile{HOSTILE}end", "author": "m\x1b[2Jallory"})
        assert r.status_code == 201, r.text
        post = r.json()["post"]
        assert post["text"] == "FINDING: hostile[2J31m]0;pwnedend" and post["author"] == "m[2Jallory"

        for args in (("--search", "hostile"), ("--search", "legacy"), ()):
            out = cli(node, *args)
            assert out.returncode == 0, out.stderr
            assert b"hostile" in out.stdout or b"legacy" in out.stdout
            assert not [b for b in HIDDEN_BYTES if b in out.stdout], f"raw control bytes in {out.stdout!r}"
        assert "\ufffd".encode() in cli(node, "--search", "legacy").stdout, "the old post's characters are shown"

        # up to 1000 author names from one client (it was: 1000 accepted): 429 once the client's burst is spent;
        # the flood stops at 100 refusals, which the old node never gave
        replies: list[httpx2.Response] = []
        for i in range(1000):
            replies.append(http.post("/api/blackboard", json={"text": f"NOTE: {i}", "author": f"a{i}"}))
            if sum(r.status_code == 429 for r in replies) >= 100:
                break
        elapsed = time.monotonic() - started
    statuses = [r.status_code for r in replies]
    first = SOURCE_LIMIT.burst - 1  # the hostile post above came from this client too
    assert statuses[:first] == [201] * first and set(statuses) == {201, 429} and len(statuses) < 1000
    assert statuses.count(201) <= first + elapsed / SOURCE_LIMIT.refill_s + 2, "only the refill gets through"
    refused = replies[statuses.index(429)]
    assert "this client" in refused.json()["error"]["message"] and int(refused.headers["retry-after"]) >= 1
    log = node.log()
    assert "Traceback" not in log and "\x1b[2J" not in log and "\u202e" not in log

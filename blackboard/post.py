"""A blackboard post: what it holds, its limits, how its origin node signs it, its wire form.

A post is made once, on the node where it was written, *after* scrubbing (blackboard/scrub.py),
and is never edited: its id is the first 16 bytes of sha256 over its signed bytes, so the id
names exactly one content and deduplicates it everywhere. The origin node signs it with its
Ed25519 identity key and the post carries that public key, so any node can check it without
knowing the origin (which may have left the mesh): the key must hash to `origin`, the signature
must cover `signing_bytes` (compact, sorted-key JSON of every other field behind a domain prefix),
and the id must match.

`from_wire` is strict: unknown or missing fields, wrong types, oversized text, malformed ids and
control, bidi or invisible format characters (inference/controls.py; the origin's `Board.post` strips
them before signing, so a post that carries them was never made by an honest node) are
`ProtocolError`s. `make_post` checks what a poster typed and raises `BlackboardError` with a message
meant for that poster.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from inference.controls import strip_controls
from inference.keys import is_small_order
from mesh_mcp.errors import BlackboardError, PostTooLarge, ProtocolError

TTL_S = 48 * 3600  # a post lives this long, everywhere
MAX_TEXT_BYTES = 4096  # UTF-8
MAX_AUTHOR = 64
FUTURE_SKEW_S = 300  # posts dated further ahead than this are refused (a wrong clock or a forgery)
ID_HEX = 32  # 16 bytes
NODE_ID_HEX = 16
_DOMAIN = b"mesh-llm blackboard post v1\n"
_KIND = re.compile(r"\s*([A-Z][A-Z_-]{1,15}):")
_HEX = re.compile(r"[0-9a-f]+")
KNOWN_KINDS = ("STATUS", "FINDING", "QUESTION", "ANSWER", "TODO", "DONE", "BLOCKED", "IDEA", "WARNING", "NOTE")


@dataclass(frozen=True)
class Post:
    id: str  # 32 hex chars: sha256(signing bytes)[:16]
    author: str  # who wrote it (a person's or an agent's name), ≤ 64 chars
    origin: str  # node id of the node it was posted on
    created: float  # unix seconds (ms precision) on the origin's clock
    text: str  # ≤ 4 KiB UTF-8, as posted (after scrubbing), kind prefix included
    kind: str  # the leading "KIND:" of the text, upper case, or "" when there is none
    reply_to: str | None  # id of the post this answers
    public_key: bytes  # origin's Ed25519 public key (32 bytes)
    signature: bytes  # 64 bytes

    @property
    def expires(self) -> float:
        return self.created + TTL_S

    def summary(self) -> dict[str, Any]:
        """The post as users and agents see it (console, CLI --json, MCP tools)."""
        return {
            "id": self.id,
            "author": self.author,
            "origin": self.origin,
            "created": self.created,
            "kind": self.kind,
            "text": self.text,
            "reply_to": self.reply_to,
        }


def parse_kind(text: str) -> str:
    """`STATUS: …` → "STATUS"; any upper-case word of 2–16 letters before a colon counts."""
    found = _KIND.match(text)
    return found.group(1) if found else ""


def check_text(text: str) -> str:
    """The text a poster typed, trimmed, or a `BlackboardError` saying what is wrong with it."""
    if not isinstance(text, str):
        raise BlackboardError("a post's text must be a string")
    text = text.strip()
    if not text:
        raise BlackboardError("a post needs some text")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise BlackboardError("a post must be valid Unicode text (it has a lone surrogate)") from exc
    if size > MAX_TEXT_BYTES:
        raise PostTooLarge(f"a post is at most {MAX_TEXT_BYTES} bytes of UTF-8; this one is {size}")
    if "\x00" in text:
        raise BlackboardError("a post cannot contain NUL characters")
    return text


def check_author(author: str) -> str:
    if not isinstance(author, str) or not author.strip():
        raise BlackboardError("a post needs an author name")
    author = author.strip()
    if len(author) > MAX_AUTHOR:
        raise BlackboardError(f"an author name is one line of at most {MAX_AUTHOR} characters")
    if not author.isprintable():
        raise BlackboardError("an author name is one line of printable characters (no controls or tabs)")
    return author


def one_line(name: str) -> str:
    """An author name as `Board.post` stores it: printable characters only (no control, bidi, format
    or private-use ones), each run of whitespace (tabs, newlines, Unicode spaces) as one space."""
    return " ".join("".join(c for c in name if c.isprintable() or c.isspace()).split())


def check_post_id(value: object, what: str = "post id") -> str:
    if not isinstance(value, str) or len(value) != ID_HEX or not _HEX.fullmatch(value):
        raise BlackboardError(f"a {what} is {ID_HEX} lower-case hex characters")
    return value


def make_post(text: str, author: str, key: Ed25519PrivateKey, now: float, reply_to: str | None = None) -> Post:
    """Sign a new post. The text must already be scrubbed and stripped of control characters (`Board.post`
    does both); this only checks."""
    text = check_text(text)
    if strip_controls(text) != text:  # what receivers refuse (`from_wire`) is never signed
        raise BlackboardError("a post cannot carry control, bidi or invisible format characters")
    author = check_author(author)
    if reply_to is not None:
        reply_to = check_post_id(reply_to, "reply-to id")
    public_key = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    body: dict[str, Any] = {
        "author": author,
        "origin": hashlib.sha256(public_key).hexdigest()[:NODE_ID_HEX],
        "created": round(now, 3),
        "text": text,
        "reply_to": reply_to,
        "public_key": _b64(public_key),
    }
    data = _signing_bytes(body)
    return Post(
        id=hashlib.sha256(data).hexdigest()[:ID_HEX],
        author=author,
        origin=body["origin"],
        created=body["created"],
        text=text,
        kind=parse_kind(text),
        reply_to=reply_to,
        public_key=public_key,
        signature=key.sign(data),
    )


def verify(post: Post, now: float) -> None:
    """`ProtocolError` unless the post is genuine, well-formed and alive at `now`."""
    if hashlib.sha256(post.public_key).hexdigest()[:NODE_ID_HEX] != post.origin:
        raise ProtocolError(f"post {post.id}: its key is not node {post.origin}'s")
    if is_small_order(post.public_key):
        raise ProtocolError(f"post {post.id}: a weak public key (a point of small order)")
    data = _signing_bytes(_body(post))
    if hashlib.sha256(data).hexdigest()[:ID_HEX] != post.id:
        raise ProtocolError(f"post {post.id}: its id does not match its content")
    try:
        Ed25519PublicKey.from_public_bytes(post.public_key).verify(post.signature, data)
    except (InvalidSignature, ValueError) as exc:
        raise ProtocolError(f"post {post.id}: bad signature") from exc
    if post.created > now + FUTURE_SKEW_S:
        raise ProtocolError(f"post {post.id}: dated {post.created - now:.0f} s in the future")
    if post.expires <= now:
        raise ProtocolError(f"post {post.id}: expired")


def to_wire(post: Post) -> dict[str, Any]:
    return {**_body(post), "id": post.id, "signature": _b64(post.signature)}


def from_wire(obj: object) -> Post:
    if not isinstance(obj, dict):
        raise ProtocolError("a post must be a JSON object")
    expected = {"id", "author", "origin", "created", "text", "reply_to", "public_key", "signature"}
    if set(obj) != expected:
        unknown = [k for k in obj if k not in expected]
        names = ", ".join(repr(k)[:40] for k in unknown[:3])  # bounded, and escaped by repr: it goes to the log
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ProtocolError(
            f"a post has the fields {sorted(expected)}; missing {sorted(expected - set(obj))}, unknown [{names}{more}]"
        )
    try:
        post_id = check_post_id(obj["id"])
        text = check_text(obj["text"])
        author = check_author(obj["author"])
        reply_to = None if obj["reply_to"] is None else check_post_id(obj["reply_to"], "reply-to id")
    except BlackboardError as exc:
        raise ProtocolError(f"malformed post: {exc}") from exc
    if text != obj["text"] or author != obj["author"]:
        raise ProtocolError("malformed post: untrimmed text or author")
    if strip_controls(text) != text:
        raise ProtocolError("malformed post: its text carries control, bidi or invisible format characters")
    origin = obj["origin"]
    if not isinstance(origin, str) or len(origin) != NODE_ID_HEX or not _HEX.fullmatch(origin):
        raise ProtocolError("malformed post: origin is not a node id")
    created = obj["created"]
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not 0 <= created < 1e11:
        raise ProtocolError("malformed post: created is not a time")
    return Post(
        id=post_id,
        author=author,
        origin=origin,
        created=float(created),
        text=text,
        kind=parse_kind(text),
        reply_to=reply_to,
        public_key=_unb64(obj["public_key"], 32),
        signature=_unb64(obj["signature"], 64),
    )


def _body(post: Post) -> dict[str, Any]:
    return {
        "author": post.author,
        "origin": post.origin,
        "created": post.created,
        "text": post.text,
        "reply_to": post.reply_to,
        "public_key": _b64(post.public_key),
    }


def _signing_bytes(body: dict[str, Any]) -> bytes:
    return _DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: object, size: int) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * size + 8:
        raise ProtocolError("malformed post: expected base64")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("malformed post: bad base64") from exc
    if len(data) != size:
        raise ProtocolError(f"malformed post: expected {size} bytes")
    return data

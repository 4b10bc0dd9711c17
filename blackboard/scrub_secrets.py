"""Shape tests for what the scrubber finds without a label: random-looking tokens (secrets pasted bare),
MAC addresses, IPv6 addresses with a port, and device serials.

Pure functions of `(text, match)` or of a value, used as the contexts and validators of the rules in
`blackboard.scrub_rules` (which presidio runs); what each keeps and why is listed in `blackboard.scrub`'s
docstring, and the thresholds are tuned on tests/data/scrub_quality.jsonl (bench/scrub_quality.py).

A token is a maximal run of base64/base64url characters (`[A-Za-z0-9+/_-]`, then up to two `=`). It is a secret
when it looks random (below) and nothing says it is a digest or an id:

- **Untargeted**: at least `MIN_RANDOM_LEN` characters with upper case, lower case and a digit,
  Shannon entropy per character of at least `min(log2(len) - 1, 4.5)` bits (random base62/base64 of that length
  stays above it 99.5 % of the time; `ggml_gemm_q4_K_8x8_q8_K` has 3.1 bits, a 40-character random key 4.4-5),
  and character classes changing at least every fourth character on average (CamelCase identifiers with digits
  change far less often). Pure hex runs (commit hashes, digests) and runs of one case (base32, ULIDs, file names)
  never count without a word around them.
- **Said to be secret**: within `CONTEXT_CHARS` before it a word like "secret", "token", "key", "password",
  "credential", "auth" or curl's `-u user:` (and no nearer word like "sha256", "commit", "digest", "hash"): then
  `MIN_SAID_LEN` characters with a digit and a letter and entropy of `log2(len) - 1.3` bits suffice, hex included.
- **Never**: after a digest label (`sha256:`, `sha512-`, `md5:`, `h1:`, `base64,`, `integrity`), C++ mangled
  names (`_Z…`), and ids with the prefixes that APIs give their request, message and call ids (`chatcmpl-`,
  `req_`, `msg_`, `toolu_`, `call_`, …): these are logged all the time and reveal nothing.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
from collections import Counter

__all__ = [
    "CONTEXT_CHARS",
    "MIN_RANDOM_LEN",
    "MIN_SAID_LEN",
    "entropy",
    "imei_valid",
    "ipv6_with_port",
    "mac_address",
    "random_token",
    "serial_value",
]

MIN_RANDOM_LEN = 20  # shorter random runs are as often ids, kernel names or model quant tags as keys
MIN_SAID_LEN = 16  # after "secret"/"token"/…: the shortest key worth guessing at
CONTEXT_CHARS = 40  # how far before a token a word like "secret" counts (about five words)
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-")

_SECRET_WORD = re.compile(
    r"(?i)(?<![a-z])(?:secret|token|key|apikey|passw(?:or)?d|passphrase|credential|auth|pat)s?(?![a-z])"
    r"|\s-u\s+[\w.\-]*:|--user\s+[\w.\-]*:"
)
_DIGEST_WORD = re.compile(
    r"(?i)(?:sha\d*|md5|digest|hash|checksum|commit|blob|tree|rev(?:ision)?|etag|fingerprint|uuid)"
)
_DIGEST_BEFORE = re.compile(r"(?i)(?:sha\d*|md5|blake2[bs]?|h1|sri|base64|integrity)[\"']?\s*[:=,]\s*[\"']?$")
_DIGEST_PREFIX = re.compile(r"(?:sha1|sha256|sha384|sha512)-")
# Ids that APIs hand out and logs print: OpenAI, Anthropic, Stripe objects (not keys), generic request ids.
_ID_PREFIX = re.compile(
    r"(?:chatcmpl|cmpl|resp|req|msg|msgbatch|toolu|call|run|step|thread|asst|file|batch|evt|ch|pi|cus|sub|in|"
    r"txn|ord|job|ftjob|ft|trace|span|conv|sess|session|request|id|wrkspc|org|user|proj)[_\-]"
)
_PLACEHOLDER = re.compile(r"<[A-Z_]+>")
# Hex, maybe with a short tag (`8f1c2d3e4a5b6c7d-FRA`, `build-9fceb02d0ae5`): digests and ids.
_HEX_WITH_TAG = re.compile(r"(?:[A-Za-z0-9]{1,8}[_\-])?[0-9a-fA-F]{16,}(?:[_\-][A-Za-z0-9]{1,8})?")


def entropy(value: str) -> float:
    """Shannon entropy of `value`'s characters, in bits per character."""
    n = len(value)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def _class_changes(value: str) -> float:
    """How often consecutive characters change class (digit, upper, lower, other), per character."""

    def cls(c: str) -> int:
        return 0 if c.isdigit() else 1 if c.isupper() else 2 if c.islower() else 3

    changes = sum(cls(a) != cls(b) for a, b in itertools.pairwise(value))
    return changes / max(1, len(value) - 1)


def _said_secret(text: str, start: int) -> bool:
    """A word like "secret" or "token" just before `start` on its line, with no digest word nearer."""
    # not in a placeholder (`<SECRET>`: scrubbing must not make new findings)
    before = _PLACEHOLDER.sub(" ", text[max(0, start - CONTEXT_CHARS) : start]).rpartition("\n")[2]
    said = [m.end() for m in _SECRET_WORD.finditer(before)]
    if not said:
        return False
    digest = [m.end() for m in _DIGEST_WORD.finditer(before)]
    return not digest or max(said) > max(digest)


def random_token(text: str, match: re.Match[str]) -> bool:
    """Is `match` (a run of base64 characters in `text`) a secret? See the module docstring."""
    start, end = match.span()
    if start > 0 and text[start - 1] in _TOKEN_CHARS:
        return False  # the tail of a longer run (only whole runs are judged)
    if end < len(text) and text[end] in _TOKEN_CHARS:
        return False
    value = match.group().rstrip("=")
    if _DIGEST_PREFIX.match(value) or value.startswith("_Z") or _ID_PREFIX.match(value) or _C_HEX.fullmatch(value):
        return False
    if _DIGEST_BEFORE.search(text, max(0, start - 16), start):
        return False
    segments = value.split("/")
    if len(segments) > 1 and any(_PATH_WORD.fullmatch(s) for s in segments):
        return any(_random_shape(s) for s in segments)  # a path or a URL's: judged by its parts
    if _HEX_WITH_TAG.fullmatch(value):
        return _said_secret(text, start) and len(value) >= 32  # a digest or an id, unless said to be secret
    if _random_shape(value):
        return True
    n = len(value)
    if n < MIN_SAID_LEN or not any(c.isdigit() for c in value) or value.isdigit() or _structured(value):
        return False
    if start > 0 and text[start - 1] == ".":
        return False  # an attribute or a module's member: `_sdk_client.SyncX509WorkloadIdentityAuth`
    return _class_changes(value) >= 0.3 and entropy(value) >= min(math.log2(n) - 1.3, 3.3) and _said_secret(text, start)


def _random_shape(value: str) -> bool:
    """Random-looking without anything said about it: see the module docstring."""
    n = len(value)
    return (
        n >= MIN_RANDOM_LEN
        and any(c.isupper() for c in value)
        and any(c.islower() for c in value)
        and any(c.isdigit() for c in value)
        and entropy(value) >= min(math.log2(n) - 1.0, 4.5)
        and _class_changes(value) >= 0.25
        and not _wordy(value)
    )


_PATH_WORD = re.compile(r"[a-z]{3,}(?:[\-_.][a-z0-9]+)*")  # `blob`, `resolve`, `deepseek-ai`: a path's parts
_WORD = re.compile(r"[A-Z][a-z]{2,}|[a-z]{4,}|[A-Z]{4,}")
_DIGIT_RUN = re.compile(r"[0-9]{5}")  # a date, a curve (X25519), a port: one random key in 300 has one
_SEGMENT_WORD = re.compile(r"[A-Za-z][a-z]{2,}|[A-Z]{3,}")
_SEPARATOR = re.compile(r"[/+_\-]")
_C_HEX = re.compile(r"0[xX][0-9a-fA-F]+[uUlL]{0,3}")  # a C literal: 0xcbf29ce484222325ULL


def _wordy(value: str) -> bool:
    """Made of words, as identifiers and model names are: mostly CamelCase or lower-case words
    (`AutoModelForSeq2SeqLM`, `Ed25519PrivateKeyWithSerialization`); a whole word between separators
    (`SQ4BitGemmM4Kernel_CompInt8_ScaleFp16_Impl`, `SmolLM2-135M-Instruct-Q4_1`); or short pieces between
    separators (`c4ai-command-r-08-2024-Q4_K_M`). A random base64 key has a separator every 32 characters on
    average, so all three are rare in one (bench/scrub_quality.py measures how rare)."""
    return sum(map(len, _WORD.findall(value))) * 20 >= len(value) * 13 or _structured(value)


def _structured(value: str) -> bool:
    """Pieces between separators that are words or short, or a run of five digits: see `_wordy`."""
    if _DIGIT_RUN.search(value):
        return True
    segments = _SEPARATOR.split(value)
    if len(segments) >= 3 and any(_SEGMENT_WORD.fullmatch(s) for s in segments):
        return True
    return len(segments) >= 4 and len(value) < 6 * len(segments)


# MAC addresses: aa:bb:cc:dd:ee:ff, aa-bb-cc-dd-ee-ff, aabb.ccdd.eeff.
_MAC_WORD = re.compile(r"(?i)(?:mac|hwaddr|ether|bssid|lladdr|address|addr)\W{0,3}$")
_NOT_MAC = frozenset({"000000000000", "ffffffffffff"})


def mac_address(text: str, match: re.Match[str]) -> bool:
    """A whole MAC address (not six groups of a longer hex dump or fingerprint), not all zeros or the
    broadcast address; the dotted (Cisco) form needs a hex letter or a word like "mac" before it."""
    start, end = match.span()
    value = match.group()
    sep = value[2] if value[2] in ":-" else "."
    if start > 0 and (
        text[start - 1].isalnum() or (text[start - 1] == sep and start > 1 and text[start - 2].isalnum())
    ):
        return False
    if end < len(text) and (text[end].isalnum() or (text[end] == sep and text[end + 1 : end + 2].isalnum())):
        return False
    bare = re.sub(r"[:.\-]", "", value).lower()
    if bare in _NOT_MAC:
        return False
    if sep == ".":
        return any(c in "abcdef" for c in bare) or _MAC_WORD.search(text, max(0, start - 12), start) is not None
    return True


def ipv6_with_port(text: str, match: re.Match[str]) -> bool:
    """`fd00::1:50052`: an IPv6 address (not loopback or unspecified) and a decimal port, which together
    are no address (`fe80::1ff:fe23:4567:890a:8080` is one, and presidio's recognizer takes it whole)."""
    start, end = match.span()
    after = text[end : end + 2]
    if (start > 0 and (text[start - 1].isalnum() or text[start - 1] in ":.[_")) or (
        after != "" and (after[0].isalnum() or after[0] in "]_" or (after[0] in ":." and after[1:].isalnum()))
    ):
        return False
    value = match.group()
    head, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) <= 65535 or value.count(":") < 3:
        return False
    try:
        ipaddress.IPv6Address(value)
        return False  # an address on its own
    except ValueError:
        pass
    try:
        address = ipaddress.IPv6Address(head)
    except ValueError:
        return False
    return not (address.is_loopback or address.is_unspecified) and sum(c.isdigit() for c in head) >= 1


def serial_value(value: str) -> bool:
    """A serial number: 6-32 letters and digits (dashes between) with a digit, not a word or a count."""
    bare = value.replace("-", "")
    return 6 <= len(bare) <= 32 and any(c.isdigit() for c in bare)


def imei_valid(value: str) -> bool:
    """Fifteen digits with the Luhn check digit (an IMEI), or sixteen (an IMEISV, no check digit)."""
    digits = [int(c) for c in value if c.isdigit()]
    if len(digits) == 16:
        return True
    if len(digits) != 15:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return total % 10 == 0

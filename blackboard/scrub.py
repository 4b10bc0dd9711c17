"""PII and secret scrubbing for blackboard posts: offline, idempotent, quiet on code.

Every post is scrubbed on the node where it is written, and every node that receives a post scrubs
it again and refuses it if that changes anything. So the scrubber must be:

- **Offline.** presidio-analyzer normally runs a downloaded spaCy model (`en_core_web_lg`, which it
  fetches when missing). All recognizers here are patterns and checksums, so presidio's
  `SpacyNlpEngine` gets a *blank* English pipeline instead (`spacy.blank("en")`, a tokenizer made in
  memory: nothing read, written or downloaded). presidio's e-mail recognizer checks domains with
  `tldextract`, whose default extractor downloads the public suffix list on first use and caches it
  under ~/.cache; the one here has its own `TLDExtract(cache_dir=None, suffix_list_urls=())`, which
  uses the snapshot bundled with tldextract: no network, no disk. presidio logs its warnings to the
  "presidio-analyzer" logger, which is set to ERROR unless the application set a level for it.
- **Idempotent.** `scrub(scrub(x).text).changed` is False for every `x`. No recognizer accepts a
  placeholder (`<API_KEY>`, `/home/<USER>/…`) where it stands, and `scrub` analyses its own output
  again until nothing is found, so whatever a replacement exposes (a phone number glued to the one
  before it, say) is scrubbed too: one analysis for a text with nothing to scrub, usually two for
  one with something. `changed` is "there were findings".
- **Quiet on code.** Agents post code, logs, hashes, UUIDs, versions, timestamps and model names.
  presidio's recognizers are kept where they are precise (IBAN: checksum; e-mail: public suffix)
  and filtered where they are not: a phone number written as a bare run of digits (a timestamp, an
  id) or with fewer than nine digits (a port range, a version) counts only after a word like
  "phone" or "call"; a credit card written with separators needs groups of four (Amex 4-6-5), not
  any Luhn-valid run of numbers; loopback and unspecified addresses (127.0.0.1, ::1, 0.0.0.0) reveal
  nothing and stay, all other IP addresses (private ones too) go; a dotted quad after "version", in
  "1.2.3.4.5" or in a path is a version; an IPv6 candidate needs a digit and five hex digits, so
  Rust's `E::A` and Python's `x[1::2]` stay; nothing inside a UUID or a hex hash is a number.
- **Fast.** The scrubber does not tokenize posts (nothing uses the tokens) and replaces presidio's
  context enhancer by one that does nothing (the default deep-copies every result); it runs
  presidio's e-mail and IP regexes only on the words around an "@" or a dotted/colon-separated
  number, and python-phonenumbers only on stretches shaped like a phone number, in the regions that
  could have written it, instead of over the whole post in eight regions. presidio as it comes
  takes 60-80 ms for a 4 KiB post, this about 1.5-10 ms (bench/BLACKBOARD.md).

What is scrubbed (entity → placeholder):

- EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, IP_ADDRESS (v4 and v6), IBAN_CODE: presidio's
  recognizers → `<EMAIL_ADDRESS>` etc. `git@host` (an SSH remote, not a person) is no address.
- API_KEY → `<API_KEY>`: OpenAI/Anthropic `sk-…`, GitHub `ghp_`/`gho_`/`ghu_`/`ghs_`/`ghr_`/
  `github_pat_`, GitLab `glpat-`, Hugging Face `hf_`, Slack `xox?-`/`xapp-` and webhook paths,
  Stripe `sk_live_`/`rk_live_`, Google `AIza…`, AWS key ids `AKIA…`/`ASIA…`, JWTs `eyJ….eyJ….…`,
  the token after `Bearer` / `Authorization: Basic|Token`, and labelled values: `OPENAI_API_KEY=…`,
  `aws_secret_access_key = …`, `"client_secret": "…"`, `token: …` (in a URL query the value runs to
  the next space, so `access_token=…&page=2` loses `&page=2` too).
- PASSWORD → `<PASSWORD>`: labelled passwords (`password=…`, `DB_PASSWORD: …`, `"passwd": "…"`).
  Labelled values must look like data, not code: `password=args.password`, `${DB_PASSWORD}`,
  `token = get_token()`, `private_key: Ed25519PrivateKey,` and `password: str` stay.
- PRIVATE_KEY → `<PRIVATE_KEY>`: PEM blocks `-----BEGIN … PRIVATE KEY----- … -----END …-----`
  (also with literal `\\n`s, and a truncated block: its BEGIN line and the base64 after it).
- URL_PASSWORD → `<URL_PASSWORD>`: the `user:password` in `scheme://user:password@host`; the scheme
  and host stay.
- HOME_PATH → `<USER>`: the user name in `/home/alice/…`, `/Users/bob/…`, `C:\\Users\\carol\\…`
  (`/var/home/…`, `file:///home/…`, `C:\\\\Users\\\\…` too); generic names stay (`/home/user`,
  `/Users/Shared`, `C:\\Users\\Public`).

Not scrubbed: person names, postal addresses, organisations and the like, which need a named-entity
model (hundreds of MB to download, and slow on every node); also MAC addresses and IPv6 with a
port but no brackets (`fd00::1:50052`, which is ambiguous).

`Finding` spans are offsets into the text given to `scrub`: for HOME_PATH only the user name, for
URL_PASSWORD only `user:password`, for Bearer tokens and labelled secrets only the value. presidio
and spaCy are imported when the first `Scrubber` is made, not with this module.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpArtifacts

__all__ = ["Finding", "Scrubbed", "Scrubber", "default_scrubber"]


@dataclass(frozen=True)
class Finding:
    """One thing scrubbed: what it was and where it was in the text given to `Scrubber.scrub`."""

    entity: str  # e.g. "EMAIL_ADDRESS", "API_KEY", "HOME_PATH"
    start: int  # offsets into the original text
    end: int


@dataclass(frozen=True)
class Scrubbed:
    """The result of `Scrubber.scrub`: the text with placeholders, and what they replaced."""

    text: str  # the scrubbed text
    findings: tuple[Finding, ...]  # spans in the ORIGINAL text, sorted, not overlapping

    @property
    def changed(self) -> bool:
        return bool(self.findings)


# When two findings overlap, the one whose entity comes first here wins (then the longer one); the
# other is dropped and, if what is left of it is still sensitive, found again in the next pass.
_PRIORITY = (
    "PRIVATE_KEY",
    "URL_PASSWORD",
    "API_KEY",
    "PASSWORD",
    "EMAIL_ADDRESS",
    "IBAN_CODE",
    "CREDIT_CARD",
    "IP_ADDRESS",
    "PHONE_NUMBER",
    "HOME_PATH",
)
_RANK = {entity: rank for rank, entity in enumerate(_PRIORITY)}
_PLACEHOLDER = {entity: f"<{entity}>" for entity in _PRIORITY} | {"HOME_PATH": "<USER>"}
# Analyses of one text at most. A second pass finds something only where a replacement exposed it
# (a phone number glued to the one before, say), so texts need one or two; one that still changes
# after eight is returned as it is, and other nodes refuse it.
_MAX_PASSES = 8
_LANGUAGE = "en"

# ---------------------------------------------------------------------------------------------
# Our own recognizers. A rule's finding is its regex's group "v" (or "v2", "v3") when that took
# part in the match, else the whole match. Rules are written to start with a literal, so that `re`
# can skip through a text quickly (a leading look-behind or (?i) makes a rule ~30x slower), and
# each names hints, lower-case strings of which the text must contain one for the rule to run.


def _always(value: str) -> bool:
    return True


def _has_digit_and_letter(value: str) -> bool:
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


_PLACEHOLDERISH = re.compile(
    r"(?i)^(?:[<${%*\[(@&`:=]|your|my[_-]|xxx|\.\.\.|none$|null$|nil$|true$|false$|redacted|changeme$|example)"
)
# Code, not data: identifiers without digits, attribute paths (`args.password`, `item2.first`),
# type names (`Ed25519PrivateKey`, `SecretStr`), constants (`SECRET-TOKEN`).
_CODE_REF = re.compile(
    r"[A-Za-z_]+|[A-Za-z_]\w*(?:[.:][A-Za-z_]\w*)+|[A-Z_\-]+"
    r"|[A-Z]\w*(?:Key|Token|Secret|Str|String|Bytes|Password|Credentials?|Config|Settings|Auth|Type)"
)


def _labelled_value(value: str) -> bool:
    """A value after `password=` / `api_key:` that looks like data, not code or a placeholder."""
    if len(value) < 6 or value.isdigit() or _PLACEHOLDERISH.match(value) or _CODE_REF.fullmatch(value):
        return False
    if any(c in value for c in "()[]{}<>") or value[0] in "/~.\\":
        return False
    return len(set(value)) > 2  # not "********", "xxxxxxxx"


def _anywhere(text: str, match: re.Match[str]) -> bool:
    return True


def _word_start(text: str, match: re.Match[str]) -> bool:
    """The match does not continue an identifier: `sk-…` but not `task-…`."""
    start = match.start()
    return start == 0 or not (text[start - 1].isalnum() or text[start - 1] in "_-")


def _alnum_start(text: str, match: re.Match[str]) -> bool:
    start = match.start()
    return start == 0 or not text[start - 1].isalnum()


def _not_annotation(text: str, match: re.Match[str]) -> bool:
    """Not `private_key: Ed25519PrivateKey,` (a parameter's type) but `private_key: 4f3a…`."""
    if match.group("v3") is None or ":" not in text[match.start() : match.start("v3")]:
        return True
    after = text[match.end() : match.end() + 3]
    return not (after[:1] in (",", ")", "]", "|") or after.lstrip(" ")[:1] in ("=", "|"))


_KEY_LABEL = re.compile(r"(?i)(?:api|access|secret|private|signing|encryption|master|account|client)[_\-]?$")


def _key_label(text: str, match: re.Match[str]) -> bool:
    """`api_key=`, `OPENAI_API_KEY:`, `aws_secret_access_key =`, but not `key=` or `sort_key=`."""
    start = match.start()
    return _KEY_LABEL.search(text, max(0, start - 12), start) is not None and _not_annotation(text, match)


_PATH_PREFIX = re.compile(r"(?:/var|/export)$")


def _path_start(text: str, match: re.Match[str]) -> bool:
    """`/home/…` starts a path (`/var/home/…`, `file:///home/…` too), not a URL's path
    (`example.com/home/…`) nor a directory deeper down (`/srv/home/…`, `/home/<USER>/home/…`)."""
    start = match.start()
    prefix = _PATH_PREFIX.search(text, max(0, start - 7), start)
    at = prefix.start() if prefix else start
    if at > 0 and text[at - 1] == "/":
        return text.endswith("//", 0, at)
    return at == 0 or not (text[at - 1].isalnum() or text[at - 1] in "_.~-")


def _drive_start(text: str, match: re.Match[str]) -> bool:
    """`C:\\Users\\…`: one drive letter before the colon."""
    start = match.start()
    return start >= 1 and text[start - 1].isalpha() and (start == 1 or not text[start - 2].isalnum())


@dataclass(frozen=True)
class _Rule:
    entity: str
    pattern: re.Pattern[str]
    hints: tuple[str, ...]  # lower-case; the text must contain one of them
    valid: Callable[[str], bool] = _always  # sees the value
    context: Callable[[str, re.Match[str]], bool] = _anywhere  # sees the text and the match


_VALUE = r"[\"']?[ \t]*[:=][ \t]*(?:\"(?P<v>[^\s\"]+)\"|'(?P<v2>[^\s']+)'|(?P<v3>[^\s\"',;]+))"
_TOKEN_BODY = r"[A-Za-z0-9._~+/\-]{8,}=*"
_RULES: tuple[_Rule, ...] = (
    _Rule(
        "PRIVATE_KEY",
        re.compile(
            r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----"
            r"(?:.*?-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----|(?:[A-Za-z0-9+/=:,\-\s]|\\[nr])*)",
            re.DOTALL,
        ),
        ("-----begin",),
    ),
    _Rule("URL_PASSWORD", re.compile(r"://(?P<v>[^\s/@:?#<>]*:[^\s/@?#<>]*)@(?=[\w\[])"), ("://",)),
    # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-api03-…), DeepSeek and other sk- keys.
    _Rule("API_KEY", re.compile(r"sk-[A-Za-z0-9_\-]{20,}"), ("sk-",), _has_digit_and_letter, _word_start),
    _Rule(
        "API_KEY",
        re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"),
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
        context=_word_start,
    ),
    _Rule("API_KEY", re.compile(r"github_pat_[A-Za-z0-9_]{30,}"), ("github_pat_",), context=_word_start),
    _Rule("API_KEY", re.compile(r"glpat-[A-Za-z0-9_\-]{20,}"), ("glpat-",), context=_word_start),
    _Rule("API_KEY", re.compile(r"hf_[A-Za-z0-9]{30,}"), ("hf_",), _has_digit_and_letter, _word_start),
    _Rule(
        "API_KEY",
        re.compile(r"x(?:ox[abposre]|app)-[A-Za-z0-9\-]{10,}"),
        ("xox", "xapp-"),
        _has_digit_and_letter,
        _word_start,
    ),
    _Rule("API_KEY", re.compile(r"hooks\.slack\.com/services/(?P<v>[A-Za-z0-9/_\-]{10,})"), ("hooks.slack",)),
    _Rule("API_KEY", re.compile(r"[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"), ("k_live_", "k_test_"), context=_word_start),
    _Rule("API_KEY", re.compile(r"AIza[0-9A-Za-z_\-]{35}"), ("aiza",), context=_word_start),
    _Rule(
        "API_KEY",
        re.compile(r"A(?:KIA|SIA|BIA|CCA|GPA|IDA|ROA|IPA|NPA|NVA|PKA)[A-Z0-9]{16}(?![A-Za-z0-9])"),
        ("akia", "asia", "abia", "acca", "agpa", "aida", "aroa", "aipa", "anpa", "anva", "apka"),
        context=_alnum_start,
    ),
    _Rule(
        "API_KEY",
        re.compile(r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"),
        ("eyj",),
        context=_word_start,
    ),
    _Rule(
        "API_KEY",
        re.compile(rf"(?:Bearer|bearer|BEARER)[ \t]+(?P<v>{_TOKEN_BODY})"),
        ("bearer",),
        _has_digit_and_letter,
        _alnum_start,
    ),
    _Rule(  # "uthorization": Authorization or authorization, and still a literal to scan for
        "API_KEY",
        re.compile(rf"uthorization[\"']?[ \t]*[:=][ \t]*[\"']?(?:Basic|basic|Token|token)[ \t]+(?P<v>{_TOKEN_BODY})"),
        ("authorization",),
    ),
    # Labelled secrets: OPENAI_API_KEY=…, "client_secret": "…", aws_secret_access_key = …, token: ….
    # (?=k) and the like let `re` skip to candidate characters despite (?i).
    _Rule("API_KEY", re.compile(rf"(?i)(?=k)key{_VALUE}"), ("key",), _labelled_value, _key_label),
    _Rule(
        "API_KEY",
        re.compile(rf"(?i)(?=[st])(?:secret|token){_VALUE}"),
        ("secret", "token"),
        _labelled_value,
        _not_annotation,
    ),
    _Rule(
        "PASSWORD", re.compile(rf"(?i)(?=p)pass(?:word|wd|phrase){_VALUE}"), ("pass",), _labelled_value, _not_annotation
    ),
)

_GENERIC_USERS = frozenset(
    {"user", "username", "you", "yourname", "your_name", "your-name", "your_user", "your-user", "me"}
    | {"your_username", "your-username", "yourusername", "myuser", "myusername", "myname"}
    | {"shared", "public", "default", "default user", "all users"}
)


def _real_user(value: str) -> bool:
    return value.casefold() not in _GENERIC_USERS and not value.startswith(".")


_HOME_RULES: tuple[_Rule, ...] = (
    _Rule(
        "HOME_PATH",
        re.compile(r"/(?:home|Users)/(?P<v>[^\s/\\<>\"'`$*:;|&(){}\[\],=?#]+)"),
        ("/home/", "/users/"),
        _real_user,
        _path_start,
    ),
    _Rule(
        "HOME_PATH",
        re.compile(
            r":(?:\\{1,2}|/)(?:[Uu]sers|USERS|[Dd]ocuments and [Ss]ettings)(?:\\{1,2}|/)"
            r"(?P<v>[^\\/\s<>:\"|?*]+(?:[ ][^\\/\s<>:\"|?*]+)*(?=\\|/)|[^\\/\s<>:\"|?*'`,;()]+)"
        ),
        (":\\", ":/"),
        _real_user,
        _drive_start,
    ),
)


def _rule_findings(text: str, rules: Iterable[_Rule]) -> list[tuple[str, int, int]]:
    lowered = text.lower()
    found = []
    for rule in rules:
        if not any(hint in lowered for hint in rule.hints):
            continue
        groups = [g for g in ("v", "v2", "v3") if g in rule.pattern.groupindex]
        for match in rule.pattern.finditer(text):
            group = next((g for g in groups if match.group(g) is not None), 0)
            start, end = match.span(group)
            if end > start and rule.context(text, match) and rule.valid(text[start:end]):
                found.append((rule.entity, start, end))
    return found


# ---------------------------------------------------------------------------------------------
# Filters on presidio's own results, which see the whole text.

_HEX = re.compile(r"[0-9A-Fa-f]")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_IBAN_HINT = re.compile(r"(?<![A-Z0-9])[A-Z]{2}[0-9]{2}[ \-]?[A-Z0-9]{4}")  # the start of presidio's pattern
_HEXRUN = re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{12,}(?![0-9A-Za-z])")
# Before a dotted quad that is not an address: a version ("version 1.2.3.4", "v1.2.3.4"), a section
# ("section 4.1.2.1"), an OID ("oid 2.5.4.3"), more numbers ("1.2.3.4.5"), a path ("SDK\\6.6.0.0").
_VERSION_BEFORE = re.compile(
    r"(?i)(?:version|release|build|section|objectidentifier\(|\b(?:ver|rev|sec|oid|v)|§)[\s\"'#\-]*[:=]?[\s\"']*$"
    r"|\d\.$|[\w\-]v$|(?:^|[^/])/$|(?:^|[^\\])\\$"
)
# Words that say the digits after them (at most two words later) are a phone number.
_PHONE_CONTEXT = re.compile(
    r"(?i)\b(?:(?:tele|cell|mobile )?phone|tel|call|mobile|cell|fax|sms|whatsapp|signal|contact|dial|ring)"
    r"\b(?:\W+\w+){0,2}\W*$"
)
# Where a phone number could be: up to seven groups of digits with a separator between them (one of
# " .-/", or " - "), the first two maybe in brackets (a "(" later starts the next number), maybe an
# extension. python-phonenumbers takes 0.1-0.5 ms to try one such stretch in one region, so only
# those that could be a phone number are tried (see _phone_windows), not the whole text in eight
# regions as presidio's PhoneRecognizer does (0.3-1 s for a 4 KiB post full of numbers).
_PHONE_CANDIDATE = re.compile(
    r"\+?\(?\d{1,15}(?!\d)\)?(?:(?:[ \t.\-/]|[ ][\-.][ ])\(\d{1,5}\))?(?:(?:[ \t.\-/]|[ ][\-.][ ])\d{1,8}(?!\d)){0,5}"
    r"(?:[ \t]*(?:ext\.?|x|#)[ \t]*\d{1,6})?"
)
_DATE = re.compile(r"\d{4}[\-./]\d{1,2}[\-./]\d{1,2}|\d{1,2}[\-./]\d{1,2}[\-./]\d{2,4}")
# presidio's regions, by what a number written in national format starts with: a trunk prefix 0
# (GB, DE, FR, IL, IN, BR), or not (US and CA, whose numbers "US" parses too; Indian mobiles; Brazilian
# area codes). A number written with its country code (+…) parses the same in any region.
_REGIONS_TRUNK_ZERO: tuple[str, ...] = ("GB", "DE", "FR", "IL", "IN", "BR")
_REGIONS_NO_TRUNK: tuple[str, ...] = ("US", "IN", "BR")
_REGIONS_INTERNATIONAL: tuple[str, ...] = ("US",)


def _phone_context(text: str, start: int) -> bool:
    """The words just before a bare run of digits say it is a phone number."""
    return _PHONE_CONTEXT.search(text, max(0, start - 30), start) is not None


def _dotted_number(text: str, start: int, end: int) -> bool:
    """Part of a version, an address, a time or a decimal: `1.2.3.4567890`, `12:34567890`."""
    return bool(re.search(r"[\d.][.:]$", text[max(0, start - 2) : start]) or re.match(r"[.:]\d", text[end : end + 2]))


def _separators(value: str) -> set[str]:
    """What separates the digit groups of a number, brackets and any extension ("ext. 12") aside."""
    number = re.split(r"[^\d\s().\-/]", value)[0]
    return {c for c in number if not c.isdigit()} - {"(", ")"}


def _phone_shape(value: str, separators: set[str]) -> bool:
    """Could `value` (no "+") be written as a phone number, or is it data: decimals (0.286-0.314,
    0.99794 1.0239), dotted numbers (an IPv4 address, 2.2.0.70200), a fraction or path (3000/4000)?"""
    groups = re.findall(r"\d+", re.split(r"[^\d\s().\-/]", value)[0])
    if "." in separators:
        return separators == {"."} and len(groups) >= 3 and all(2 <= len(g) <= 4 for g in groups) and len(groups) != 4
    if separators == {"/"}:
        return value.lstrip("(").startswith("0")  # 030/1234567
    return True


def _phone_windows(text: str) -> list[tuple[int, int, tuple[str, ...]]]:
    """Stretches of `text` (start, end) that could hold a phone number, and the regions to try."""
    windows: list[tuple[int, int, tuple[str, ...]]] = []
    regions: tuple[str, ...]
    for candidate in _PHONE_CANDIDATE.finditer(text):
        start, end = candidate.span()
        value = candidate.group()
        digits = sum(c.isdigit() for c in value)
        if digits < 7 or (start > 0 and text[start - 1].isalnum() and value[0].isdigit()):
            continue  # too short, or the tail of a longer word or number (0x7ffd9a10)
        if value.startswith("+"):
            regions = _REGIONS_INTERNATIONAL
        else:
            if _DATE.fullmatch(value) or _dotted_number(text, start, end):
                continue  # a date, a version
            said = _phone_context(text, start)
            if digits < 9 and not said:
                continue  # ports 8080-8090, versions 550.54.15; short numbers only after "phone" etc.
            if digits > 15 and not said:
                continue  # numbers in a row (1234 5678 9012 3456) are data, unless the text says otherwise
            separators = _separators(value)
            if not _phone_shape(value, separators):
                continue
            if start > 0 and text[start - 1] == "/":
                continue  # in a URL's or a file's path
            if not separators and not said:
                continue  # a bare run of digits: _keep_phone drops it
            regions = _REGIONS_TRUNK_ZERO if value.lstrip("(").startswith("0") else _REGIONS_NO_TRUNK
        windows.append((max(0, start - 2), min(len(text), end + 2), regions))
    return windows


_EMAIL_ANCHOR = re.compile("@")
_IP_ANCHOR = re.compile(r"\d\.\d{1,3}\.\d|::|[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")


_WINDOW_GAP = 80  # windows closer than this are joined: scanning 80 characters costs what a call does


def _windows(text: str, anchor: re.Pattern[str]) -> list[tuple[int, int]]:
    """The stretches between ASCII whitespace around each match of `anchor`, merged. A pattern that
    cannot match whitespace finds the same things in these as in the whole text, faster."""
    windows: list[tuple[int, int]] = []
    for m in anchor.finditer(text):
        if windows and m.start() < windows[-1][1]:
            continue
        lo = max(text.rfind(c, 0, m.start()) for c in " \t\n\r") + 1
        ends = [i for i in (text.find(c, m.end()) for c in " \t\n\r") if i >= 0]
        hi = min(ends) if ends else len(text)
        if windows and lo <= windows[-1][1] + _WINDOW_GAP:
            windows[-1] = (windows[-1][0], hi)
        else:
            windows.append((lo, hi))
    return windows


def _hexy_spans(text: str) -> list[tuple[int, int]]:
    """UUIDs and long hex runs (hashes): no phone number, card or IP lies inside one."""
    return [m.span() for m in _UUID.finditer(text)] + [
        m.span() for m in _HEXRUN.finditer(text) if any(c.isalpha() for c in m.group())
    ]


def _keep_ip(text: str, start: int, end: int) -> bool:
    value = text[start:end]
    try:
        address = ipaddress.ip_interface(value).ip
    except ValueError:
        return False
    if address.is_loopback or address.is_unspecified:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None and (address.ipv4_mapped.is_loopback or address.ipv4_mapped.is_unspecified):
            return False
        bare = value.split("/")[0].split("%")[0]
        return any(c.isdigit() for c in bare) and len(_HEX.findall(bare)) >= 5
    # "version 1.2.3.4", "v1.2.3.4" and any part of "1.2.3.4.5" are versions, not addresses.
    if _VERSION_BEFORE.search(text, max(0, start - 20), start):
        return False
    return not re.match(r"\.\d", text[end : end + 2])


def _keep_phone(text: str, start: int, end: int) -> bool:
    value = text[start:end]
    if value.startswith("+"):
        return True
    if _DATE.fullmatch(value) or _dotted_number(text, start, end) or (start > 0 and text[start - 1] == "/"):
        return False
    separators = _separators(value)
    if not separators or sum(c.isdigit() for c in value) < 9:
        # a bare run of digits is a timestamp, an id or a count, and a short one a port range or a
        # version, unless the words before say it is a phone number
        return _phone_context(text, start) and (not separators or _phone_shape(value, separators))
    return _phone_shape(value, separators)


def _keep_card(text: str, start: int, end: int) -> bool:
    """presidio takes any 13-19 digits with optional separators that pass Luhn (one in ten numbers
    do); written with separators, a card number has groups of 4 (Amex: 4-6-5)."""
    groups = [len(g) for g in re.split(r"[ \-]", text[start:end])]
    return len(groups) == 1 or groups[:-1] == [4] * (len(groups) - 1) or groups == [4, 6, 5]


def _keep_email(text: str, start: int, end: int) -> bool:
    return not text[start:end].lower().startswith("git@")


_FILTERS: dict[str, Callable[[str, int, int], bool]] = {
    "IP_ADDRESS": _keep_ip,
    "PHONE_NUMBER": _keep_phone,
    "EMAIL_ADDRESS": _keep_email,
    "CREDIT_CARD": _keep_card,
}
_NOT_IN_HEX = frozenset(["IP_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE"])


# ---------------------------------------------------------------------------------------------
# presidio


def _build_analyzer() -> tuple[AnalyzerEngine, NlpArtifacts]:
    """presidio's AnalyzerEngine over a blank spaCy pipeline with this module's recognizers (no
    I/O), and the NLP artifacts to analyse every text with: those of an empty text.

    Artifacts (tokens, lemmas) only feed presidio's context-word score boosts, which a blank pipeline
    cannot drive (it has no lemmas) and which are not needed here (every validated match counts,
    whatever its score); tokenizing a 4 KiB post would take most of the scrubbing time."""
    import phonenumbers
    import spacy
    import tldextract
    from presidio_analyzer import AnalyzerEngine, EntityRecognizer, RecognizerRegistry, RecognizerResult
    from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer
    from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
    )

    presidio_logger = logging.getLogger("presidio-analyzer")
    if presidio_logger.level == logging.NOTSET:
        presidio_logger.setLevel(logging.ERROR)

    blank = spacy.blank(_LANGUAGE)  # a tokenizer and nothing else, made in memory

    class BlankSpacyNlpEngine(SpacyNlpEngine):
        """presidio's spaCy engine with the blank pipeline instead of a model to load or download."""

        def __init__(self) -> None:
            super().__init__(models=[{"lang_code": _LANGUAGE, "model_name": "blank"}])

        def load(self) -> None:
            self.nlp = {_LANGUAGE: blank}  # type: ignore[assignment]  # presidio declares it None

    class NoContextEnhancer(ContextAwareEnhancer):
        """Leaves scores alone. (The default one deep-copies every result to boost scores from the
        words around it; with no tokens there are no words, and scores do not matter here.)"""

        def __init__(self) -> None:
            super().__init__(0.0, 0.0, 0, 0)

        def enhance_using_context(
            self,
            text: str,
            raw_results: list[RecognizerResult],
            nlp_artifacts: NlpArtifacts,
            recognizers: list[EntityRecognizer],
            context: list[str] | None = None,
        ) -> list[RecognizerResult]:
            return raw_results

    def in_windows(
        analyze: Callable[[str], list[RecognizerResult]], text: str, anchor: re.Pattern[str]
    ) -> list[RecognizerResult]:
        """presidio's regexes are slow to scan a whole post; run them only around their anchors."""
        results = []
        for lo, hi in _windows(text, anchor):
            for result in analyze(text[lo:hi]):
                result.start += lo
                result.end += lo
                results.append(result)
        return results

    # tldextract's bundled public suffix list snapshot: no suffix-list URLs, no cache directory.
    offline_tld = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return offline_tld(pattern_text).fqdn != ""

        def analyze(
            self,
            text: str,
            entities: list[str],
            nlp_artifacts: NlpArtifacts | None = None,
            regex_flags: int | None = None,
        ) -> list[RecognizerResult]:
            return in_windows(lambda t: super(OfflineEmailRecognizer, self).analyze(t, entities), text, _EMAIL_ANCHOR)

    class WindowedIpRecognizer(IpRecognizer):
        def analyze(
            self,
            text: str,
            entities: list[str],
            nlp_artifacts: NlpArtifacts | None = None,
            regex_flags: int | None = None,
        ) -> list[RecognizerResult]:
            return in_windows(lambda t: super(WindowedIpRecognizer, self).analyze(t, entities), text, _IP_ANCHOR)

    class HintedIbanRecognizer(IbanRecognizer):
        """Skips texts with nothing IBAN-shaped: presidio's IBAN pattern is slow to even start."""

        def analyze(
            self,
            text: str,
            entities: list[str],
            nlp_artifacts: NlpArtifacts | None = None,
            regex_flags: int | None = None,
        ) -> list[RecognizerResult]:
            return super().analyze(text, entities) if _IBAN_HINT.search(text) else []

    class WindowedPhoneRecognizer(PhoneRecognizer):
        """presidio's phone recognizer (python-phonenumbers, leniency VALID) run where a number could
        be (`_phone_windows`), in the regions where it could be, until one finds it."""

        def analyze(
            self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
        ) -> list[RecognizerResult]:
            results = []
            for lo, hi, regions in _phone_windows(text):
                for region in regions:
                    matches = list(phonenumbers.PhoneNumberMatcher(text[lo:hi], region, leniency=1))
                    for match in matches:
                        results.append(RecognizerResult("PHONE_NUMBER", lo + match.start, lo + match.end, self.SCORE))
                    if matches:
                        break
            return results

    class RuleRecognizer(EntityRecognizer):
        """This module's own rules (API keys, private keys, URL passwords, home paths)."""

        def __init__(self, name: str, rules: tuple[_Rule, ...]) -> None:
            self.rules = rules
            super().__init__(supported_entities=sorted({r.entity for r in rules}), name=name)

        def load(self) -> None:
            pass

        def analyze(
            self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
        ) -> list[RecognizerResult]:
            return [
                RecognizerResult(entity, start, end, 1.0)
                for entity, start, end in _rule_findings(text, self.rules)
                if entity in entities
            ]

    registry = RecognizerRegistry(supported_languages=[_LANGUAGE])
    for recognizer in (
        OfflineEmailRecognizer(),
        WindowedPhoneRecognizer(),
        CreditCardRecognizer(),
        HintedIbanRecognizer(),
        WindowedIpRecognizer(),
        RuleRecognizer("SecretsRecognizer", _RULES),
        RuleRecognizer("HomePathRecognizer", _HOME_RULES),
    ):
        registry.add_recognizer(recognizer)
    # Each region's metadata and patterns load on first use (5-20 ms; for +1, all 25 NANP regions):
    # load them now, and use them on example numbers.
    for region in sorted({*_REGIONS_TRUNK_ZERO, *_REGIONS_NO_TRUNK, *_REGIONS_INTERNATIONAL}):
        for sharing in phonenumbers.region_codes_for_country_code(phonenumbers.country_code_for_region(region)):
            phonenumbers.PhoneMetadata.metadata_for_region(sharing)
        for kind in (phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is not None:
                national = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
                list(phonenumbers.PhoneNumberMatcher(national, region, leniency=1))
    nlp_engine = BlankSpacyNlpEngine()
    analyzer = AnalyzerEngine(
        registry=registry,
        nlp_engine=nlp_engine,
        supported_languages=[_LANGUAGE],
        context_aware_enhancer=NoContextEnhancer(),
    )
    no_tokens = NlpArtifacts(
        entities=[], tokens=blank.make_doc(""), tokens_indices=[], lemmas=[], nlp_engine=nlp_engine, language=_LANGUAGE
    )
    return analyzer, no_tokens


# A text that wakes every recognizer (phone metadata, the suffix list, regex caches) at construction.
_WARM_UP = (
    "mail a.b@example.com, call +1 415 555 2671 or (020) 7946 0958, card 4111 1111 1111 1111, "
    "IBAN DE89 3704 0044 0532 0130 00, hosts 10.1.2.3 and 2001:db8::7, Bearer abc123def456ghi, "
    "https://u:p4ss@example.com, /home/alice/x, C:\\Users\\bob\\y, password=hunter22"
)


class Scrubber:
    """Finds and replaces PII and secrets in blackboard posts; see the module docstring."""

    def __init__(self) -> None:
        self._analyzer, self._no_tokens = _build_analyzer()
        self._lock = threading.Lock()
        self.scrub(_WARM_UP)

    def _detect(self, text: str) -> list[tuple[str, int, int]]:
        """Non-overlapping (entity, start, end) in `text`, sorted by start."""
        results = self._analyzer.analyze(text=text, language=_LANGUAGE, nlp_artifacts=self._no_tokens)
        if not results:
            return []
        hexy: list[tuple[int, int]] | None = None
        candidates = []
        for r in results:
            entity, start, end = r.entity_type, r.start, r.end
            if entity not in _RANK or end <= start:
                continue
            keep = _FILTERS.get(entity)
            if keep is not None and not keep(text, start, end):
                continue
            if entity in _NOT_IN_HEX:
                hexy = _hexy_spans(text) if hexy is None else hexy
                if any(s <= start and end <= e for s, e in hexy):
                    continue
            candidates.append((entity, start, end))
        candidates.sort(key=lambda c: (_RANK[c[0]], c[1] - c[2], c[1]))
        chosen: list[tuple[str, int, int]] = []
        taken = bytearray(len(text))
        for entity, start, end in candidates:
            if not any(taken[start:end]):
                chosen.append((entity, start, end))
                taken[start:end] = b"\x01" * (end - start)
        chosen.sort(key=lambda c: c[1])
        return chosen

    def scrub(self, text: str) -> Scrubbed:
        with self._lock:
            hits = self._detect(text)
            if not hits:
                return Scrubbed(text, ())
            # Where each character of the current text came from: [starts[i], ends[i]) in `text`.
            starts = list(range(len(text)))
            ends = list(range(1, len(text) + 1))
            current = text
            findings: list[Finding] = []
            for _ in range(_MAX_PASSES):
                if not hits:
                    break
                parts: list[str] = []
                new_starts: list[int] = []
                new_ends: list[int] = []
                at = 0
                for entity, start, end in hits:
                    origin = (starts[start], ends[end - 1])
                    findings.append(Finding(entity, *origin))
                    placeholder = _PLACEHOLDER[entity]
                    parts += (current[at:start], placeholder)
                    new_starts += starts[at:start] + [origin[0]] * len(placeholder)
                    new_ends += ends[at:start] + [origin[1]] * len(placeholder)
                    at = end
                parts.append(current[at:])
                new_starts += starts[at:]
                new_ends += ends[at:]
                current, starts, ends = "".join(parts), new_starts, new_ends
                hits = self._detect(current)
            return Scrubbed(current, _merge(findings))


def _merge(findings: list[Finding]) -> tuple[Finding, ...]:
    """Sorted, with overlapping findings (from different passes) joined under the larger one's entity."""
    merged: list[Finding] = []
    for f in sorted(findings, key=lambda f: (f.start, -f.end)):
        if merged and f.start < merged[-1].end:
            last = merged[-1]
            entity = last.entity if last.end - last.start >= f.end - f.start else f.entity
            merged[-1] = Finding(entity, last.start, max(last.end, f.end))
        else:
            merged.append(f)
    return tuple(merged)


_default: Scrubber | None = None
_default_lock = threading.Lock()


def default_scrubber() -> Scrubber:
    """The process-wide Scrubber, made on first use (a second or two)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Scrubber()
    return _default

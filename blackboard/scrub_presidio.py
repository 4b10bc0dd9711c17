"""The blackboard scrubber's presidio engine: presidio's analyzer set up offline and fast, and filters on its results.

`build_analyzer` makes presidio's AnalyzerEngine over a blank spaCy pipeline (no model to download) with
presidio's e-mail, phone, credit-card, IBAN and IP recognizers (run only in windows where they could match, the
e-mail one with tldextract's bundled suffix list) and `blackboard.scrub_rules`' own rules; `FILTERS` drop its
imprecise findings (timestamps as phone numbers, versions as IP addresses, numbers inside hex hashes). Why each
choice is made is in `blackboard.scrub`'s docstring. presidio and spaCy are imported by `build_analyzer`, not with
this module.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from .scrub_ner import NameFinder, load_pipeline
from .scrub_rules import HOME_RULES, SECRET_RULES, Rule, rule_findings

if TYPE_CHECKING:
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpArtifacts

__all__ = ["FILTERS", "LANGUAGE", "NOT_IN_HEX", "build_analyzer", "hexy_spans"]

LANGUAGE = "en"

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


def hexy_spans(text: str) -> list[tuple[int, int]]:
    """UUIDs and long hex runs (hashes): no phone number, card or IP lies inside one."""
    return [m.span() for m in _UUID.finditer(text)] + [
        m.span() for m in _HEXRUN.finditer(text) if any(c.isalpha() for c in m.group())
    ]


def _loopback_with_port(value: str) -> bool:
    """`::1:8080`, `:::8080`: a valid IPv6 address, but written as loopback or unspecified and a port."""
    head, _, port = value.rpartition(":")
    if not port.isdigit() or head.count(":") < 2:
        return False
    try:
        address = ipaddress.IPv6Address(head)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _keep_ip(text: str, start: int, end: int) -> bool:
    value = text[start:end]
    try:
        address = ipaddress.ip_interface(value).ip
    except ValueError:
        # `fd00::1:50052` (scrub_rules' unbracketed IPv6 with a port): judged by its address
        head, _, port = value.rpartition(":")
        if not (port.isdigit() and head.count(":") >= 2):
            return False
        try:
            address = ipaddress.IPv6Address(head)
        except ValueError:
            return False
        value = head
    if address.is_loopback or address.is_unspecified or _loopback_with_port(value):
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


FILTERS: dict[str, Callable[[str, int, int], bool]] = {
    "IP_ADDRESS": _keep_ip,
    "PHONE_NUMBER": _keep_phone,
    "EMAIL_ADDRESS": _keep_email,
    "CREDIT_CARD": _keep_card,
}
NOT_IN_HEX = frozenset(["IP_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE"])


# presidio


def build_analyzer() -> tuple[AnalyzerEngine, NlpArtifacts]:
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

    names = NameFinder(*load_pipeline())  # NerUnavailable when the pinned model is missing or altered
    names.find("ping Maria Garcia before merging")  # spaCy's first call allocates (≈ 50 ms)

    blank = spacy.blank(LANGUAGE)  # a tokenizer and nothing else, made in memory

    class BlankSpacyNlpEngine(SpacyNlpEngine):
        """presidio's spaCy engine with the blank pipeline instead of a model to load or download."""

        def __init__(self) -> None:
            super().__init__(models=[{"lang_code": LANGUAGE, "model_name": "blank"}])

        def load(self) -> None:
            self.nlp = {LANGUAGE: blank}  # type: ignore[assignment]  # presidio declares it None

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
        """`scrub_rules`' own rules (API keys, private keys, URL passwords, home paths)."""

        def __init__(self, name: str, rules: tuple[Rule, ...]) -> None:
            self.rules = rules
            super().__init__(supported_entities=sorted({r.entity for r in rules}), name=name)

        def load(self) -> None:
            pass

        def analyze(
            self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
        ) -> list[RecognizerResult]:
            return [
                RecognizerResult(entity, start, end, 1.0)
                for entity, start, end in rule_findings(text, self.rules)
                if entity in entities
            ]

    class NameRecognizer(EntityRecognizer):
        """People's names: spaCy's NER on the chunks worth it, filtered (`blackboard.scrub_ner`)."""

        def __init__(self) -> None:
            self.finder = names
            super().__init__(supported_entities=["PERSON"], name="NameRecognizer")

        def load(self) -> None:
            pass

        def analyze(
            self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
        ) -> list[RecognizerResult]:
            if "PERSON" not in entities:
                return []
            return [RecognizerResult("PERSON", start, end, 1.0) for start, end in names.find(text)]

    registry = RecognizerRegistry(supported_languages=[LANGUAGE])
    for recognizer in (
        OfflineEmailRecognizer(),
        WindowedPhoneRecognizer(),
        CreditCardRecognizer(),
        HintedIbanRecognizer(),
        WindowedIpRecognizer(),
        RuleRecognizer("SecretsRecognizer", SECRET_RULES),
        RuleRecognizer("HomePathRecognizer", HOME_RULES),
        NameRecognizer(),
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
        supported_languages=[LANGUAGE],
        context_aware_enhancer=NoContextEnhancer(),
    )
    no_tokens = NlpArtifacts(
        entities=[], tokens=blank.make_doc(""), tokens_indices=[], lemmas=[], nlp_engine=nlp_engine, language=LANGUAGE
    )
    return analyzer, no_tokens

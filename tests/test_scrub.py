"""blackboard/scrub.py: what is scrubbed and what is not, precision and recall on a labelled set,
idempotence (on that set and on random text), offline construction, the public surface."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blackboard import scrub as scrub_module
from blackboard.scrub import Finding, Scrubbed, Scrubber, default_scrubber

ROOT = Path(__file__).resolve().parent.parent
LABELLED = Path(__file__).resolve().parent / "data" / "pii_labelled.jsonl"


@pytest.fixture(scope="module")
def scrubber() -> Scrubber:
    """One Scrubber for the whole session (the process-wide one): making one takes a second or two."""
    return default_scrubber()


def found(s: Scrubber, text: str) -> list[tuple[str, str]]:
    return [(f.entity, text[f.start : f.end]) for f in s.scrub(text).findings]


# --- the public surface


def test_finding_and_scrubbed_are_frozen_values() -> None:
    f = Finding("EMAIL_ADDRESS", 3, 9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.start = 0  # type: ignore[misc]
    assert Scrubbed("x", ()).changed is False
    assert Scrubbed("<EMAIL_ADDRESS>", (f,)).changed is True
    assert Finding("API_KEY", 1, 2) == Finding("API_KEY", 1, 2)


def test_default_scrubber_is_one_instance(scrubber: Scrubber) -> None:
    assert default_scrubber() is scrubber


def test_default_scrubber_is_made_once_under_concurrent_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[object] = []

    class SlowScrubber:
        def __init__(self) -> None:
            time.sleep(0.05)
            made.append(self)

    monkeypatch.setattr(scrub_module, "_default", None)
    monkeypatch.setattr(scrub_module, "Scrubber", SlowScrubber)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(default_scrubber())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and all(g is made[0] for g in got)


def test_presidio_logger_is_quiet(scrubber: Scrubber) -> None:
    assert logging.getLogger("presidio-analyzer").getEffectiveLevel() >= logging.ERROR


# --- one test per category


@pytest.mark.parametrize(
    ("text", "expected", "entity", "value"),
    [
        ("mail alice@example.com now", "mail <EMAIL_ADDRESS> now", "EMAIL_ADDRESS", "alice@example.com"),
        ("call +1 (415) 555-2671.", "call <PHONE_NUMBER>.", "PHONE_NUMBER", "+1 (415) 555-2671"),
        ("tel (020) 7946 0958", "tel <PHONE_NUMBER>", "PHONE_NUMBER", "(020) 7946 0958"),
        ("card 4111 1111 1111 1111 ok", "card <CREDIT_CARD> ok", "CREDIT_CARD", "4111 1111 1111 1111"),
        ("host 10.0.0.5:8080 up", "host <IP_ADDRESS>:8080 up", "IP_ADDRESS", "10.0.0.5"),
        ("peer [2001:db8::7]:7000", "peer [<IP_ADDRESS>]:7000", "IP_ADDRESS", "2001:db8::7"),
        ("IBAN DE89 3704 0044 0532 0130 00.", "IBAN <IBAN_CODE>.", "IBAN_CODE", "DE89 3704 0044 0532 0130 00"),
        ("key AKIAIOSFODNN7EXAMPLE", "key <API_KEY>", "API_KEY", "AKIAIOSFODNN7EXAMPLE"),
        (
            "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "aws_secret_access_key=<API_KEY>",
            "API_KEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
        ("Bearer abc123def456ghi789", "Bearer <API_KEY>", "API_KEY", "abc123def456ghi789"),
        ("password: hunter22", "password: <PASSWORD>", "PASSWORD", "hunter22"),
        ("https://bob:hunter2@example.com/x", "https://<URL_PASSWORD>@example.com/x", "URL_PASSWORD", "bob:hunter2"),
        ("cd /home/alice/src", "cd /home/<USER>/src", "HOME_PATH", "alice"),
        ("open /Users/bob", "open /Users/<USER>", "HOME_PATH", "bob"),
        (r"C:\Users\carol\x.txt", r"C:\Users\<USER>\x.txt", "HOME_PATH", "carol"),
    ],
)
def test_each_category_is_scrubbed(scrubber: Scrubber, text: str, expected: str, entity: str, value: str) -> None:
    result = scrubber.scrub(text)
    assert result.text == expected
    assert found(scrubber, text) == [(entity, value)]


def _token(prefix: str, n: int, alphabet: str = "abcdefghijkLMNOPQRST0123456789") -> str:
    """A token made at run time, so that no secret-shaped string sits in the repository."""
    return prefix + "".join(alphabet[(i * 7 + 3) % len(alphabet)] for i in range(n))


@pytest.mark.parametrize(
    "token",
    [
        _token("sk-", 48),
        _token("sk-proj-", 64, "abcdefXYZ0123456789_-"),
        _token("sk-ant-api03-", 90, "abcdefXYZ0123456789_-"),
        _token("ghp_", 36),
        _token("gho_", 36),
        _token("ghs_", 36),
        _token("github_pat_", 82, "abcdefXYZ0123456789_"),
        _token("glpat-", 20),
        _token("hf_", 34),
        _token("xoxb-", 40, "0123456789-abcdefXYZ"),
        _token("xoxp-", 40, "0123456789-abcdefXYZ"),
        _token("sk_live_", 24),
        _token("AIza", 35),
        _token("ASIA", 16, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"),
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiJ9.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    ],
)
def test_api_keys_and_tokens(scrubber: Scrubber, token: str) -> None:
    text = f"STATUS: I used {token} for the test run"
    assert scrubber.scrub(text).text == "STATUS: I used <API_KEY> for the test run"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("OPENAI_API_KEY=Zk29xQ7mP2vL8nR4tW6y", "Zk29xQ7mP2vL8nR4tW6y"),
        ('{"client_secret": "9f3a7c1e5b2d4f60"}', "9f3a7c1e5b2d4f60"),
        ("Authorization: Basic YWxpY2U6aHVudGVyMg==", "YWxpY2U6aHVudGVyMg=="),
        ("GITHUB_TOKEN: a1b2c3d4e5f6a7b8", "a1b2c3d4e5f6a7b8"),
        ("https://api.example.com/v1?access_token=z9y8x7w6v5u4&page=2", "z9y8x7w6v5u4&page=2"),
    ],
)
def test_labelled_secrets(scrubber: Scrubber, text: str, value: str) -> None:
    assert found(scrubber, text) == [("API_KEY", value)]


def test_private_key_blocks(scrubber: Scrubber) -> None:
    body = "MIIEowIBAAKCAQEA" + _token("", 60, "abcXYZ0123+/") + "\n" + _token("", 64, "abcXYZ0123+/")
    block = f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"
    assert scrubber.scrub(f"key:\n{block}\nthanks").text == "key:\n<PRIVATE_KEY>\nthanks"
    escaped = block.replace("\n", "\\n").replace("RSA ", "")
    assert scrubber.scrub(f'{{"key": "{escaped}"}}').text == '{"key": "<PRIVATE_KEY>"}'
    truncated = "-----BEGIN OPENSSH PRIVATE KEY-----\n" + body
    assert scrubber.scrub(f"paste: {truncated}").text == "paste: <PRIVATE_KEY>"


def test_url_credentials_keep_scheme_and_host(scrubber: Scrubber) -> None:
    text = "DATABASE_URL=postgres://app:s3cr3t@db.internal:5432/mesh and redis://:pw1234@cache:6379/0"
    assert scrubber.scrub(text).text == (
        "DATABASE_URL=postgres://<URL_PASSWORD>@db.internal:5432/mesh and redis://<URL_PASSWORD>@cache:6379/0"
    )


def test_home_paths(scrubber: Scrubber) -> None:
    text = r'/var/home/eve/x file:///home/frank/r.html PATH=/usr/bin:/home/gina/bin "C:\\Users\\dave\\m.gguf"'
    assert scrubber.scrub(text).text == (
        r'/var/home/<USER>/x file:///home/<USER>/r.html PATH=/usr/bin:/home/<USER>/bin "C:\\Users\\<USER>\\m.gguf"'
    )
    assert found(scrubber, r"C:\Users\Heidi Klum\Desktop") == [("HOME_PATH", "Heidi Klum")]


def test_loopback_and_unspecified_addresses_are_kept(scrubber: Scrubber) -> None:
    text = "listening on 127.0.0.1:9337, [::1]:9337 and 0.0.0.0:8080; :: is any"
    assert scrubber.scrub(text) == Scrubbed(text, ())


def test_overlapping_findings_resolve_to_one_placeholder(scrubber: Scrubber) -> None:
    # The e-mail recognizer also sees "hunter2@example.com"; the URL credential wins, the host stays.
    assert scrubber.scrub("https://bob:hunter2@example.com").text == "https://<URL_PASSWORD>@example.com"
    token = _token("ghp_", 36)
    text = f"GITHUB_TOKEN={token}"
    assert scrubber.scrub(text) == Scrubbed("GITHUB_TOKEN=<API_KEY>", (Finding("API_KEY", 13, len(text)),))


# --- what must come back unchanged


NEGATIVE = [
    "",
    "STATUS: serving Qwen2.5-Coder-1.5B-Q4_K_M at 41.2 tok/s",
    "commit 9fceb02d0ae598e95dc970b74767f19372d61af8, uuid 550e8400-e29b-41d4-a716-446655440000",
    "version 1.2.3.4, v1.2.3.4, 1.2.3.4.5, python 3.11.7",
    "2024-01-15T12:30:45.123Z, unix 1700000000, pid 4242, port 9337",
    "use std::io; match e { E::A => 1 }; xs[1::2]",
    "password = getpass.getpass(); api_key: str | None = None; token = get_token()",
    "git clone git@github.com:org/repo.git",
    "/home/user/project, /Users/Shared/x, /usr/lib/libcuda.so.1, https://example.com/home/alice",
    "Grüße, naïve café — 日本語のテキスト 🙂",
]


@pytest.mark.parametrize("text", NEGATIVE)
def test_nothing_sensitive_comes_back_unchanged(scrubber: Scrubber, text: str) -> None:
    assert scrubber.scrub(text) == Scrubbed(text, ())


PLACEHOLDER_TEXTS = [
    "<EMAIL_ADDRESS> <PHONE_NUMBER> <CREDIT_CARD> <IP_ADDRESS> <IBAN_CODE> <API_KEY> <PRIVATE_KEY>",
    "<URL_PASSWORD> <PASSWORD> <USER>",
    "https://<URL_PASSWORD>@example.com /home/<USER>/x /Users/<USER> C:\\Users\\<USER>\\x",
    "password=<PASSWORD> token: <API_KEY> Bearer <API_KEY> aws_secret_access_key = <API_KEY>",
    "[<IP_ADDRESS>]:80 <IP_ADDRESS>:<PHONE_NUMBER> <EMAIL_ADDRESS>@<EMAIL_ADDRESS>.com",
]


@pytest.mark.parametrize("text", PLACEHOLDER_TEXTS)
def test_placeholders_are_never_found_again(scrubber: Scrubber, text: str) -> None:
    assert scrubber.scrub(text) == Scrubbed(text, ())


# --- the labelled set


def load_labelled() -> list[tuple[str, list[tuple[str, str]]]]:
    """(text, [(entity, value), …]) per line of tests/data/pii_labelled.jsonl."""
    rows = []
    with LABELLED.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.append((row["text"], [(e["entity"], e["value"]) for e in row["entities"]]))
    return rows


def occurrences(text: str, value: str) -> list[tuple[int, int]]:
    spans, at = [], text.find(value)
    while at >= 0:
        spans.append((at, at + len(value)))
        at = text.find(value, at + 1)
    return spans


def test_labelled_set_is_big_and_well_formed() -> None:
    rows = load_labelled()
    assert len(rows) >= 150
    assert sum(1 for _, entities in rows if not entities) >= 60  # many negatives
    for text, entities in rows:
        for entity, value in entities:
            assert entity in scrub_module._PLACEHOLDER and value in text, (entity, value, text)


def test_precision_and_recall_on_the_labelled_set(scrubber: Scrubber) -> None:
    """A labelled value counts as found when one finding covers it (any occurrence of it); a finding
    counts as true when it overlaps a labelled value."""
    labelled = found_labels = findings = true_findings = 0
    misses, false_positives, leaks = [], [], []
    per_entity: dict[str, list[int]] = {}
    for text, entities in load_labelled():
        result = scrubber.scrub(text)
        spans = []
        for entity, value in entities:
            occ = occurrences(text, value)
            spans += occ
            hit = any(f.start <= a and b <= f.end for f in result.findings for a, b in occ)
            labelled += 1
            found_labels += int(hit)
            per_entity.setdefault(entity, [0, 0])[0] += int(hit)
            per_entity[entity][1] += 1
            if not hit:
                misses.append((entity, value, text))
            if entity != "HOME_PATH" and value in result.text:  # user names may recur in other words
                leaks.append((entity, value, result.text))
        for f in result.findings:
            findings += 1
            if any(a < f.end and f.start < b for a, b in spans):
                true_findings += 1
            else:
                false_positives.append((f.entity, text[f.start : f.end], text))
    recall, precision = found_labels / labelled, true_findings / findings
    print(f"\nlabelled set: recall {recall:.3f} ({found_labels}/{labelled})", end=", ")
    print(f"precision {precision:.3f} ({true_findings}/{findings})")
    for entity, (hits, total) in sorted(per_entity.items()):
        print(f"  {entity:14} {hits}/{total}")
    for miss in misses:
        print("  missed:", miss)
    for fp in false_positives:
        print("  false positive:", fp)
    assert recall >= 0.95, misses
    assert precision >= 0.9, false_positives
    assert not leaks


def test_labelled_set_is_scrubbed_idempotently(scrubber: Scrubber) -> None:
    for text, _ in load_labelled():
        once = scrubber.scrub(text)
        assert not scrubber.scrub(once.text).changed, (text, once.text)


def test_findings_are_sorted_disjoint_spans_of_the_original(scrubber: Scrubber) -> None:
    for text, _ in load_labelled():
        result = scrubber.scrub(text)
        at = 0
        rest = result.text
        for f in result.findings:
            assert at <= f.start < f.end <= len(text)
            gap = text[at : f.start]
            assert rest.startswith(gap), (text, result)
            rest = rest[len(gap) :]
            placeholder = scrub_module._PLACEHOLDER[f.entity]
            assert rest.startswith(placeholder), (text, result)
            rest = rest[len(placeholder) :]
            at = f.end
        assert rest == text[at:]


# --- idempotence on random text

SAMPLES = [
    "alice@example.com",
    "+1 (415) 555-2671",
    "(020) 7946 0958",
    "4111 1111 1111 1111",
    "10.0.0.5",
    "fe80::1",
    "2001:db8::8a2e:370:7334",
    "DE89 3704 0044 0532 0130 00",
    _token("sk-", 40),
    _token("ghp_", 36),
    "AKIAIOSFODNN7EXAMPLE",
    "Bearer abc123def456",
    "password=hunter22",
    "token: a1b2c3d4e5f6",
    "https://bob:pw@host.example.com",
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADAN\n-----END PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----",
    "/home/alice/",
    "/Users/bob",
    "C:\\Users\\carol\\",
    "127.0.0.1",
    "git@github.com",
    "1.2.3.4",
    "550e8400-e29b-41d4-a716-446655440000",
    "9fceb02d0ae598e95dc970b74767f19372d61af8",
    *(scrub_module._PLACEHOLDER.values()),
]
FRAGMENT = st.one_of(
    st.sampled_from(SAMPLES),
    st.text(alphabet="0123456789abcdefABCDEF:./@-_+()[]<>=\\ \n\"'#%:xX", max_size=24),
    st.text(max_size=8),
)


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FRAGMENT, max_size=8).map("".join))
def test_scrubbing_is_idempotent_on_random_text(scrubber: Scrubber, text: str) -> None:
    once = scrubber.scrub(text)
    twice = scrubber.scrub(once.text)
    assert not twice.changed, (text, once, twice)
    assert twice.text == once.text
    if not once.changed:
        assert once.text == text
    ends = [0]
    for f in once.findings:
        assert ends[-1] <= f.start < f.end <= len(text)
        ends.append(f.end)


def test_concurrent_use_gives_the_same_results(scrubber: Scrubber) -> None:
    texts = [text for text, _ in load_labelled()]
    expected = [scrubber.scrub(t) for t in texts]
    results: dict[int, list[Scrubbed]] = {}

    def work(n: int) -> None:
        results[n] = [scrubber.scrub(t) for t in texts]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results.values())


# --- offline

OFFLINE = """
import os, sys, warnings
warnings.simplefilter("error")

def guard(event, args):
    if event.startswith("socket.") or event == "urllib.Request":
        raise RuntimeError(f"network access: {event} {args!r}")

sys.addaudithook(guard)
from blackboard.scrub import Scrubber
s = Scrubber()
print(s.scrub("mail a.b@example.co.uk, git@github.com, x@localhost from 10.1.2.3").text)
written = [os.path.join(d, f) for d, _, fs in os.walk(os.environ["HOME"]) for f in fs]
print("written:", written)
import tldextract  # the control: tldextract's default extractor does reach for the network
try:
    tldextract.extract("example.com")
except RuntimeError as e:
    print("control:", e)
"""


def test_construction_and_scrubbing_are_offline_and_write_nothing(tmp_path: Path) -> None:
    """A fresh process with an empty home (no tldextract cache, no spaCy model) and every socket
    refused: the scrubber is built and finds e-mail addresses (which needs the public suffix list)."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", OFFLINE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "mail <EMAIL_ADDRESS>, git@github.com, x@localhost from <IP_ADDRESS>"
    assert lines[1] == "written: []"
    assert lines[2].startswith("control: network access: socket."), r.stdout
    assert r.stderr == ""

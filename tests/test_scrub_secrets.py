"""Secrets without a label, MAC addresses, IPv6 with a port and device ids (blackboard/scrub_secrets.py and its
rules in blackboard/scrub_rules.py): each caught by the real scrubber, the look-alikes in code and logs kept,
idempotence, and the labelled set tests/data/scrub_quality.jsonl (recall and precision per category)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blackboard.scrub import Scrubber, default_scrubber
from blackboard.scrub_rules import UNLABELLED_RULES, rule_findings
from blackboard.scrub_secrets import entropy, imei_valid

QUALITY = Path(__file__).resolve().parent / "data" / "scrub_quality.jsonl"


@pytest.fixture(scope="module")
def scrubber() -> Scrubber:
    return default_scrubber()


def found(s: Scrubber, text: str) -> list[tuple[str, str]]:
    return [(f.entity, text[f.start : f.end]) for f in s.scrub(text).findings]


def rules(text: str) -> list[tuple[str, str]]:
    return [(e, text[a:b]) for e, a, b in rule_findings(text, UNLABELLED_RULES)]


# --- caught


@pytest.mark.parametrize(
    ("text", "expected", "entity", "value"),
    [
        (
            "AKIAIOSFODNN7EXAMPLE with secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "<API_KEY> with secret <SECRET>",
            "SECRET",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
        (
            "run: mesh-llm join --invite 9mdtQq4zUK8ossX6WyVIOul5J9WvGGcJvzwDq6g7 --model Qwen2.5-Coder-7B-Q4_K_M",
            "run: mesh-llm join --invite <SECRET> --model Qwen2.5-Coder-7B-Q4_K_M",
            "SECRET",
            "9mdtQq4zUK8ossX6WyVIOul5J9WvGGcJvzwDq6g7",
        ),
        (
            "export FOO=Zk3q9XbT2mLwP8rYv4NcJ7sHd1GfQ6uA",
            "export FOO=<SECRET>",
            "SECRET",
            "Zk3q9XbT2mLwP8rYv4NcJ7sHd1GfQ6uA",
        ),
        (
            "the webhook signing secret is 4f0c9b3e2a1d8c7b6a5f4e3d2c1b0a9f8e7d6c5b",
            "the webhook signing secret is <SECRET>",
            "SECRET",
            "4f0c9b3e2a1d8c7b6a5f4e3d2c1b0a9f8e7d6c5b",
        ),
        (
            "curl -u api:3f9a0c1d2e4b5a6978c0d1e2f3a4b5c6 https://api.example.com",
            "curl -u api:<SECRET> https://api.example.com",
            "SECRET",
            "3f9a0c1d2e4b5a6978c0d1e2f3a4b5c6",
        ),
        (
            "link/ether 52:54:00:12:34:56 brd ff:ff:ff:ff:ff:ff",
            "link/ether <MAC_ADDRESS> brd ff:ff:ff:ff:ff:ff",
            "MAC_ADDRESS",
            "52:54:00:12:34:56",
        ),
        ("Physical Address: 00-1A-2B-3C-4D-5E", "Physical Address: <MAC_ADDRESS>", "MAC_ADDRESS", "00-1A-2B-3C-4D-5E"),
        ("Vlan10  001a.2b3c.4d5e  DYNAMIC", "Vlan10  <MAC_ADDRESS>  DYNAMIC", "MAC_ADDRESS", "001a.2b3c.4d5e"),
        ("peer fd00::1:50052 joined", "peer <IP_ADDRESS> joined", "IP_ADDRESS", "fd00::1:50052"),
        (
            "dial tcp 2001:db8::efbd:1438:50052: connection refused",
            "dial tcp <IP_ADDRESS>: connection refused",
            "IP_ADDRESS",
            "2001:db8::efbd:1438:50052",
        ),
        (
            "GPU 0: NVIDIA H100 (UUID: GPU-5f3c2a1b-9d8e-4f7a-b6c5-d4e3f2a1b0c9)",
            "GPU 0: NVIDIA H100 (UUID: GPU-<DEVICE_ID>)",
            "DEVICE_ID",
            "5f3c2a1b-9d8e-4f7a-b6c5-d4e3f2a1b0c9",
        ),
        ("Serial Number: PHLJ123400AB1P0FGN", "Serial Number: <DEVICE_ID>", "DEVICE_ID", "PHLJ123400AB1P0FGN"),
        ("modem reports IMEI: 490154203237518", "modem reports IMEI: <DEVICE_ID>", "DEVICE_ID", "490154203237518"),
    ],
)
def test_each_new_category_is_scrubbed(scrubber: Scrubber, text: str, expected: str, entity: str, value: str) -> None:
    result = scrubber.scrub(text)
    assert result.text == expected
    assert (entity, value) in found(scrubber, text)


def test_the_ambiguous_ipv6_with_a_port_is_one_address_scrubbed_whole(scrubber: Scrubber) -> None:
    # fe80::1ff:fe23:4567:890a:8080 is a valid address on its own: whichever it is, nothing of it stays
    assert scrubber.scrub("peer fe80::1ff:fe23:4567:890a:8080 up").text == "peer <IP_ADDRESS> up"
    assert scrubber.scrub("peer [fe80::1ff:fe23:4567:890a]:8080 up").text == "peer [<IP_ADDRESS>]:8080 up"


# --- kept


@pytest.mark.parametrize(
    "text",
    [
        "commit 9fceb02d0ae598e95dc970b74767f19372d61af8",
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  model.gguf",
        "ETag: 5d41402abc4b2a76b9719d911017c592, cf-ray: 8f1c2d3e4a5b6c7d-FRA",
        "request_id=550e8400-e29b-41d4-a716-446655440000 status=200",
        '"integrity": "sha512-RbJ5/jmFcNNCcDV5o9eTnBLJ/HszWV0P73bc+Ff4nS/rJj+YaS6IGyiOL0VoBYXx8cGgE=="',
        "golang.org/x/net v0.25.0 h1:d/OCCoBEUq33pjydKrGQhw7IlUPI2Oylr+8qLx49kac=",
        "id: chatcmpl-9xYzAbC123dEf456GhI789jKl msg_01XFDUDYJgAACzvnptvVoYEL toolu_01A09q90qw90lq917835lq9",
        "pulled bartowski/Qwen2.5-Coder-7B-Instruct-GGUF and SmolLM2-135M-Instruct-Q4_1.gguf",
        "c4ai-command-r-08-2024-Q4_K_M and nomic-embed-text-v1_5-Q8_0 and DeepSeek-R1-Distill-Qwen-14B-IQ4_XS",
        "class Ed25519PrivateKeyWithSerialization(X25519PublicKey): AutoModelForSeq2SeqLM",
        "private_key = ed25519.Ed25519PrivateKey.generate(); ToolBash20250124Param",
        "ggml_gemm_q4_K_8x8_q8_K SQ4BitGemmM4Kernel_CompInt8_ScaleFp16_Impl GGML_F32Cx16_REPEAT_LOAD",
        "_Z21mul_mat_vec_q4_K_q8_1ILi32EEvPKvS1_Pfiiii and 0xcbf29ce484222325ULL",
        "std::unordered_map<std::string, int>::iterator at 12:34:56, a::b::c, E::A, x[1::2]",
        "let m: std::collections::HashMap<String, u8> = core::iter::empty().collect();",
        "00000000: 7f45 4c46 0201 0100 0000 0000 0000 0000  .ELF............",
        "00000010: 03 00 3e 00 01 00 00 00 30 6b 00 00 00 00 00 00",
        "Modulus:\n    00:c3:4f:1a:9b:2e:77:10:5c:d8:aa:01:3e:9f:62:\n    7b:11:0c:d4:e2",
        "hexdump: de:ad:be:ef:ca:fe:ba:be:00:11:22:33",
        "lo: link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00",
        "listening on ::1:8080, [::1]:8080, 0.0.0.0:8080",
        "Serial port /dev/ttyS0; serialize(x); serial: true; serial_number: str",
        "/nix/store/2b6dvqs6lf6j0z1mc2x1qw6sl8h7r6ls-python3-3.11.7/bin/python3",
        "ULID 01HZY3K8J9Q2W5E7R4T6Y8U0IP trace_id=4bf92f3577b34da6a3ce929d0e0e4736",
        (
            '<img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChw'
            'GA60e6kgAAAABJRU5ErkJggg==">'
        ),
    ],
)
def test_look_alikes_in_code_and_logs_are_kept(scrubber: Scrubber, text: str) -> None:
    result = scrubber.scrub(text)
    assert not result.changed, found(scrubber, text)
    assert result.text == text


# --- the rules alone (pure)


def test_rules_judge_whole_runs_only() -> None:
    key = "Zk3q9XbT2mLwP8rYv4NcJ7sHd1GfQ6uA"
    assert rules(f"x {key} y") == [("SECRET", key)]
    assert rules(f"x {key}.y") == [("SECRET", key)]  # a dot ends a run
    assert rules(f"x a{key}") == [("SECRET", "a" + key)]  # judged whole, and still random


def test_a_word_like_secret_counts_only_on_its_own_line_and_not_in_a_placeholder() -> None:
    digest = "4f0c9b3e2a1d8c7b6a5f4e3d2c1b0a9f"
    assert rules(f"secret: see below\n{digest}") == []
    assert rules(f"<SECRET> {digest}") == []
    assert rules(f"the secret is {digest}") == [("SECRET", digest)]
    assert rules(f"the secret's sha256 is {digest}") == []  # the nearer word says digest


def test_random_keys_are_caught_at_the_rate_the_docstring_says() -> None:
    """Bare random keys of 32-40 characters in base62 and base64: at least 95 % caught (the docstring says
    2-4 % stay, as identifiers). A fixed seed: the same keys every run."""
    rng = random.Random(17)
    for alphabet in (string.ascii_letters + string.digits, string.ascii_letters + string.digits + "+/"):
        for length in (32, 40):
            keys = ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(500)]
            caught = sum(rules(f"use {k} now") == [("SECRET", k)] for k in keys)
            assert caught >= 0.95 * len(keys), (length, caught)


def test_entropy_and_imei_checks() -> None:
    assert entropy("") == 0.0
    assert entropy("aaaa") == 0.0
    assert entropy("abcd") == 2.0
    assert imei_valid("490154203237518")
    assert not imei_valid("490154203237519")
    assert imei_valid("3534900612345678")  # IMEISV: sixteen digits, no check digit


# --- idempotence with the new categories

SAMPLES = [
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "Zk3q9XbT2mLwP8rYv4NcJ7sHd1GfQ6uA",
    "secret ",
    "4f0c9b3e2a1d8c7b6a5f4e3d2c1b0a9f",
    "52:54:00:12:34:56",
    "001a.2b3c.4d5e",
    "fd00::1:50052",
    "::1:8080",
    "GPU-5f3c2a1b-9d8e-4f7a-b6c5-d4e3f2a1b0c9",
    "serial: ",
    "PHLJ123400AB1P0FGN",
    "IMEI 490154203237518",
    "<SECRET>",
    "<MAC_ADDRESS>",
    "<DEVICE_ID>",
    "<IP_ADDRESS>",
]
FRAGMENT = st.one_of(
    st.sampled_from(SAMPLES),
    st.text(alphabet=string.ascii_letters + string.digits + "+/=_-:. \n", max_size=24),
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FRAGMENT, max_size=8).map("".join))
def test_scrubbing_with_the_new_categories_is_idempotent(scrubber: Scrubber, text: str) -> None:
    once = scrubber.scrub(text)
    twice = scrubber.scrub(once.text)
    assert not twice.changed, (text, once, twice)


# --- the labelled set


def load_quality() -> list[tuple[str, list[tuple[str, str]], str]]:
    rows = []
    for line in QUALITY.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        rows.append((r["text"], [(e["entity"], e["value"]) for e in r["entities"]], r["source"]))
    return rows


def test_quality_set_is_modest_and_well_formed() -> None:
    rows = load_quality()
    assert QUALITY.stat().st_size <= 300 * 1024
    negatives = [t for t, e, _ in rows if not e]
    assert sum(len(t.encode()) for t in negatives) >= 100 * 1024  # from real source trees and logs
    for category in ("SECRET", "MAC_ADDRESS", "IP_ADDRESS", "DEVICE_ID", "PERSON"):
        assert sum(1 for _, e, _ in rows for k, _ in e if k == category) >= 10, category
    for text, entities, _ in rows:
        for _, value in entities:
            assert value in text


def test_quality_set_recall_and_precision_for_this_scrubber(scrubber: Scrubber) -> None:
    """Every labelled MAC, IPv6 address and device id is caught, and nine secrets in ten written bare (a random
    key looks like an identifier now and then: the docstring says how often); PERSON is the NER's, tested
    with it. The negatives from source trees and logs get no finding of the new kinds."""
    new = {"SECRET", "MAC_ADDRESS", "DEVICE_ID"}
    misses: list[tuple[str, str]] = []
    false: list[tuple[str, str, str]] = []
    secrets = 0
    for text, entities, source in load_quality():
        result = scrubber.scrub(text)
        for entity, value in entities:
            secrets += entity == "SECRET"
            if entity != "PERSON" and value in result.text:
                misses.append((entity, value))
        if not entities:
            false += [(f.entity, text[f.start : f.end], source) for f in result.findings if f.entity in new]
    assert [m for m in misses if m[0] != "SECRET"] == []
    assert len(misses) <= 0.1 * secrets, misses
    assert not false

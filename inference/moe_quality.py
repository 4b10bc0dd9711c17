"""The quality gate of an expert shard: how close its next-token distributions are to the full model's.

Reference (`capture_reference`, once per model, cached and sent to shard nodes): held-out prompts (not from the
calibration text) tokenized by the full model's llama-server, its greedy continuation of each (`n_tokens`, fixed
length), and at every position its top-K next tokens with log-probabilities (pre-sampling: the model's own
softmax, from llama-server's `/completion` with `n_probs`).

Score (`score`, against a llama-server of the shard), teacher-forced: at position i the shard sees the prompt plus
the full model's first i tokens (token ids, `cache_prompt`, so each step evaluates one new token) and generates one
token with its top-K. Then
- **agreement**: the fraction of positions where the shard's greedy token is the full model's;
- **kl**: the mean over positions of KL(full ‖ shard) in nats, over the buckets "each token in either top-K list"
  plus one "other" bucket for the rest of the vocabulary (`kl_topk`). A token missing from one side's list gets an
  equal share of that side's unlisted mass, at most that side's K-th probability, leaving some mass for "other";
  probabilities are clamped at 1e-10. The estimate is exact when both lists hold all the mass that matters, and is
  0 for identical lists. Both sides' log-probabilities are rounded alike (3 decimals), so identical logits give 0.

Each step generates exactly one token so that every position gets its own list: llama-server drops the
probabilities of a token that ends inside a UTF-8 character (it merges it with the next); such a position still
counts for agreement (`return_tokens` names the token) but not for KL.

Gate (`DEFAULT_GATE`), measured on the generated models of tests/ggufgen.py (3 layers, 16 experts, top-2, 4 "hot"
experts per layer that win every routing; 8 prompts × 16 tokens, K = 10; the table is in docs/notes/llama.cpp.md):

    shard (experts per layer)                qwen3moe agreement / KL     olmoe agreement / KL
    all 16                                   1.000 / 0                   1.000 / 0
    2 shards of 10 from measured counts      1.000 / 2e-8                0.930 / 0.006
    the 4 hot ones                           1.000 / 1e-8                0.891 / 0.015
    2 shards of 8 (no room for a core)       0.02-0.11 / 0.89-0.94       0.05-0.09 / 0.76
    3 of 6, 4 of 4 from counts               0.00-0.26 / 0.64-1.17       0.02-0.18 / 0.73-1.45
    4 or 8 cold ones                         0.00-0.01 / 1.05-1.38       0.05-0.06 / 0.85-1.20

Three groups: exact shards (every expert a token routes to, renormalised: agreement 1, KL ≈ 0), shards of the
non-renormalising olmoe holding those experts (the kept weights inflate: 0.89-0.93, KL 0.006-0.015), and shards
missing experts that tokens use (≤ 0.26, KL ≥ 0.64 — what the anchor served as "garbage"). The default, agreement
≥ 0.8 and KL ≤ 0.1 nats, sits in the gap: it passes the first two groups with room for the noise of 128 positions
(one position is 0.8 points of agreement) and refuses the third by a wide margin; 0.1 nats is about the geometric
middle of 0.015 and 0.64. Exact shards score 1 / 0 on any model; where a real model's merely degraded shards fall
(non-renormalising gating, rarely used experts dropped) is still to be measured (the issue's benchmark table).

One responsibility, the shard quality gate (reference, teacher-forced score, gate); ~400 lines, a third of them
this measured account.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2

from mesh_mcp.errors import BackendError, ProtocolError

from .llama_server import LlamaServer, ServerSettings
from .llamacpp import LlamaCpp
from .supervise import tail

FORMAT = 1
FLOOR = 1e-10  # probabilities are clamped here (log of 0)
DECIMALS = 3  # log-probabilities are rounded to this many decimals, on both sides
MAX_PROMPTS, MAX_PROMPT_TOKENS, MAX_TOKENS, MAX_TOP = 64, 4096, 256, 64
_KEY = re.compile(r"^[0-9a-f]{16,128}$")

TopK = tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first

HELD_OUT_PROMPTS: tuple[str, ...] = (
    "The three most important things to check before a long car journey are",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
    "The capital of Australia is",
    "To convert 25 degrees Celsius to Fahrenheit, multiply",
    "Q: What causes the seasons on Earth?\nA:",
    "import json\n\nwith open('config.json') as f:\n",
    "My favourite way to spend a rainy Sunday afternoon is",
)


@dataclass(frozen=True)
class Gate:
    min_agreement: float  # top-1 agreement, teacher-forced
    max_kl: float  # mean KL(full ‖ shard) per position, nats


DEFAULT_GATE = Gate(min_agreement=0.8, max_kl=0.1)  # measured: see the module docstring


@dataclass(frozen=True)
class Quality:
    agreement: float  # top-1 agreement, teacher-forced
    kl: float  # mean KL(full ‖ shard) per position, nats
    positions: int

    def passes(self, gate: Gate) -> bool:
        return self.positions > 0 and self.agreement >= gate.min_agreement and self.kl <= gate.max_kl

    def describe(self) -> str:
        return f"top-1 agreement {self.agreement:.1%}, KL {self.kl:.4f} nats over {self.positions} positions"


# --- the reference ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    model_key: str
    prompts: tuple[tuple[int, ...], ...]  # prompt token ids
    tokens: tuple[tuple[int, ...], ...]  # the full model's greedy continuation of each
    top: tuple[tuple[TopK, ...], ...]  # [prompt][position] -> the full model's top-K; () where llama-server gave none

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "model_key": self.model_key,
                "prompts": [list(p) for p in self.prompts],
                "tokens": [list(t) for t in self.tokens],
                "top": [[[[i, lp] for i, lp in pos] for pos in prompt] for prompt in self.top],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Reference:
        """Parse and validate; `ProtocolError` on anything else (it arrives from other nodes and from disk)."""
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"a quality reference is not JSON: {exc}") from exc
        fields = {"format", "model_key", "prompts", "tokens", "top"}
        if not isinstance(obj, dict) or set(obj) != fields:
            raise ProtocolError(f"a quality reference is a JSON object with exactly the fields {sorted(fields)}")
        if obj["format"] != FORMAT:
            raise ProtocolError(f"a quality reference of format {obj['format']!r}; this version reads {FORMAT}")
        key = obj["model_key"]
        if not isinstance(key, str) or not _KEY.match(key):
            raise ProtocolError("a quality reference's model_key must be a lowercase hex sha256")
        prompts = _lists(obj["prompts"], "prompts", MAX_PROMPTS)
        tokens = _lists(obj["tokens"], "tokens", MAX_PROMPTS)
        top = _lists(obj["top"], "top", MAX_PROMPTS)
        if not prompts or not len(prompts) == len(tokens) == len(top):
            raise ProtocolError("a quality reference needs as many prompts, continuations and top lists, at least one")
        ps = tuple(_ids(p, "prompt", MAX_PROMPT_TOKENS, min_len=1) for p in prompts)
        ts = tuple(_ids(t, "continuation", MAX_TOKENS, min_len=1) for t in tokens)
        tops: list[tuple[TopK, ...]] = []
        for i, per in enumerate(top):
            positions = _lists(per, "top", MAX_TOKENS)
            if len(positions) != len(ts[i]):
                raise ProtocolError(f"a quality reference's prompt {i} has {len(ts[i])} tokens, {len(positions)} lists")
            tops.append(tuple(_top(pos) for pos in positions))
        return cls(key, ps, ts, tuple(tops))


def _lists(v: object, what: str, limit: int) -> list[Any]:
    if not isinstance(v, list) or len(v) > limit:
        raise ProtocolError(f"a quality reference's {what} must be a list of at most {limit}")
    return v


def _token_id(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31


def _ids(v: object, what: str, limit: int, min_len: int = 0) -> tuple[int, ...]:
    if not isinstance(v, list) or not min_len <= len(v) <= limit or not all(_token_id(t) for t in v):
        raise ProtocolError(f"a quality reference's {what} must list {min_len}..{limit} token ids")
    return tuple(v)


def _top(v: object) -> TopK:
    pairs = _lists(v, "top-K entry", MAX_TOP)
    out = []
    for pair in pairs:
        ok = isinstance(pair, list) and len(pair) == 2 and _token_id(pair[0])
        lp = pair[1] if ok else None
        if not ok or not isinstance(lp, int | float) or isinstance(lp, bool) or not -1e4 <= lp <= 1e-3:
            raise ProtocolError("a quality reference's top-K entries are [token id, log-probability ≤ 0]")
        out.append((int(pair[0]), float(lp)))
    if len({i for i, _ in out}) != len(out):
        raise ProtocolError("a quality reference's top-K list names a token twice")
    return tuple(out)


# --- pure scoring -----------------------------------------------------------------------------------------------


def _distribution(top: TopK, buckets: Sequence[int]) -> list[float]:
    """Probabilities of `buckets` (token ids) and a last "other" bucket, from one side's top-K list."""
    listed = {i: math.exp(min(lp, 0.0)) for i, lp in top}
    rest = max(0.0, 1.0 - sum(listed.values()))
    missing = [b for b in buckets if b not in listed]
    share = min(min(listed.values(), default=rest), rest / (len(missing) + 1)) if missing else 0.0
    probs = [listed.get(b, share) for b in buckets]
    probs.append(max(0.0, rest - share * len(missing)))
    return [max(p, FLOOR) for p in probs]


def kl_topk(p: TopK, q: TopK) -> float:
    """KL(p ‖ q) in nats from two top-K lists of (token id, log-probability), with the unlisted mass lumped into
    one bucket (see the module docstring). Identical lists give 0; it is never negative."""
    buckets = sorted({i for i, _ in p} | {i for i, _ in q})
    ps, qs = _distribution(p, buckets), _distribution(q, buckets)
    tp, tq = sum(ps), sum(qs)
    kl = sum(a / tp * math.log((a / tp) / (b / tq)) for a, b in zip(ps, qs, strict=True))
    return max(0.0, kl)


def agreement(expected: Sequence[int], got: Sequence[int]) -> float:
    """The fraction of positions where `got` names the same token as `expected`."""
    if len(expected) != len(got):
        raise ValueError(f"{len(expected)} reference tokens, {len(got)} answers")
    return sum(a == b for a, b in zip(expected, got, strict=True)) / len(expected) if expected else 0.0


@dataclass(frozen=True)
class Step:
    """One teacher-forced answer: the token the server chose and its top-K (() when the server gave none)."""

    token: int
    top: TopK


def summarize(ref: Reference, answers: Sequence[Sequence[Step]]) -> Quality:
    """Quality of a shard's teacher-forced `answers[prompt][position]` against the reference (pure)."""
    if len(answers) != len(ref.tokens) or any(len(a) != len(t) for a, t in zip(answers, ref.tokens, strict=True)):
        raise ValueError("the answers do not have the reference's shape")
    expected = [t for tokens in ref.tokens for t in tokens]
    got = [s.token for steps in answers for s in steps]
    kls = [
        kl_topk(full, step.top)
        for tops, steps in zip(ref.top, answers, strict=True)
        for full, step in zip(tops, steps, strict=True)
        if full and step.top
    ]
    return Quality(
        agreement=agreement(expected, got),
        kl=sum(kls) / len(kls) if kls else (0.0 if expected == got else math.inf),
        positions=len(expected),
    )


# --- talking to llama-server ------------------------------------------------------------------------------------


def _round(lp: float) -> float:
    return round(float(lp), DECIMALS) + 0.0  # + 0.0: no "-0.0"


async def _post(client: httpx2.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        resp = await client.post(url, json=body)
    except httpx2.HTTPError as exc:
        raise BackendError(f"llama-server at {url} did not answer: {exc}") from exc
    if resp.status_code != 200:
        raise BackendError(f"llama-server at {url} answered {resp.status_code}: {resp.text[:300]}")
    try:
        obj = resp.json()
    except ValueError as exc:
        raise BackendError(f"llama-server at {url} answered with something that is not JSON") from exc
    if not isinstance(obj, dict):
        raise BackendError(f"llama-server at {url} answered with something that is not a JSON object")
    return obj


async def step(client: httpx2.AsyncClient, base_url: str, ids: Sequence[int], top_k: int) -> Step:
    """One greedy token after `ids`, with the top-K of the model's own distribution at that position."""
    body = {
        "prompt": list(ids),
        "n_predict": 1,
        "temperature": 0,
        "n_probs": top_k,
        "post_sampling_probs": False,
        "ignore_eos": True,
        "return_tokens": True,
        "cache_prompt": True,
    }
    obj = await _post(client, base_url + "/completion", body)
    try:
        (token,) = obj["tokens"]
        probs = obj.get("completion_probabilities") or []
        top = tuple((int(t["id"]), _round(t["logprob"])) for t in (probs[0]["top_logprobs"] if probs else []))
        return Step(int(token), top)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BackendError(f"llama-server at {base_url}: unexpected /completion answer ({exc!r})") from exc


async def capture_reference(
    base_url: str,
    model_key: str,
    prompts: Sequence[str] = HELD_OUT_PROMPTS,
    *,
    n_tokens: int = 16,
    top_k: int = 10,
) -> Reference:
    """The full model's reference, from a llama-server of it at `base_url`."""
    out_prompts, out_tokens, out_top = [], [], []
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=600.0)) as client:
        for text in prompts:
            obj = await _post(client, base_url + "/tokenize", {"content": text, "add_special": True})
            ids = obj.get("tokens")
            if not isinstance(ids, list) or not ids or not all(_token_id(t) for t in ids):
                raise BackendError(f"llama-server at {base_url}: /tokenize gave no tokens for {text[:40]!r}")
            tokens: list[int] = []
            tops: list[TopK] = []
            for _ in range(n_tokens):
                s = await step(client, base_url, [*ids, *tokens], top_k)
                tokens.append(s.token)
                tops.append(s.top)
            out_prompts.append(tuple(ids))
            out_tokens.append(tuple(tokens))
            out_top.append(tuple(tops))
    return Reference(model_key, tuple(out_prompts), tuple(out_tokens), tuple(out_top))


async def score(base_url: str, ref: Reference) -> Quality:
    """Teacher-forced quality of the model served at `base_url` (a shard) against the full model's reference."""
    top_k = max((len(t) for tops in ref.top for t in tops), default=10) or 10
    answers: list[list[Step]] = []
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=600.0)) as client:
        for prompt, tokens in zip(ref.prompts, ref.tokens, strict=True):
            answers.append([await step(client, base_url, [*prompt, *tokens[:i]], top_k) for i in range(len(tokens))])
    return summarize(ref, answers)


# --- one-shot servers -------------------------------------------------------------------------------------------


def _settings(threads: int | None, ctx: int) -> ServerSettings:
    return ServerSettings(
        ctx_per_slot=ctx,
        slots=1,
        max_start_failures=1,
        extra_args=("--threads", str(threads)) if threads else (),
    )


async def _with_server(llama: LlamaCpp, model: Path, log_path: Path, threads: int | None, ctx: int, work: Any) -> Any:
    """Start llama-server on `model`, run `work(base_url)`, stop it (also when cancelled or failing). Errors are
    raised outside the task group, so callers see them unwrapped."""
    server = LlamaServer(llama, model, model.name.removesuffix(".gguf"), log_path, _settings(threads, ctx))
    outcome: list[Any] = []
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        url = server.base_url
        try:
            if url is not None:
                outcome.append(await work(url))
        except Exception as exc:  # re-raised below, outside the task group
            outcome.append(exc)
        finally:
            tg.cancel_scope.cancel()
    if not outcome:
        raise BackendError(f"llama-server could not load {model.name}; log {log_path}:\n{tail(log_path, 12)}")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def reference_path(cache_dir: Path, model_key: str) -> Path:
    return cache_dir / f"{model_key}.reference.json"


async def reference_for(
    llama: LlamaCpp,
    model: Path,
    *,
    cache_dir: Path,
    model_key: str,
    threads: int | None = None,
    prompts: Sequence[str] = HELD_OUT_PROMPTS,
    ctx: int = 512,
) -> Reference:
    """The full model's reference, cached at `<cache_dir>/<model_key>.reference.json`; computed by starting a
    llama-server on the whole model (CPU, memory-mapped: it runs even where the model does not fit in RAM)."""
    path = reference_path(cache_dir, model_key)
    try:
        ref = Reference.from_json(await anyio.Path(path).read_bytes())
        if ref.model_key == model_key and len(ref.prompts) == len(prompts):
            return ref
    except (OSError, ProtocolError):
        pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    log_path = cache_dir / f"{model_key}.reference.log"
    ref = await _with_server(
        llama, model, log_path, threads, ctx, lambda url: capture_reference(url, model_key, prompts)
    )
    from .moe_stats import write_atomic

    await anyio.to_thread.run_sync(write_atomic, path, ref.to_json())
    return ref


async def score_model(
    llama: LlamaCpp,
    shard_path: Path,
    ref: Reference,
    *,
    threads: int | None = None,
    log_path: Path | None = None,
    ctx: int = 512,
) -> Quality:
    """Start llama-server on a shard file, score it against `ref`, stop it."""
    log = log_path or shard_path.with_name(shard_path.name + ".score.log")
    result: Quality = await _with_server(llama, shard_path, log, threads, ctx, lambda url: score(url, ref))
    return result

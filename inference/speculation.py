"""Speculative decoding for one served model: which kinds it may use, the llama-server flags of each, and the draft's
vocabulary checked against the target's before launch.

A `Speculation` is one candidate: a draft model (`draft-simple`: the small model proposes, the target verifies a
batch of proposals in one pass) or n-gram lookup (`ngram-simple`: proposals copied from earlier in the context,
no model, strong for edits that repeat their input). `choose` turns the operator's flags and the catalog into the
candidates: `--no-draft` none; `--draft PATH|NAME` that model (fetched when it is a catalog name not on disk);
`--draft ngram` the n-gram kind alone; no flag the catalog's draft of the model when it is on disk
(`mesh-llm download M --draft`), and bare `--draft` fetches it. Where there is a draft, the n-gram kind is a
second candidate; a model with no draft speculates only when asked (`--draft ngram`), so it pays no calibration.
Whether a candidate is *used* is measured, not assumed (mesh_mcp/serving/spec_control.py).

The draft always runs on the host that runs llama-server, never over RPC (`-devd none` keeps it off the RPC
devices a split lists, `-ngld` puts it on the host's own GPU when there is one). A draft whose tokenizer differs
from the target's (`vocab_mismatch`, the checks llama.cpp's `common_speculative_are_compatible` makes, from both
GGUF headers) is refused with why, before llama-server would refuse it at load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anyio

from mesh_mcp.errors import DraftRefused

from .catalog import by_name
from .gguf_facts import Vocab, read_vocab
from .models import ProgressFn, catalog_paths, ensure_model, is_downloaded

log = logging.getLogger("mesh_llm.speculation")

DRAFT, NGRAM = "draft", "ngram"
NGRAM_WORDS = ("ngram", "n-gram", "lookup")
VOCAB_MAX_SIZE_DIFFERENCE = 128  # llama.cpp's SPEC_VOCAB_MAX_SIZE_DIFFERENCE
VOCAB_CHECK_START = 5  # llama.cpp's SPEC_VOCAB_CHECK_START_TOKEN_ID
DEFAULT_N_MAX = 4  # measured here: 4 beats 8 on CPU (issue 21: 12.8 vs 11.7 tok/s); llama.cpp's default is 3
# A draft stops proposing below this confidence. Measured (3-stage split, +50 ms RTT, Qwen2.5-Coder 1.5B ← 0.5B,
# stock RPC): 0.75 takes prose from 0.65x to 0.89x of no draft, code from 1.36x to 1.29x (llama.cpp's default: 0)
DEFAULT_P_MIN = 0.75


@dataclass(frozen=True)
class DraftFlags:
    """The operator's speculation flags: `draft` is None (the catalog's, when on disk), "" (bare `--draft`: the
    catalog's, fetched), a path, catalog name or "ngram"; `off` is `--no-draft`."""

    draft: str | None = None
    off: bool = False
    n_max: int = DEFAULT_N_MAX
    n_min: int = 0


@dataclass(frozen=True)
class Speculation:
    """One way to speculate: its kind, the draft model (kind `draft`), and how many tokens a round proposes."""

    kind: str
    draft: Path | None = None
    draft_name: str | None = None
    n_max: int = DEFAULT_N_MAX
    n_min: int = 0
    p_min: float = DEFAULT_P_MIN

    @property
    def label(self) -> str:
        return f"draft {self.draft_name}" if self.kind == DRAFT else "n-gram lookup"

    def args(self, gpu_layers: int = 0) -> tuple[str, ...]:
        """llama-server's flags for this candidate. `gpu_layers`: the draft's layers on the host's own GPU (0 on a
        CPU host); the draft is never offloaded to RPC devices."""
        if self.kind == NGRAM:
            return ("--spec-type", "ngram-simple", "--spec-draft-n-max", str(max(self.n_max, 1)))
        assert self.draft is not None
        return (
            "--spec-type", "draft-simple",
            "--spec-draft-model", str(self.draft),
            "--spec-draft-n-max", str(self.n_max),
            "--spec-draft-n-min", str(self.n_min),
            "--spec-draft-p-min", f"{self.p_min:g}",
            "--spec-draft-ngl", str(gpu_layers),
            *(() if gpu_layers else ("--spec-draft-device", "none")),
        )  # fmt: skip


def vocab_mismatch(target: Vocab, draft: Vocab) -> str | None:
    """Why `draft` cannot draft for `target` (None when it can): llama.cpp's own checks, from the headers."""
    if target.model != draft.model:
        return f"tokenizer type {draft.model!r} is not the target's {target.model!r}"
    for what, t, d in (("BOS", target.bos, draft.bos), ("EOS", target.eos, draft.eos)):
        if t is not None and d is not None and t != d:
            return f"{what} token {d} is not the target's {t}"
    for what, t_add, d_add in (("BOS", target.add_bos, draft.add_bos), ("EOS", target.add_eos, draft.add_eos)):
        if t_add is not None and d_add is not None and t_add != d_add:
            return f"it {'adds' if d_add else 'does not add'} a {what} token and the target does not do the same"
    n_t, n_d = len(target.tokens), len(draft.tokens)
    if abs(n_t - n_d) > VOCAB_MAX_SIZE_DIFFERENCE:
        return f"its vocabulary has {n_d} tokens, the target's {n_t} (at most {VOCAB_MAX_SIZE_DIFFERENCE} apart)"
    for i in range(VOCAB_CHECK_START, min(n_t, n_d)):
        if target.tokens[i] != draft.tokens[i]:
            return f"token {i} is {draft.tokens[i][:40]!r}, the target's {target.tokens[i][:40]!r}"
    return None


def check_draft(target: Path, draft: Path) -> None:
    """Raise `DraftRefused` when the draft at `draft` cannot draft for the model at `target`."""
    why = vocab_mismatch(read_vocab(target), read_vocab(draft))
    if why is not None:
        raise DraftRefused(f"the draft {draft.name} does not share the tokenizer of {target.name}: {why}")


async def choose(
    name: str, path: Path, flags: DraftFlags, *, models_dir: Path, on_progress: ProgressFn | None = None
) -> tuple[tuple[Speculation, ...], str]:
    """The candidates for the model `name` at `path`, and a line saying why (for the log and `/api/status`).
    A draft whose tokenizer differs raises `DraftRefused` (the caller serves without speculation and says why)."""
    ngram = Speculation(NGRAM, n_max=flags.n_max, n_min=flags.n_min)
    if flags.off:
        return (), "off: --no-draft"
    if flags.draft is not None and flags.draft.strip().lower() in NGRAM_WORDS:
        return (ngram,), "n-gram lookup only (--draft ngram)"
    draft_path, draft_name = None, None
    if flags.draft:  # --draft PATH|NAME
        local = await ensure_model(flags.draft, models_dir=models_dir, on_progress=on_progress)
        draft_path, draft_name = local.path, local.name
    else:
        entry = by_name(name)
        draft_entry = by_name(entry.draft) if entry is not None and entry.draft else None
        if draft_entry is None:
            return (), f"off: no catalog draft for {name} (--draft PATH|NAME picks one, --draft ngram n-gram lookup)"
        if is_downloaded(draft_entry, models_dir):
            draft_path, draft_name = catalog_paths(draft_entry, models_dir)[0], draft_entry.name
        elif flags.draft == "":  # bare --draft: fetch it
            local = await ensure_model(draft_entry.name, models_dir=models_dir, on_progress=on_progress)
            draft_path, draft_name = local.path, local.name
        else:
            return (), f"off: the catalog draft {draft_entry.name} is not on disk (mesh-llm download {name} --draft)"
    if draft_path.resolve() == path.resolve():
        log.info("%s drafts for itself: every proposal is accepted (a test of the machinery, not a speed-up)", name)
    await anyio.to_thread.run_sync(check_draft, path, draft_path)
    draft = Speculation(DRAFT, draft_path, draft_name, flags.n_max, flags.n_min)
    return (draft, ngram), f"draft {draft_name} (tokenizer checked), n-gram lookup"

"""Speculative decoding without processes: the draft's tokenizer checked against the target's from both GGUF headers,
the candidates the flags and the catalog give, llama-server's flags for each (the draft never on RPC devices), the
counters read from llama-server's /metrics, and the on/off controller as a pure function over measured windows
(hypothesis: it never flaps faster than its dwell time; off whenever speculation measured slower than without)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.gguf_facts import Vocab, read_vocab
from inference.llama_metrics import parse_counters
from inference.speculation import DRAFT, NGRAM, DraftFlags, Speculation, choose, vocab_mismatch
from mesh_mcp.errors import DraftRefused
from mesh_mcp.serving import spec_control
from mesh_mcp.serving.spec_control import OFF, Policy, Window
from tests.ggufgen import write_dense

POLICY = Policy(dwell_s=20.0, min_tokens=100, margin=0.03, recheck_s=600.0, recheck_max_s=2400.0)


def vocab(**changes: object) -> Vocab:
    base = Vocab("gpt2", tuple(f"t{i}".encode() for i in range(1000)), bos=1, eos=2, add_bos=False, add_eos=None)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_the_vocab_is_read_from_the_header(smollm: Path) -> None:
    v = read_vocab(smollm)
    assert v.model == "gpt2" and len(v.tokens) == 49152
    assert v.tokens[:3] == (b"<|endoftext|>", b"<|im_start|>", b"<|im_end|>")
    assert (v.bos, v.eos) == (1, 2)


def test_a_model_drafts_for_itself_and_another_tokenizer_is_refused(smollm: Path, tmp_path: Path) -> None:
    assert vocab_mismatch(read_vocab(smollm), read_vocab(smollm)) is None
    tiny = write_dense(tmp_path / "tiny.gguf", 1, 64)
    why = vocab_mismatch(read_vocab(smollm), read_vocab(tiny))
    assert why is not None and ("BOS" in why or "tokens" in why)


def test_llama_cpps_checks_are_the_ones_made() -> None:
    t = vocab()
    assert vocab_mismatch(t, vocab()) is None
    assert vocab_mismatch(t, vocab(tokens=t.tokens + (b"x",) * 128)) is None  # up to 128 tokens apart
    assert "tokens" in (vocab_mismatch(t, vocab(tokens=t.tokens + (b"x",) * 129)) or "")
    changed = list(t.tokens)
    changed[3] = b"other"  # below llama.cpp's first checked token (5): not compared
    assert vocab_mismatch(t, vocab(tokens=tuple(changed))) is None
    changed[7] = b"other"
    assert "token 7" in (vocab_mismatch(t, vocab(tokens=tuple(changed))) or "")
    assert "tokenizer type" in (vocab_mismatch(t, vocab(model="llama")) or "")
    assert "BOS" in (vocab_mismatch(t, vocab(bos=5)) or "")
    assert "EOS" in (vocab_mismatch(t, vocab(eos=5)) or "")
    assert "BOS" in (vocab_mismatch(t, vocab(add_bos=True)) or "")
    assert vocab_mismatch(t, vocab(bos=None)) is None  # a header that says nothing is not a difference


def test_the_draft_runs_on_the_host_never_on_rpc_devices(tmp_path: Path) -> None:
    draft = Speculation(DRAFT, tmp_path / "d.gguf", "d", n_max=6, n_min=1)
    cpu = draft.args(gpu_layers=0)
    assert cpu[:2] == ("--spec-type", "draft-simple")
    assert "--spec-draft-device" in cpu and cpu[cpu.index("--spec-draft-device") + 1] == "none"
    assert cpu[cpu.index("--spec-draft-model") + 1] == str(tmp_path / "d.gguf")
    assert cpu[cpu.index("--spec-draft-n-max") + 1] == "6" and cpu[cpu.index("--spec-draft-n-min") + 1] == "1"
    gpu = draft.args(gpu_layers=999)  # a solo GPU host: the draft follows the target's own (local) devices
    assert "--spec-draft-device" not in gpu and gpu[gpu.index("--spec-draft-ngl") + 1] == "999"
    assert Speculation(NGRAM).args()[:2] == ("--spec-type", "ngram-simple")


def test_candidates_from_the_flags_and_the_catalog(smollm: Path, tmp_path: Path) -> None:
    async def go(name: str, path: Path, flags: DraftFlags) -> tuple[tuple[Speculation, ...], str]:
        return await choose(name, path, flags, models_dir=tmp_path)

    found, why = anyio.run(go, "SmolLM2", smollm, DraftFlags(off=True))
    assert found == () and "--no-draft" in why
    found, why = anyio.run(go, "SmolLM2", smollm, DraftFlags(draft="ngram"))
    assert [c.kind for c in found] == [NGRAM]
    found, why = anyio.run(go, "SmolLM2", smollm, DraftFlags())  # no catalog draft: no calibration to pay
    assert found == () and "no catalog draft" in why
    found, why = anyio.run(go, "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M", smollm, DraftFlags())  # draft not on disk
    assert found == () and "mesh-llm download Qwen2.5-Coder-1.5B-Instruct-Q4_K_M --draft" in why
    found, why = anyio.run(go, "SmolLM2", smollm, DraftFlags(draft=str(smollm), n_max=5))
    assert [c.kind for c in found] == [DRAFT, NGRAM] and found[0].draft == smollm and found[0].n_max == 5
    tiny = write_dense(tmp_path / "tiny.gguf", 1, 64)
    with pytest.raises(DraftRefused, match="does not share the tokenizer"):
        anyio.run(go, "SmolLM2", smollm, DraftFlags(draft=str(tiny)))


def test_the_counters_are_read_from_llama_servers_metrics() -> None:
    text = (
        "# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total 215\n"
        "# TYPE llamacpp:tokens_predicted_seconds_total counter\nllamacpp:tokens_predicted_seconds_total 6.5\n"
        "# TYPE llamacpp:spec_decode_num_draft_tokens_total counter\nllamacpp:spec_decode_num_draft_tokens_total 80\n"
        "# TYPE llamacpp:spec_decode_num_accepted_tokens_total counter\n"
        "llamacpp:spec_decode_num_accepted_tokens_total 60\n"
        "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\n"
    )
    assert parse_counters(text) == {"tokens": 215, "seconds": 6.5, "drafted": 80, "accepted": 60, "processing": 1}
    assert parse_counters("not prometheus {{{") == {}


def run_round(c: spec_control.Control, speeds: dict[str, float], now: float) -> tuple[spec_control.Control, float]:
    """Feed each mode its speed (tokens over seconds, 10 s at a time) until the round's decision; the time then."""
    for _ in range(100):
        tok_s = speeds[c.current]
        c = spec_control.observe(c, Window(tokens=10 * tok_s, seconds=10, drafted=8 * tok_s, accepted=6 * tok_s))
        now += 10
        c, _ = spec_control.step(c, now, POLICY)
        if not c.measuring:
            return c, now
    raise AssertionError("no decision")


def test_speculation_slower_than_without_ends_off() -> None:
    c = spec_control.start((DRAFT, NGRAM), 0.0, POLICY)
    assert c.current == OFF and c.todo == (DRAFT, NGRAM)
    c, _ = run_round(c, {OFF: 31.6, DRAFT: 15.0, NGRAM: 31.0}, 0.0)  # issue 21's CPU: the draft loses
    assert c.chosen == OFF and c.current == OFF and c.reason.startswith("off: 31.6 tok/s")
    shown = spec_control.status(c)
    assert shown["on"] is False and shown["tok_s"][DRAFT] == 15.0 and shown["acceptance"][DRAFT] == 0.75


def test_speculation_that_pays_is_kept_and_a_tie_is_not() -> None:
    c, _ = run_round(spec_control.start((DRAFT,), 0.0, POLICY), {OFF: 5.0, DRAFT: 9.0}, 0.0)  # a split at 50 ms
    assert c.chosen == DRAFT and c.current == DRAFT and "1.80x" in c.reason
    c, _ = run_round(spec_control.start((DRAFT,), 0.0, POLICY), {OFF: 10.0, DRAFT: 10.2}, 0.0)  # within the margin
    assert c.chosen == OFF and c.current == OFF


def test_a_decision_is_measured_again_later_and_less_often_while_it_holds() -> None:
    c, now = run_round(spec_control.start((DRAFT,), 0.0, POLICY), {OFF: 5.0, DRAFT: 9.0}, 0.0)
    assert c.recheck_at == now + POLICY.recheck_s
    c, switch = spec_control.step(c, now + POLICY.recheck_s - 1, POLICY)
    assert switch is None
    c = spec_control.observe(c, Window(tokens=500, seconds=55))
    c, switch = spec_control.step(c, now + POLICY.recheck_s, POLICY)
    assert switch == OFF and c.todo == ()  # the chosen mode's live window stands for it; off is measured again
    c, now = run_round(c, {OFF: 5.0, DRAFT: 9.0}, now + POLICY.recheck_s)
    assert c.chosen == DRAFT and c.current == DRAFT and c.recheck_every == 2 * POLICY.recheck_s
    c, now = run_round(replace(c, recheck_at=now), {OFF: 12.0, DRAFT: 9.0}, now)  # the workload changed
    assert c.chosen == OFF and c.recheck_every == POLICY.recheck_s


def test_a_mode_that_cannot_start_is_left_out() -> None:
    c = spec_control.start((DRAFT, NGRAM), 0.0, POLICY)
    c = spec_control.observe(c, Window(tokens=300, seconds=10))
    c, switch = spec_control.step(c, 30.0, POLICY)
    assert switch == DRAFT
    c, nxt = spec_control.fail(c, DRAFT, "exit 1", 31.0)
    assert nxt == NGRAM and DRAFT not in c.modes and c.failed == {DRAFT: "exit 1"}
    c, nxt = spec_control.fail(c, NGRAM, "exit 1", 32.0)
    assert nxt == OFF and c.chosen == OFF and c.current == OFF


def test_forced_speculation_never_switches() -> None:
    c = spec_control.forced(DRAFT, 0.0)
    for t in range(1, 5000, 50):
        c = spec_control.observe(c, Window(tokens=1000, seconds=100))
        c, switch = spec_control.step(c, float(t), POLICY)
        assert switch is None and c.current == DRAFT


looks = st.lists(
    st.tuples(
        st.floats(min_value=0.1, max_value=120.0),  # seconds until the next look
        st.floats(min_value=0.0, max_value=20.0),  # seconds spent generating meanwhile
        st.booleans(),  # the mode's server fails to start (at a switch)
    ),
    min_size=1,
    max_size=200,
)
ratio = st.one_of(st.floats(min_value=0.3, max_value=3.0), st.floats(min_value=0.99, max_value=1.05))


@settings(max_examples=300, deadline=None)
@given(looks, st.sampled_from([(DRAFT,), (DRAFT, NGRAM), (NGRAM,)]), st.floats(1.0, 100.0), ratio, ratio)
def test_the_controller_never_flaps_faster_than_its_dwell_and_keeps_only_what_pays(
    seq: list[tuple[float, float, bool]], candidates: tuple[str, ...], off: float, r_draft: float, r_ngram: float
) -> None:
    speed = {OFF: off, DRAFT: off * r_draft, NGRAM: off * r_ngram}  # each mode's tokens/s; near ties included
    now = 0.0
    c = spec_control.start(candidates, now, POLICY)
    switched_at = [0.0]
    for dt, seconds, fails in seq:
        now += dt
        c = spec_control.observe(c, Window(tokens=speed[c.current] * seconds, seconds=seconds))
        was_measuring = c.measuring
        c, switch = spec_control.step(c, now, POLICY)
        if switch is not None:
            assert now - switched_at[-1] >= POLICY.dwell_s, "a mode was left before its dwell time"
            switched_at.append(now)
            assert c.current == switch and switch in c.modes
            if fails and switch != OFF:
                c, _ = spec_control.fail(c, switch, "exit 1", now)  # the next mode starts at once: no new choice
        if was_measuring and not c.measuring:  # a round ended: the decision follows the measured speeds
            assert c.chosen is not None and c.current == c.chosen
            faster = [m for m in c.modes[1:] if m in c.measured and speed[m] >= speed[OFF] * (1 + POLICY.margin)]
            if c.chosen != OFF:  # kept only when measured faster than without, by the margin
                assert speed[c.chosen] >= speed[OFF] * (1 + POLICY.margin) - 1e-9
                assert all(speed[c.chosen] >= speed[m] for m in faster)
            else:  # and off whenever no candidate measured that much faster
                assert not faster or OFF not in c.measured


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--draft", "x", "--no-draft"], "contradict"),
        (["--draft-max", "0"], "--draft-max must be"),
        (["--draft-max", "4", "--draft-min", "5"], "--draft-min"),
    ],
)
def test_contradictory_or_out_of_range_draft_flags_are_refused(
    argv: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from mesh_mcp.cli import main

    before = logging.getLogger().handlers[:], logging.getLogger("mesh_llm").handlers[:]
    assert main(["--model", "X", *argv]) == 2
    assert why in capsys.readouterr().err
    # refused before logging is set up: nothing of the process's logging changed (other tests capture it)
    assert (logging.getLogger().handlers, logging.getLogger("mesh_llm").handlers) == before

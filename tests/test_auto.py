"""`--auto`'s choice (`mesh_mcp/serving/auto.py`): the largest catalog model that fits with headroom, a demanded
one first; and, with real node processes, `mesh-llm --auto` serving what it chose."""

from __future__ import annotations

import pytest

from inference.catalog import CATALOG, by_name
from inference.memory_model import estimate_need
from mesh_mcp.serving.auto import HEADROOM, choose
from tests.conftest import GEMMA, SMOLLM
from tests.test_mesh import Spawn, mesh_node

SMOL, GEM = by_name(SMOLLM), by_name(GEMMA)
assert SMOL is not None and GEM is not None


def room_for(*entries: object) -> int:
    """A capacity whose headroom holds the largest of `entries` exactly."""
    return int(max(estimate_need(e.size) for e in entries) / HEADROOM) + 1  # type: ignore[attr-defined]


def test_the_largest_that_fits_with_headroom() -> None:
    assert choose([SMOL, GEM], room_for(GEM)).model == GEMMA
    assert choose([SMOL, GEM], room_for(SMOL)).model == SMOLLM
    assert choose([SMOL, GEM], room_for(GEM) - 2).model == SMOLLM  # Gemma no longer fits the headroom


def test_nothing_fits_says_so() -> None:
    choice = choose([SMOL, GEM], room_for(SMOL) - 2)
    assert choice.model is None and "no catalog model fits" in choice.reasons[0]


def test_a_demanded_model_beats_a_larger_one_and_the_most_wanted_wins() -> None:
    assert choose([SMOL, GEM], room_for(GEM), {SMOLLM: 3.0}).model == SMOLLM
    assert choose([SMOL, GEM], room_for(GEM), {SMOLLM: 3.0, GEMMA: 5.0}).model == GEMMA
    # demand for a model that does not fit is no reason to pick it
    assert choose([SMOL, GEM], room_for(SMOL), {GEMMA: 9.0}).model == SMOLLM


def test_the_reasons_carry_the_numbers() -> None:
    choice = choose(CATALOG, room_for(GEM), {GEMMA: 2.0})
    assert choice.model == GEMMA
    assert "the mesh wants it (2.0 req/min)" in choice.reasons[0] and "GB" in choice.reasons[0]


@pytest.mark.slow
def test_auto_serves_what_it_chose_and_a_client_serves_nothing(spawn: Spawn, smollm: object) -> None:
    cap_gb = f"{room_for(SMOL) / 2**30 + 0.01:.3f}"  # room for SmolLM2, not Gemma
    offline = ("--nostr-relay", "ws://127.0.0.1:9")  # --auto searches and publishes: never on public relays
    node = mesh_node(spawn, "auto", "127.0.0.2", "--auto", "--max-vram", cap_gb, *offline)
    node.wait_log(r"--auto picks " + SMOLLM, timeout=60)
    node.wait_model_state(SMOLLM, "serving", timeout=240)
    client = mesh_node(spawn, "c", "127.0.0.3", "--client", "--auto", "--max-vram", cap_gb, *offline)
    status = client.wait_for("client up", lambda s: True, timeout=60)
    assert status["models"] == []
    assert "--auto picks" not in client.log()

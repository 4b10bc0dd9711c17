"""Node state: model lookup by the `model` field, and change broadcast to subscribers."""

from __future__ import annotations

import anyio
import pytest

from mesh_mcp.state import NodeState


def node(*names: str) -> NodeState:
    s = NodeState(node_id="n1", name="test", version="0", api_url="", console_url="")
    for n in names:
        s.update_model(n, state="serving")
    return s


@pytest.mark.parametrize(
    ("requested", "found"),
    [
        ("Qwen3-8B-Q4_K_M", "Qwen3-8B-Q4_K_M"),
        ("qwen3-8b-q4_k_m", "Qwen3-8B-Q4_K_M"),
        ("Qwen3-8B", "Qwen3-8B-Q4_K_M"),  # unique prefix
        ("Qwen3", None),  # ambiguous prefix
        ("Llama", None),
        (None, "Qwen3-8B-Q4_K_M"),  # no model field: the first one
        ("", "Qwen3-8B-Q4_K_M"),
    ],
)
def test_find_model(requested: str | None, found: str | None) -> None:
    s = node("Qwen3-8B-Q4_K_M", "Qwen3-32B-Q4_K_M")
    m = s.find_model(requested)
    assert (m.name if m else None) == found


def test_stopped_models_are_not_found() -> None:
    s = node("a")
    s.update_model("a", state="stopped")
    assert s.find_model("a") is None and s.served_names() == []


def test_upstream_never_leaves_the_node() -> None:
    s = node("a")
    s.update_model("a", upstream="http://127.0.0.1:5555")
    assert "upstream" not in s.snapshot()["models"][0]


def test_subscribers_get_every_change_and_progress_is_throttled() -> None:
    async def main() -> list[dict[str, object]]:
        s = node()
        got: list[dict[str, object]] = []
        async with s.subscribe() as updates:
            s.update_model("m", state="downloading", progress=0.001)
            s.update_model("m", state="downloading", progress=0.002)  # same whole percent: no event
            s.update_model("m", state="downloading", progress=0.5)
            s.update_model("m", state="serving", progress=None)
            with anyio.move_on_after(0.2):
                while True:
                    got.append(await updates.receive())
        assert not s._subscribers  # unsubscribed on exit
        return got

    events = anyio.run(main)
    states = [(e["models"][0]["state"], e["models"][0]["progress"]) for e in events]  # type: ignore[index]
    assert states == [("downloading", 0.001), ("downloading", 0.5), ("serving", None)]

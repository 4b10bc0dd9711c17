"""Measured decode speed (serving/throughput.py): llama-server's two counters become tokens/s; anything else — a
missing counter, no tokens yet, garbage, an oversized answer — is "unknown", never a number or an error."""

from __future__ import annotations

import anyio
import httpx2
import pytest

from inference.llama_metrics import MAX_BYTES as MAX_METRICS_BYTES
from mesh_mcp.serving.throughput import decode_tok_s, read_rate
from mesh_mcp.state import NodeState

# What llama-server's /metrics answers (the pinned build's server-task.cpp), after 40 tokens in 2.5 s.
METRICS = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 23
llamacpp:prompt_seconds_total 0.5
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 40
# HELP llamacpp:tokens_predicted_seconds_total Predict process time
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total 2.5
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s.
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 0
"""


def test_the_rate_is_tokens_over_the_seconds_spent_generating() -> None:
    assert decode_tok_s(METRICS) == 16.0


@pytest.mark.parametrize(
    "text",
    [
        "",
        METRICS.replace("llamacpp:tokens_predicted_total 40", "llamacpp:tokens_predicted_total 0"),  # none yet
        METRICS.replace("llamacpp:tokens_predicted_seconds_total 2.5\n", ""),  # a counter missing
        METRICS.replace(" 2.5", " NaN"),
        METRICS.replace(" 2.5", " 1e-300"),  # past any real server
        METRICS.replace(" 2.5", " soon"),
        "llamacpp:tokens_predicted_total\n" + METRICS,
    ],
)
def test_anything_else_is_unknown(text: str) -> None:
    assert decode_tok_s(text) is None


def test_a_server_that_answers_too_much_or_not_at_all_reads_as_unknown() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.host == "big":
            return httpx2.Response(200, text="#" * (MAX_METRICS_BYTES + 1))
        if request.url.host == "down":
            raise httpx2.ConnectError("refused")
        return httpx2.Response(200, text=METRICS)

    async def go() -> list[float | None]:
        async with httpx2.AsyncClient(transport=httpx2.MockTransport(handler)) as client:
            return [await read_rate(client, f"http://{host}") for host in ("big", "down", "ok")]

    assert anyio.run(go) == [None, None, 16.0]


def test_state_carries_the_rate_without_leaking_the_upstream() -> None:
    state = NodeState("0123456789abcdef", "n", "0", "", "")
    state.update_model("m", state="serving", upstream="http://127.0.0.1:1", measured_tok_s=16.0)
    public = state.models["m"].public()
    assert public["measured_tok_s"] == 16.0 and "upstream" not in public

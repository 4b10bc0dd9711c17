"""Measured decode speed: every `INTERVAL_S`, each model this node serves is asked for its llama-server's
`/metrics` (it runs with `--metrics`), and `decode_tok_s` turns the two counters that matter into tokens per second,
kept in the model's `measured_tok_s` (the console shows it beside the planner's prediction; the node's record
gossips it, so every console sees it).

The rate is llama-server's own: `llamacpp:tokens_predicted_total` over `llamacpp:tokens_predicted_seconds_total`,
the time spent generating them, so it is one request's decode speed (parallel slots do not add up) averaged over
the server's life, and idle time does not dilute it. Its `predicted_tokens_seconds` gauge is no use here: it is
averaged over the window between two scrapes and reads 0 when that window was idle. The counters are read by
`inference.llama_metrics.parse_counters` (prometheus_client's parser, as the speculation controller reads them);
the endpoint is a local llama-server's on 127.0.0.1, read within `inference.llama_metrics`' bounds.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx2

from inference.llama_metrics import parse_counters, read_metrics
from mesh_mcp.clock import SYSTEM_CLOCK, Clock
from mesh_mcp.state import SERVING, NodeState

INTERVAL_S = 10.0  # how often each serving model is read; a console shows a new rate within this
TIMEOUT_S = 2.0  # a llama-server busy with a long prompt answers /metrics between batches: late, not never
MAX_METRICS_BYTES = 64 * 1024  # llama-server's /metrics is ~2 KiB
MAX_TOK_S = 1_000_000.0  # a rate past this is a broken counter, not a measurement


def decode_tok_s(text: str) -> float | None:
    """Decode tokens/s from llama-server's Prometheus text: predicted tokens over the seconds spent generating
    them; None before the first generated token or when a counter is missing or malformed."""
    counters = parse_counters(text)
    tokens, seconds = counters.get("tokens", 0.0), counters.get("seconds", 0.0)
    if tokens <= 0 or seconds <= 0:
        return None
    rate = tokens / seconds
    return round(rate, 1) if rate <= MAX_TOK_S else None


async def read_rate(client: httpx2.AsyncClient, base_url: str) -> float | None:
    """One model's rate from its llama-server at `base_url`; None when it cannot say (not ready, no tokens yet)."""
    text = await read_metrics(client, base_url)
    return None if text is None else decode_tok_s(text)


async def measure(
    state: NodeState,
    clock: Clock = SYSTEM_CLOCK,
    client_factory: Callable[[], httpx2.AsyncClient] = httpx2.AsyncClient,
) -> None:
    """Forever: every `INTERVAL_S`, each serving model's rate into its `measured_tok_s` (changed ones only)."""
    async with client_factory() as client:
        while True:
            for m in list(state.models.values()):
                if m.state != SERVING or m.upstream is None:
                    continue
                rate = await read_rate(client, m.upstream)
                current = state.models.get(m.name)
                if rate is not None and current is not None and current.upstream == m.upstream:
                    if rate != current.measured_tok_s:
                        state.update_model(m.name, measured_tok_s=rate)
            await clock.sleep(INTERVAL_S)

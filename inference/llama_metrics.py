"""Reading a llama-server's `/metrics` (it runs with `--metrics`): the Prometheus text, bounded. Its two readers
are the node's measured decode speed (mesh_mcp/serving/throughput.py) and the node's own `/metrics`, which folds
llama-server's in (mesh_mcp/metrics/llamacpp.py). The server is this node's own on 127.0.0.1, but what it answers
is still bounded: `MAX_BYTES`, `TIMEOUT_S`."""

from __future__ import annotations

import math

import httpx2
from prometheus_client.parser import text_string_to_metric_families

TIMEOUT_S = 2.0  # a llama-server busy with a long prompt answers /metrics between batches: late, not never
MAX_BYTES = 64 << 10  # llama-server's /metrics is ~2 KiB


async def read_metrics(client: httpx2.AsyncClient, base_url: str) -> str | None:
    """The Prometheus text of the llama-server at `base_url`; None when it does not answer 200 within the bounds."""
    try:
        async with client.stream("GET", base_url + "/metrics", timeout=TIMEOUT_S) as resp:
            if resp.status_code != 200:
                return None
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_BYTES:
                    return None
    except httpx2.HTTPError:
        return None
    return body.decode("utf-8", "replace")


# The counters speculation is judged by (mesh_mcp/serving/spec_control.py): generated tokens and the seconds spent
# generating them, the draft tokens proposed and accepted, and the requests running now (a drained server has none).
COUNTERS = {
    "tokens": "llamacpp:tokens_predicted_total",
    "seconds": "llamacpp:tokens_predicted_seconds_total",
    "drafted": "llamacpp:spec_decode_num_draft_tokens_total",
    "accepted": "llamacpp:spec_decode_num_accepted_tokens_total",
    "processing": "llamacpp:requests_processing",
}


def parse_counters(text: str) -> dict[str, float]:
    """`COUNTERS` (by their short names) from llama-server's Prometheus text; a missing, negative or non-finite one is
    absent, and a malformed text gives none."""
    wanted = {v: k for k, v in COUNTERS.items()}
    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = wanted.get(sample.name)
                if key is not None and key not in out and math.isfinite(sample.value) and sample.value >= 0:
                    out[key] = float(sample.value)
    except (ValueError, IndexError, TypeError):  # prometheus_client's parser on a malformed line
        return {}
    return out

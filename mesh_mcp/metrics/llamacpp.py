"""llama-server's own `/metrics` (it runs with `--metrics`), folded into the node's: read from each model this node
serves at scrape time, renamed `llamacpp:x` -> `mesh_llm_llamacpp_x` and labelled with the `model`. Only there:
the node's own families never repeat them.

`read` is the I/O (bounded: `MAX_BYTES`, `TIMEOUT_S` per server, all servers at once); `fold` is pure. The servers
are this node's own on 127.0.0.1, but what they answer is still bounded: families named `llamacpp:` only, at most
`MAX_FAMILIES`, `MAX_SAMPLES` samples each, `MAX_LABELS` labels of at most `MAX_LABEL_VALUE` characters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import anyio
import httpx2
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from inference.llama_metrics import TIMEOUT_S, read_metrics
from mesh_mcp.metrics.families import MAX_MODEL_NAME
from mesh_mcp.state import SERVING, NodeState

MAX_FAMILIES = 64
MAX_SAMPLES = 64
MAX_LABELS = 8
MAX_LABEL_VALUE = 128
PREFIX = "mesh_llm_llamacpp_"
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,63}$")


async def read(
    node: NodeState, client_factory: Callable[[], httpx2.AsyncClient] = httpx2.AsyncClient
) -> dict[str, str]:
    """Each serving model's llama-server `/metrics` text (model name -> text); a server that does not answer in
    time, or answers too much, is left out."""
    servers = {m.name: m.upstream for m in list(node.models.values()) if m.state == SERVING and m.upstream}
    found: dict[str, str] = {}
    if not servers:
        return found

    async def one(client: httpx2.AsyncClient, name: str, url: str) -> None:
        with anyio.move_on_after(TIMEOUT_S + 0.5):
            if (text := await read_metrics(client, url)) is not None:
                found[name] = text

    async with client_factory() as client, anyio.create_task_group() as tg:
        for name, url in servers.items():
            tg.start_soon(one, client, name, url)
    return found


def fold(texts: Mapping[str, str]) -> list[Metric]:
    """The families of every model's text, renamed and labelled with `model`, one family per name."""
    out: dict[str, Metric] = {}
    for model, text in sorted(texts.items()):
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError:  # a malformed exposition: this model's numbers are left out
            continue
        for family in parsed:
            if not family.name.startswith("llamacpp:"):
                continue
            name = PREFIX + family.name.removeprefix("llamacpp:").replace(":", "_")
            target = out.get(name)
            if target is None:
                if len(out) >= MAX_FAMILIES:
                    continue
                target = out[name] = Metric(name, family.documentation[:256], family.type)
            for sample in family.samples[:MAX_SAMPLES]:
                labels = {
                    k: v[:MAX_LABEL_VALUE] for k, v in list(sample.labels.items())[:MAX_LABELS] if _LABEL.match(k)
                }
                labels["model"] = model[:MAX_MODEL_NAME]
                sample_name = PREFIX + sample.name.removeprefix("llamacpp:").replace(":", "_")
                target.add_sample(sample_name, labels, sample.value)
    return list(out.values())

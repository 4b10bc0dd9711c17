"""`mesh-llm top`: a live view of the mesh from one node's console, refreshed every 2 s (`--once`: one plain-text
snapshot, then exit).

mesh-llm top [--console URL] [--api-key KEY] [--interval S] [--once]

It reads the node's `GET /api/status` (the running node of this machine's home, `mcp.local.read_runtime`, unless
`--console` names one) and shows a header (node, mesh, members) and one table per model: a row per node that lists
it (state, requests in flight, the decode speed its llama-server measured, and the requests its server answered
since that node started — ok and errors, whichever node they entered by — as that node's signed record says) and a
row for the requests that entered the node `top` watches (`requests` in the status: ok, errors, cancelled, in
flight, tokens out, and tokens out per second between two refreshes). Cancelled requests and tokens out are counted
only where a request entered, so a node's row shows `·` there (run `top` on that node to see its own); so do its
ok and errors when its record is of a version that does not carry them.

`view` and `plain` are pure (a status dict in, a rich renderable or text out); `main` does the HTTP and the screen.
Every string a peer wrote (names, models, states) is shown through `printable`, as rich `Text` (never markup).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from inference import paths
from inference.controls import printable
from mesh_mcp.jsonlimits import JsonRejected, parse_object

INTERVAL_S = 2.0  # the console's own /api/events re-reads the mesh every 2 s: refreshing faster shows nothing new
MIN_INTERVAL_S = 0.5
FETCH_TIMEOUT_S = 5.0  # one status read; a node that takes longer is shown as not answering, and asked again
MAX_STATUS_BYTES = 16 << 20  # a 1000-member mesh's status is a few MB; a console sending more is not read further
MAX_MODELS_SHOWN = 32  # model tables on one screen (the status lists up to 256)
MAX_NODES_SHOWN = 24  # node rows per model table; the rest are counted in a last row
MAX_NAME = 48  # characters of a node or model name shown
UNKNOWN = "·"  # a number this node cannot know (a node's cancelled requests and tokens out)
NOTE = (
    "Node rows come from each node's gossiped record: state, in flight, measured decode tok/s, and ok / errors of "
    "the requests its server answered since it started (whichever node they entered by). The '→ entered here' row: "
    "requests that entered this node (its own metrics), served wherever; cancelled and tokens out are only counted "
    "there (run `mesh-llm top` on another node for its own)."
)
NO_NODE = (
    "no mesh-llm node answers at {url}. Start one (`mesh-llm --model NAME`, or `mesh-llm --client`) or name its "
    "console with --console URL."
)


class TopError(Exception):
    """The console could not be read; `str()` says what happened."""


@dataclass(frozen=True)
class Sample:
    """This node's tokens out per model at one time: two of them give the live rate."""

    at: float
    tokens_out: Mapping[str, int]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesh-llm top",
        description="Live tokens/s, requests in flight and errors per model and node, from a node's console.",
    )
    p.add_argument("--console", metavar="URL", help="the node's console (default: the node running here, else :3131)")
    p.add_argument("--api-key", metavar="KEY", help="key of a node on another machine (sent as a Bearer token)")
    p.add_argument(
        "--interval", type=float, default=INTERVAL_S, metavar="S", help=f"seconds between refreshes ({INTERVAL_S:g})"
    )
    p.add_argument("--once", action="store_true", help="print one snapshot as plain text and exit")
    return p


# ----------------------------------------------------------------------------------------------------- pure view


def _s(value: Any, limit: int = MAX_NAME) -> str:
    """A string a peer sent, safe for the terminal: control characters shown as U+FFFD, one line, cut to `limit`."""
    text = " ".join(printable(str(value)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(value: Any, digits: int = 0) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return f"{value:.{digits}f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def tokens_out(status: Mapping[str, Any]) -> dict[str, int]:
    """This node's tokens out per model, from the status's `requests`."""
    found = status.get("requests")
    if not isinstance(found, Mapping):
        return {}
    out = {}
    for model, row in found.items():
        value = row.get("tokens_out") if isinstance(row, Mapping) else None
        if isinstance(value, int) and not isinstance(value, bool):
            out[str(model)] = value
    return out


def rates(before: Sample | None, now: Sample) -> dict[str, float]:
    """Tokens out per second per model between two samples (none on the first; a counter that fell, after a
    restart of the node, counts from zero)."""
    if before is None or now.at <= before.at:
        return {}
    dt = now.at - before.at
    out = {}
    for model, count in now.tokens_out.items():
        prev = before.tokens_out.get(model, 0)
        out[model] = (count - prev if count >= prev else count) / dt
    return out


def _part(status: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """`status[key]` when it is an object, else an empty one (a console of another version may lack it)."""
    found = status.get(key)
    return found if isinstance(found, Mapping) else {}


def _header(status: Mapping[str, Any], now: float) -> Text:
    mesh = _part(status, "mesh")
    members = [m for m in mesh.get("members", []) if isinstance(m, Mapping)]
    alive = [m for m in members if m.get("state") == "alive"]
    clients = sum(1 for m in alive if m.get("role") == "client")
    gone = len(members) - len(alive)
    mesh_id = status.get("mesh_id")
    line = Text("mesh-llm top  ", style="bold")
    line.append(f"node {_s(status.get('name', '?'))} ({_s(status.get('node_id', '?'), 16)[:8]})", style="bold cyan")
    line.append(f"  mesh {_s(mesh_id, 16)[:8] if mesh_id else 'none (solo)'}")
    line.append(f"  {_count(len(alive) - clients, 'member')}")
    if clients:
        line.append(f" + {_count(clients, 'client')}")
    if gone:
        line.append(f" ({gone} gone)", style="red")
    uptime = status.get("uptime_s")
    if isinstance(uptime, int | float):
        line.append(f"  up {_ago(uptime)}")
    line.append(f"  v{_s(status.get('version', '?'), 24)}  {time.strftime('%H:%M:%S', time.localtime(now))}")
    return line


_STATE_STYLE = {"serving": "green", "stage": "green", "loading": "yellow", "downloading": "yellow", "failed": "red"}


def _model_rows(mesh: Mapping[str, Any], name: str) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(member, its entry for model `name`) for every member that lists it: this node first, then by name."""
    out = []
    for member in mesh.get("members", []):
        if not isinstance(member, Mapping):
            continue
        for entry in member.get("models", []):
            if isinstance(entry, Mapping) and entry.get("name") == name:
                out.append((member, entry))
                break
    return sorted(out, key=lambda me: (not me[0].get("self"), str(me[0].get("name")), str(me[0].get("node_id"))))


def _title(model: Mapping[str, Any]) -> Text:
    title = Text(_s(model.get("name", "?"), 96), style="bold")
    servers = model.get("servers") or []
    parts = [_s(model.get("mode") or "none", 16), _count(len(servers), "server")]
    if isinstance(model.get("measured_tok_s"), int | float):
        parts.append(f"measured {model['measured_tok_s']:.1f} tok/s")
    if isinstance(model.get("demand_rate_per_min"), int | float):
        parts.append(f"demand {model['demand_rate_per_min']:.1f} req/min")
    title.append("  " + " · ".join(parts), style="dim")
    if model.get("failed"):
        title.append(f"  failed on {len(model['failed'])}", style="red")
    return title


def _table(
    model: Mapping[str, Any], mesh: Mapping[str, Any], here: Mapping[str, Any] | None, rate: float | None
) -> Table:
    table = Table(title=_title(model), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
    table.add_column("node", no_wrap=True, min_width=16)
    for heading in ("state", "in flight", "tok/s", "ok", "errors", "cancelled", "tokens out"):
        table.add_column(heading, justify="left" if heading == "state" else "right", no_wrap=True)
    rows = _model_rows(mesh, str(model.get("name")))
    for member, entry in rows[:MAX_NODES_SHOWN]:
        who = Text(_s(member.get("name", "?")))
        who.append(f" {_s(member.get('node_id', ''), 16)[:8]}", style="dim")
        if member.get("self"):
            who.append(" (this)", style="cyan")
        alive = member.get("state") == "alive"
        state = _s(entry.get("state", "?"), 16) if alive else _s(member.get("state", "?"), 16)
        table.add_row(
            who,
            Text(state, style=_STATE_STYLE.get(state, "") if alive else "red"),
            _num(entry.get("in_flight")) if alive else "",  # a gone node's last record: nothing runs there now
            _num(entry.get("tok_s"), 1) if alive else "",
            *_answered(entry),
            UNKNOWN,
            UNKNOWN,
        )
    if len(rows) > MAX_NODES_SHOWN:
        table.add_row(Text(f"… {len(rows) - MAX_NODES_SHOWN} more nodes", style="dim"), *[""] * 7)
    if not rows:
        table.add_row(Text("no node lists it", style="dim"), "", "", "", "", "", "", "")
    here = here or {}
    errors = sum(v for k in ("client_error", "upstream_error") if isinstance(v := here.get(k), int))
    table.add_row(
        Text("→ entered here", style="italic cyan"),
        "",
        _num(here.get("in_flight", 0)),
        "" if rate is None else f"{rate:.1f}",
        _num(here.get("ok", 0)),
        Text(str(errors), style="red" if errors else ""),
        _num(here.get("cancelled", 0)),
        _num(here.get("tokens_out", 0)),
    )
    return table


def _answered(entry: Mapping[str, Any]) -> tuple[str, Text]:
    """A node's ok and errors for a model, from its record (a gone node's: its last); `·` where it lacks them."""
    ok, err = entry.get("ok"), entry.get("err")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (ok, err)):
        return UNKNOWN, Text(UNKNOWN)
    return str(ok), Text(str(err), style="red" if err else "")


def view(status: Mapping[str, Any], live_rates: Mapping[str, float] | None = None, now: float | None = None) -> Group:
    """The whole screen for one status: header, one table per model (the mesh's models, then those only this
    node's counts name), and the note on where the numbers come from. `live_rates`: tokens out per second here."""
    now = time.time() if now is None else now
    mesh, requests = _part(status, "mesh"), _part(status, "requests")
    models: list[Mapping[str, Any]] = [m for m in mesh.get("models", []) if isinstance(m, Mapping)]
    named = {str(m.get("name")) for m in models}
    models += [{"name": name, "mode": "not served", "servers": []} for name in sorted(requests) if name not in named]
    parts: list[RenderableType] = [_header(status, now), Text("")]
    for model in models[:MAX_MODELS_SHOWN]:
        name = str(model.get("name"))
        here = requests.get(name)
        rate = None if live_rates is None else live_rates.get(name, 0.0)
        parts.append(_table(model, mesh, here if isinstance(here, Mapping) else None, rate))
    if len(models) > MAX_MODELS_SHOWN:
        parts.append(Text(f"… {len(models) - MAX_MODELS_SHOWN} more models", style="dim"))
    if not models:
        parts.append(Text("no models in the mesh yet", style="dim"))
    parts.append(Text(NOTE, style="dim"))
    return Group(*parts)


def plain(status: Mapping[str, Any], width: int = 120, now: float | None = None) -> str:
    """`view` as plain text (no colour, no cursor movement): what `--once` prints."""
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, force_terminal=False, highlight=False)
    console.print(view(status, None, now))
    return "".join(line.rstrip() + "\n" for line in out.getvalue().splitlines())


# ----------------------------------------------------------------------------------------------------- I/O


def console_url(home: Path, given: str | None) -> str:
    """`--console`, else the console of the node running in `home`, else the default port."""
    if given:
        return given.rstrip("/")
    from mesh_mcp.mcp.local import DEFAULT_CONSOLE_PORT, read_runtime

    info = read_runtime(home)
    return info.console_url.rstrip("/") if info is not None else f"http://127.0.0.1:{DEFAULT_CONSOLE_PORT}"


def fetch(client: httpx2.Client, url: str) -> dict[str, Any]:
    """The node's `/api/status`, at most `MAX_STATUS_BYTES`; `TopError` with a sentence otherwise."""
    try:
        with client.stream("GET", url + "/api/status") as resp:
            if resp.status_code != 200:
                hint = " (give its key: --api-key KEY)" if resp.status_code in (401, 403) else ""
                raise TopError(f"{url}/api/status answered {resp.status_code}{hint}")
            body = bytearray()
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > MAX_STATUS_BYTES:
                    raise TopError(f"{url}/api/status sent more than {MAX_STATUS_BYTES >> 20} MiB; not a status")
    except httpx2.TransportError as exc:
        raise TopError(NO_NODE.format(url=url)) from exc
    try:
        return parse_object(bytes(body))
    except JsonRejected as exc:
        raise TopError(f"{url}/api/status is not a status: {exc}") from exc


def _live(client: httpx2.Client, url: str, interval: float) -> int:
    before: Sample | None = None
    status: dict[str, Any] | None = None
    with Live(Text(f"reading {url} …"), auto_refresh=False, screen=False, transient=False) as live:
        while True:
            problem = None
            try:
                status = fetch(client, url)
            except TopError as exc:
                problem = str(exc)
            now = time.time()
            if status is not None and problem is None:
                sample = Sample(now, tokens_out(status))
                screen: RenderableType = view(status, rates(before, sample), now)
                before = sample
            elif status is not None:  # the last status, marked stale
                screen = Group(Text(f"{_s(problem, 400)} (retrying)", style="bold red"), view(status, None, now))
            else:
                screen = Text(f"{_s(problem, 400)} (retrying)", style="bold red")
            live.update(screen, refresh=True)
            time.sleep(interval)


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    url = console_url(paths.home_dir(), args.console)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx2.Client(headers=headers, timeout=FETCH_TIMEOUT_S) as client:
        if args.once:
            try:
                status = fetch(client, url)
            except TopError as exc:
                print(f"mesh-llm: {_s(exc, 400)}", file=sys.stderr)
                return 1
            print(plain(status, max(80, shutil.get_terminal_size((120, 40)).columns)), end="")
            return 0
        try:
            return _live(client, url, max(MIN_INTERVAL_S, args.interval))
        except KeyboardInterrupt:
            return 0

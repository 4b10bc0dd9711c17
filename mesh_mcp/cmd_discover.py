"""`mesh-llm discover`: the public meshes listed on the Nostr relays and the LAN, as a table (or JSON).

Each row is one mesh (its newest listing): id, name, region, models served and wanted, nodes, clients (of the cap),
capacity, the measured round trip to its listed addresses (a QUIC probe, discovery/probe.py), its llama.cpp build
and gossip protocol (whether this version can join it), and where it was seen. `--model`, `--region` and
`--min-vram` filter. Listings are untrusted: only what parsed and validated is shown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import anyio

from inference import paths
from mesh_mcp.discovery.finder import Finder, Found
from mesh_mcp.discovery.nostr import DEFAULT_RELAYS, NostrDirectory
from mesh_mcp.mesh.gossip_wire import PROTOCOL
from mesh_mcp.public import NOSTR_KEY

PROBE_S = 3.0  # one latency probe's bound here: a loaded machine answers late, not never


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesh-llm discover",
        description="List the public meshes on the Nostr relays and the local network (mDNS).",
    )
    p.add_argument("--model", help="only meshes that serve or want this model (case-insensitive substring)")
    p.add_argument("--region", help="only meshes tagged with this region")
    p.add_argument("--min-vram", type=float, metavar="GB", help="only meshes offering at least this much capacity")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--nostr-relay", action="append", default=[], metavar="URL", help="relay to search (repeatable; default: 5)"
    )
    p.add_argument("--no-lan", action="store_true", help="do not search the local network")
    p.add_argument("--wait", type=float, default=4.0, metavar="S", help="how long to listen (default 4 s)")
    return p


def _matches(f: Found, args: argparse.Namespace) -> bool:
    listing = f.listing
    if args.model:
        needle = args.model.casefold()
        if not any(needle in m.casefold() for m in (*listing.served, *listing.wanted)):
            return False
    if args.region and (listing.region or "").casefold() != args.region.casefold():
        return False
    return not (args.min_vram and listing.capacity_bytes < args.min_vram * 1e9)


def rows(found: list[Found], latencies: dict[str, float | None]) -> list[dict[str, Any]]:
    out = []
    for f in found:
        x, ms = f.listing, latencies.get(f.listing.mesh_id)
        out.append(
            {
                "mesh_id": x.mesh_id,
                "name": x.name,
                "region": x.region,
                "served": list(x.served),
                "wanted": list(x.wanted),
                "nodes": x.nodes,
                "clients": x.clients,
                "max_clients": x.max_clients,
                "capacity_gb": round(x.capacity_bytes / 1e9, 1),
                "latency_ms": None if ms is None else round(ms * 1000, 1),
                "llama_cpp": x.llama_cpp,
                "compatible": x.protocol == PROTOCOL,
                "via": list(f.via),
                "published_at": x.published_at,
            }
        )
    return out


def table(data: list[dict[str, Any]]) -> str:
    if not data:
        return "no public mesh found (relays and LAN searched)"
    head = ("MESH", "NAME", "REGION", "SERVED", "WANTED", "NODES", "CLIENTS", "GB", "RTT ms", "BUILD", "VIA")
    lines = [head]
    for r in data:
        clients = f"{r['clients']}/{r['max_clients']}" if r["max_clients"] else str(r["clients"])
        lines.append(
            (
                r["mesh_id"][:8],
                r["name"] or "-",
                r["region"] or "-",
                ", ".join(r["served"][:3]) + (" …" if len(r["served"]) > 3 else "") or "-",
                ", ".join(r["wanted"][:3]) + (" …" if len(r["wanted"]) > 3 else "") or "-",
                str(r["nodes"]),
                clients,
                f"{r['capacity_gb']:.1f}",
                "-" if r["latency_ms"] is None else f"{r['latency_ms']:.0f}",
                (r["llama_cpp"][:16] or "-") + ("" if r["compatible"] else " (incompatible)"),
                "+".join(r["via"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines)


async def discover(args: argparse.Namespace, home: Path) -> list[dict[str, Any]]:
    relays = tuple(args.nostr_relay) or DEFAULT_RELAYS
    finder = Finder(NostrDirectory(home / NOSTR_KEY, relays), lan=not args.no_lan)
    found = [f for f in await finder.find(args.wait) if _matches(f, args)]
    return rows(found, await finder.latencies(found, within_s=PROBE_S))  # a person waits; --auto's bound is 1 s


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    data = anyio.run(discover, args, paths.home_dir())
    print(json.dumps(data, indent=2) if args.json else table(data))
    return 0

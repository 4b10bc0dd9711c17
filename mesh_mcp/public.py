"""A node's public side (issue 15): where `--auto` looks for a mesh at start, what the node's listing says, and the
discovery actors a running node starts — the glue between the node (its mesh, its serving plane) and
`mesh_mcp/discovery/` (which knows neither).

- `Public` (settings from the CLI): `--publish`, `--mesh-name` (implies it), `--region`, `--max-clients`,
  `--nostr-relay`; `directory()` / `finder()` build the transports (the Nostr key lives in the node's home, 0600).
- `auto_choice`: `--auto` without `--join`: search, rank, decide (`discovery.choose`); the token to join, or None to
  create a mesh. Logged with every candidate's reasons.
- `listing_of`: the node's view of its mesh as a `Listing` — models served (by any member), wanted (the demand map,
  not served), on disk, capacity (members' sum), nodes, clients connected here, the token, this node's addresses —
  trimmed to the size limit.
- `actors`: the `Publisher` (publishing, or watching to take over for an `--auto` member) and, for a node that
  created a named mesh with `--auto --mesh-name`, the `NameWatch` that moves it into the race's winner.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from inference import catalog
from inference.memory_model import estimate_need
from mesh_mcp import __version__
from mesh_mcp.clock import Clock
from mesh_mcp.discovery.choose import Choice, choose
from mesh_mcp.discovery.finder import Finder
from mesh_mcp.discovery.listing import Listing
from mesh_mcp.discovery.mdns import LanAnnouncer
from mesh_mcp.discovery.nostr import DEFAULT_RELAYS, NostrDirectory
from mesh_mcp.discovery.publisher import NameWatch, Publisher
from mesh_mcp.discovery.score import Wants
from mesh_mcp.mesh import meshfile
from mesh_mcp.mesh.gossip_wire import PROTOCOL
from mesh_mcp.mesh.runtime import Mesh

log = logging.getLogger("mesh_llm.discovery")

NOSTR_KEY = "nostr.key"


@dataclass(frozen=True)
class Public:
    publish: bool = False  # --publish (or --mesh-name)
    mesh_name: str | None = None
    region: str | None = None
    max_clients: int = 0
    relays: tuple[str, ...] = DEFAULT_RELAYS
    lan: bool = True  # announce and search on the local network (mDNS) too
    takeover: bool = False  # --auto member: publish the mesh when no listing of it remains
    name_watch: bool = False  # created a mesh for --auto --mesh-name: move into the race's winner
    avoid: frozenset[str] = frozenset()  # --avoid-mesh: meshes (ids or 8+ character prefixes) --auto never joins

    def directory(self, home: Path, clock: Clock) -> NostrDirectory | None:
        return NostrDirectory(home / NOSTR_KEY, self.relays, clock) if self.relays else None

    def finder(self, home: Path, clock: Clock) -> Finder:
        return Finder(self.directory(home, clock), lan=self.lan)


def wants(client: bool, capacity_bytes: int, region: str | None, models: tuple[str, ...]) -> Wants:
    """This node as the ranking sees it: catalog models that fit its capacity are ones it can help with."""

    def fits(name: str) -> bool:
        entry = catalog.by_name(name)
        return entry is not None and estimate_need(entry.size) <= capacity_bytes

    return Wants(PROTOCOL, "", client=client, region=region, models=frozenset(models), fits=fits)


async def auto_choice(home: Path, public: Public, me: Wants, clock: Clock) -> Choice:
    """`--auto`: the mesh to join (its listing) or None to create one; logged with its reasons."""
    saved = meshfile.load(home)
    last = saved.mesh_id_hex if saved is not None else None
    if last is not None and any(last.startswith(a) for a in public.avoid):
        last = None  # left on purpose: not sticky
    choice = await choose(public.finder(home, clock), me, last, clock, name=public.mesh_name, avoid=public.avoid)
    for reason in choice.reasons:
        log.info("--auto: %s", reason)
    return choice


def listing_of(mesh: Mesh, public: Public, wanted: Callable[[float], list[str]], now: float) -> Listing:
    members = mesh.members()
    ids = {r.node_id for r in members}
    served = sorted({m.name for r in members for m in r.models_served if m.state == "serving"})
    clients = sum(1 for peer in mesh.transport.connections if peer not in ids)
    listing = Listing(
        mesh_id=mesh.config.mesh_id_hex,
        token=mesh.invite_token(),
        name=public.mesh_name,
        region=public.region,
        served=tuple(served[:64]),
        wanted=tuple([w for w in wanted(now) if w not in served][:64]),
        on_disk=tuple(sorted({d for r in members for d in r.models_on_disk})[:64]),
        capacity_bytes=sum(r.capacity_bytes for r in members if r.role != "client"),
        nodes=len(members),
        clients=clients,
        max_clients=public.max_clients,
        llama_cpp=mesh.gossip.me.llama_cpp if mesh.gossip is not None else "",
        protocol=PROTOCOL,
        software=f"mesh-llm {__version__}"[:64],
        published_at=int(now),
        addresses=tuple(mesh.addresses[:16]),
    )
    return listing.trimmed()


def actors(
    mesh: Mesh, public: Public, wanted: Callable[[float], list[str]], in_flight: Callable[[], int], clock: Clock
) -> list[Callable[[], Awaitable[None]]]:
    """The discovery tasks this node runs (none for a private mesh joined by hand)."""
    if not (public.publish or public.takeover):
        return []
    home = mesh.home
    finder = public.finder(home, clock)
    port = int(mesh.addresses[0].rsplit(":", 1)[1]) if mesh.addresses else 0
    publisher = Publisher(
        lambda now: listing_of(mesh, public, wanted, now),
        clock,
        node_id=mesh.identity.node_id,
        port=port,
        nostr=finder.nostr,
        lan=LanAnnouncer if public.lan else None,
        publishing=public.publish,
        finder=finder,
        members=mesh.members,
    )
    out: list[Callable[[], Awaitable[None]]] = [publisher.run]
    if public.name_watch and public.mesh_name:
        out.append(NameWatch(public.mesh_name, mesh.config.mesh_id_hex, finder, clock, in_flight).run)
    return out

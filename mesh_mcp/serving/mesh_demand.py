"""This node's demand map in its mesh (issue 14, item 1): the pure `NodeDemand` fed by the API, its pins and the
members' gossiped records — what the node publishes in its record and what `/api/status` shows.

No I/O and no clock read: `members` is a provider (`Mesh.members`), and every method that needs the time takes
`now`; `connect` wires one to a running `Mesh` (its record's `demand` provider), a `NodeState` (`/api/status`) and
returns the API's per-request callback.

Which names count (junk cannot flood the map): a catalog entry's exact name, or a model some live member holds on
disk or serves (its record's `models_on_disk`, `models_served`). A request is counted under its canonical name: the
name itself when known, else the catalog entry it names in another case, else a member's model in another case.
Refused names are counted nowhere and logged at debug level, once per name.

Peers' views are absorbed on every `publish` and `mesh_map` (idempotent: the merge is a CRDT), so a dead member's
demand stays in this node's map, and in its record, until the TTL; its pins end with it. A client publishes no
record: it pushes its view to members (mesh/demand_link.py), which absorb it the same way (`absorb_client`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from inference import catalog
from inference.catalog import CATALOG
from inference.memory_model import estimate_need
from mesh_mcp.mesh.demand_wire import Item
from mesh_mcp.mesh.records import NodeRecord
from mesh_mcp.mesh.runtime import Mesh
from mesh_mcp.serving.demand import TTL_S, DemandMap, NodeDemand, from_items, to_items
from mesh_mcp.state import NodeState

MAX_CACHED_VIEWS = 1024  # members whose parsed view is kept

log = logging.getLogger("mesh_llm.demand")

MAX_STATUS = 64  # rows of /api/status's demand map: the hottest (a record carries 24; the catalog holds < 100)
MAX_LOGGED = 256  # refused names remembered so each is logged once (then forgotten all at once)
CATALOG_NAMES = frozenset(e.name for e in CATALOG)

Members = Callable[[], Sequence[NodeRecord]]


class MeshDemand:
    """One node's `NodeDemand`, its view of which names exist, and its members' published views."""

    def __init__(
        self, node_id: str, members: Members, catalog: Iterable[str] = CATALOG_NAMES, ttl_s: float = TTL_S
    ) -> None:
        self.ttl_s = ttl_s  # --demand-ttl: a model no request named this long is no longer wanted
        self.node_id = node_id
        self._members = members
        self._catalog = frozenset(catalog)
        self._held: frozenset[str] = frozenset()  # models members hold or serve, as of the last refresh
        self._folded = _folded(self._catalog)  # casefolded known name -> the name
        self._logged: set[str] = set()
        self._parsed: dict[str, tuple[int, DemandMap]] = {}  # node id → (record version, its view): parsed once
        self.node = NodeDemand(self.known, ttl_s=ttl_s)

    # --- which names exist ------------------------------------------------------------------------------

    def known(self, name: str) -> bool:
        """A catalog entry's exact name or a model some member holds or serves (as of the last refresh)."""
        return name in self._catalog or name in self._held

    def _refresh(self, members: Sequence[NodeRecord]) -> None:
        held = frozenset(
            {d for r in members for d in r.models_on_disk} | {m.name for r in members for m in r.models_served}
        )
        if held != self._held:
            self._held = held
            self._folded = _folded(self._catalog | held)

    def canonical(self, requested: str) -> str | None:
        """The known name a request means: itself, else the one it names in another case; None if none."""
        if self.known(requested):
            return requested
        return self._folded.get(requested.casefold())

    # --- fed by the node -----------------------------------------------------------------------------------

    def want(self, requested: str, now: float) -> str:
        """Count one API request naming `requested` at `now`. '' when counted, else the sentence saying why not."""
        name = self.canonical(requested)
        if name is None:
            self._refresh(self._members())  # a model that appeared since the last tick
            name = self.canonical(requested)
        why = self.node.observe(name if name is not None else requested, now)
        if why and requested not in self._logged:
            if len(self._logged) >= MAX_LOGGED:
                self._logged.clear()
            self._logged.add(requested)
            log.debug("request for %r: %s", requested[:128], why)
        return why

    def pin(self, name: str) -> None:
        """This node serves `name` or was started with it: demanded while it does. Past the pin limit it is
        logged, not raised (the model is still served)."""
        try:
            self.node.pin(name)
        except ValueError as exc:
            log.warning("%s; it is served but not pinned as demand", exc)

    def unpin(self, name: str) -> None:
        self.node.unpin(name)

    def absorb_client(self, sender: str, items: tuple[Item, ...], now: float) -> int:
        """Absorb the view a client pushed (mesh/demand_link.py: parsed, its pins stripped): its requests become this
        node's demand, published in this node's record. Returns how many entries counted (refused ones: debug)."""
        self._refresh(self._members())  # a model some member began to hold since the last look counts
        view = from_items(items)
        refused = self.node.absorb(view, now)
        for why in refused:
            log.debug("from client %s: %s", sender, why)
        return len(view.entries) - len(refused)

    # --- the mesh's map ----------------------------------------------------------------------------------

    def _views(self, now: float) -> list[DemandMap]:
        """The other live members' views, absorbed into this node's state (refused parts logged at debug)."""
        members = self._members()
        self._refresh(members)
        views = [self._view_of(r) for r in members if r.demand and r.node_id != self.node_id]
        for view in views:
            for why in self.node.absorb(view, now):
                log.debug("%s", why)
        return views

    def _view_of(self, record: NodeRecord) -> DemandMap:
        """A member's published view, parsed once per record version (publish and every look read them)."""
        cached = self._parsed.get(record.node_id)
        if cached is None or cached[0] != record.version:
            if len(self._parsed) >= MAX_CACHED_VIEWS:
                self._parsed.clear()  # members that left: forget them all, the live ones are parsed again
            cached = self._parsed[record.node_id] = (record.version, from_items(record.demand))
        return cached[1]

    def publish(self, now: float) -> tuple[Item, ...]:
        """This node's view for its record (`Mesh.demand`): what it observed and absorbed, hottest first, its pins."""
        self._views(now)
        return to_items(self.node.publish(now))

    def mesh_map(self, now: float) -> DemandMap:
        """The mesh's demand map at `now`: this node's state merged with the live members' views."""
        return self.node.mesh_map(self._views(now), now)

    def status(self, now: float, limit: int = MAX_STATUS) -> list[dict[str, Any]]:
        """`/api/status`'s `demand`: the hottest `limit` wanted models, each with how many members serve it."""
        serving: dict[str, int] = {}
        for r in self._members():
            for m in r.models_served:
                if m.state == "serving":
                    serving[m.name] = serving.get(m.name, 0) + 1
        return [
            {
                "model": w.name,
                "rate_per_min": round(w.rate, 3),
                "last_wanted_s_ago": round(max(0.0, now - w.last_wanted), 1) if w.last_wanted else None,
                "pinned": w.pinned,
                "servers": serving.get(w.name, 0),
            }
            for w in self.mesh_map(now).wanted(now, self.ttl_s)[:limit]
        ]


def _folded(names: frozenset[str]) -> dict[str, str]:
    """Casefolded name -> the name (names that fold alike: the first in sorted order, so every node picks it)."""
    return {n.casefold(): n for n in sorted(names, reverse=True)}


def connect(demand: MeshDemand, mesh: Mesh, state: NodeState) -> Callable[[str, bool], str | None]:
    """Publish `demand` in `mesh`'s record and show it in `state`'s `/api/status` (both on the mesh's clock);
    returns the API's per-request callback (`build_api(on_demand=...)`)."""
    clock = mesh.clock
    mesh.demand = demand.publish
    state.demand = lambda: demand.status(clock.time())

    def on_request(requested: str, served: bool) -> str | None:
        demand.want(requested, clock.time())
        return None if served else expected(demand, mesh, requested)  # the members are read only for a 404

    return on_request


def expected(demand: MeshDemand, mesh: Mesh, requested: str) -> str | None:
    """Why the mesh expects to serve `requested` soon though no node serves it now: it is a known model (catalog,
    or on a member's disk) and a standby with room for it is watching the demand — None otherwise (the API answers
    404: nobody can serve it)."""
    name = demand.canonical(requested)
    if name is None:
        return None
    entry = catalog.by_name(name)
    need = estimate_need(entry.size) if entry is not None else 0  # a file a member holds: its size is not gossiped
    standbys = [r.node_id for r in mesh.members() if r.role == "standby" and r.capacity_bytes >= need]
    if not standbys:
        return None
    return f"no node serves {name}, and {len(standbys)} standby node(s) with room may promote to serve it"

"""The mesh as placement sees it: every member that may serve, with its gossiped capacity, RTT map, files and
llama.cpp build, and this node with the RTTs it measured — the input of `placement.plan` and `serving.plan.decide`."""

from __future__ import annotations

from pathlib import Path

from inference.placement import NodeCap
from mesh_mcp.mesh.rtt import as_ms
from mesh_mcp.mesh.runtime import Mesh, llama_cpp_identity


def mesh_view(mesh: Mesh, model_path: Path, capacity_bytes: int, now: float) -> list[NodeCap]:
    """The members that may serve (not clients, not leaving) as placement sees them — gossiped capacity, RTT map,
    whether they have `model_path`'s file, llama.cpp build — and this node last (`capacity_bytes`, the RTTs it
    measured, its build)."""
    me = mesh.identity.node_id
    stem = model_path.name.removesuffix(".gguf")
    nodes = [
        NodeCap(r.node_id, r.capacity_bytes, as_ms(r.rtt), has_file=stem in r.models_on_disk, llama_cpp=r.llama_cpp)
        for r in mesh.members()
        if r.node_id != me and r.role != "client" and not r.leaving
    ]
    mine = mesh.rtt.measured(now)
    nodes.append(NodeCap(me, capacity_bytes, rtt_ms=mine, has_file=True, llama_cpp=llama_cpp_identity()))
    return nodes

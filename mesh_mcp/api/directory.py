"""Where models are served beyond this node: the seam between the API and the mesh.

The API asks a `Directory` which other nodes serve a model and opens a request on one of them.
`Solo` is the directory of a node outside any mesh; `api/mesh_directory.py`'s `MeshDirectory` is the
real one, fed by gossip and the QUIC tunnel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mesh_mcp.errors import UpstreamUnavailable
from mesh_mcp.response import Response


@dataclass(frozen=True)
class RemoteModel:
    name: str
    node_id: str
    state: str
    in_flight: int
    tools: bool | None = None  # its chat template can call tools; None: not known
    size_bytes: int = 0  # its GGUF size; 0: not known
    ctx: int = 0  # tokens one request may hold there; 0: not known
    tok_s: float = 0.0  # its measured decode speed (the record's `tps`); 0: not measured
    thinking: bool | None = None  # a thinking model (the record's `think`); None: not known


class Directory(Protocol):
    def remote_models(self) -> list[RemoteModel]: ...

    async def open(
        self, node_id: str, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response: ...


class Solo:
    def remote_models(self) -> list[RemoteModel]:
        return []

    async def open(
        self, node_id: str, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        raise UpstreamUnavailable(f"node {node_id} is not reachable: this node is in no mesh")

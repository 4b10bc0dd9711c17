"""The API's `Directory` over a running mesh: which other members serve what (their gossiped records), and a
request opened on one of them through the QUIC tunnel. Peer failures become the API's `UpstreamUnavailable`
here, so the proxy tries the next server.
"""

from __future__ import annotations

from mesh_mcp.api.directory import RemoteModel
from mesh_mcp.errors import PeerUnreachable, UpstreamUnavailable
from mesh_mcp.mesh import tunnel
from mesh_mcp.mesh.runtime import Mesh
from mesh_mcp.response import Response


class MeshDirectory:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def remote_models(self) -> list[RemoteModel]:
        out: list[RemoteModel] = []
        for record in self.mesh.members():
            if record.node_id == self.mesh.identity.node_id or record.leaving:
                continue
            out.extend(
                RemoteModel(
                    m.name, record.node_id, m.state, m.in_flight, m.tools, m.size_bytes, m.ctx, m.tps / 10, m.think
                )
                for m in record.models_served
            )
        return out

    async def open(
        self, node_id: str, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        """A request to `node_id` through the tunnel, answered once its head arrives. UpstreamUnavailable (the
        proxy tries the next server) at once for a node membership holds dead, and as soon as it is declared dead
        while we dial it or wait for the head."""
        mesh = self.mesh
        if mesh.is_gone(node_id):
            raise UpstreamUnavailable(f"node {node_id} is not reachable: the mesh declared it dead or gone")
        with mesh.cancel_when_gone(node_id):
            try:
                conn = await mesh.reach(node_id)
            except PeerUnreachable as exc:
                raise UpstreamUnavailable(str(exc)) from exc
            return await tunnel.request(conn, method, target, headers, body)
        raise UpstreamUnavailable(f"node {node_id} was declared dead before it answered")

"""In-memory `Directory` twins for the API app (`build_api(state, directory)`): remote servers that answer, or fail,
as a test tells them, without a mesh."""

from __future__ import annotations

from collections.abc import AsyncIterator

from mesh_mcp.api.directory import RemoteModel
from mesh_mcp.errors import UpstreamUnavailable
from mesh_mcp.response import Response


class FactsDirectory:
    """Remote servers that report what they know of their models (gossiped tools flag and size)."""

    def remote_models(self) -> list[RemoteModel]:
        return [
            RemoteModel("coder", "n2", "serving", 0, tools=True, size_bytes=1_117_320_768, ctx=32768),
            RemoteModel("coder", "n3", "loading", 0, ctx=8192),  # the least context any server gives counts
            RemoteModel("coder", "n4", "loading", 0),  # an older node: knows neither
            RemoteModel("old", "n3", "serving", 0),
        ]

    async def open(
        self, node_id: str, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        raise UpstreamUnavailable("not used")


class TwinDirectory:
    """An in-memory mesh: remote servers whose `open` fails or answers as told."""

    def __init__(self, answers: dict[str, bytes | None]) -> None:
        self.answers = answers
        self.tried: list[str] = []

    def remote_models(self) -> list[RemoteModel]:
        return [RemoteModel("remote-model", nid, "serving", i) for i, nid in enumerate(self.answers)]

    async def open(
        self, node_id: str, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        self.tried.append(node_id)
        answer = self.answers[node_id]
        if answer is None:
            raise UpstreamUnavailable(f"{node_id} is down")

        async def chunks() -> AsyncIterator[bytes]:
            yield answer

        return Response(200, [(b"content-type", b"application/json")], chunks())

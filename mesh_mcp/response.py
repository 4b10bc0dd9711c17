"""A streamed HTTP response whose head has arrived: the one shape both upstreams produce — the HTTP/1.1 client
of a local llama-server (`api/upstream.py`) and the mesh tunnel to another node (`mesh/tunnel.py`) — so the proxy
relays either the same way. Its failures are `UpstreamUnavailable` (before the head) and `UpstreamBroken` (after),
in the one error tree.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    _body: AsyncIterator[bytes]
    _close: list[asyncio.StreamWriter] = field(default_factory=list)
    _done: bool = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            yield chunk
        self._done = True

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._body.aclose()  # type: ignore[attr-defined]

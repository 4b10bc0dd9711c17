"""The data plane's listener reads admission time from its injected clock: a connection that stays silent is
closed by the sweep once `HANDSHAKE_TIMEOUT_S` has passed on that clock, not before. Real sockets and threads;
only the admission clock is fake (the socket's own deadline stays real, and longer than this test's bound)."""

from __future__ import annotations

import logging
import socket

import anyio
import pytest

from mesh_mcp.dataplane import limits
from mesh_mcp.dataplane.listener import DataPlaneServer
from mesh_mcp.mesh.identity import Identity
from mesh_mcp.testing.clock import FakeClock
from tests.test_dataplane import creds, nothing_leaks, run  # noqa: F401 (nothing_leaks: autouse fixture)


def test_an_unauthenticated_connection_is_swept_on_the_injected_clock(
    worker: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()

    async def main() -> None:
        async with DataPlaneServer(worker, creds(worker), "127.0.0.1", clock=clock) as server:
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            try:
                with anyio.fail_after(3):
                    while server.pending != 1:
                        await anyio.sleep(0.01)
                await clock.run_for(limits.HANDSHAKE_TIMEOUT_S - 2 * limits.SWEEP_S, step=limits.SWEEP_S)
                assert server.refused == 0 and server.pending == 1  # still within its deadline on this clock
                await clock.run_for(4 * limits.SWEEP_S, step=limits.SWEEP_S)
                # The sweep refused it; the real socket deadline (HANDSHAKE_TIMEOUT_S of real time) is not this.
                with anyio.fail_after(limits.HANDSHAKE_TIMEOUT_S - 2):
                    while server.refused != 1 or server.pending != 0:
                        await anyio.sleep(0.01)
                assert await anyio.to_thread.run_sync(raw.recv, 100) == b""  # closed by the server
            finally:
                raw.close()

    with caplog.at_level(logging.WARNING, "mesh_llm.dataplane"):
        run(main)
    assert any("did not authenticate within" in r.message for r in caplog.records), caplog.text

"""The project's test seams, shipped with it (as `trio.testing` and httpx's `MockTransport` are): a fake clock, an
in-memory mesh network and in-memory directories for the API app, so a many-node scenario is a unit test.

    clock = FakeClock()
    network = MemoryNetwork(clock, latency_s=0.01)
    mesh = Mesh(identity, config, home, state, settings, clock=clock, transport=network.transport)
    await clock.run_until(lambda: len(mesh.members()) == 20, within=60)
"""

from mesh_mcp.testing.clock import FakeClock, settle
from mesh_mcp.testing.directory import FactsDirectory, TwinDirectory
from mesh_mcp.testing.memnet import Link, MemoryConnection, MemoryNetwork, MemoryTransport, authenticate

__all__ = [
    "FactsDirectory",
    "FakeClock",
    "Link",
    "MemoryConnection",
    "MemoryNetwork",
    "MemoryTransport",
    "TwinDirectory",
    "authenticate",
    "settle",
]

"""The discovery probe (mesh_mcp/discovery/probe.py): a QUIC version-negotiation round trip to a real mesh
listener answers with a latency; a closed port, a UDP service that is not QUIC, and malformed addresses answer
None within the bound — never an error."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import anyio
import pytest

from mesh_mcp.discovery.probe import MAX_ADDRESSES, best_rtt_ms, is_answer, probe_packet, rtt_ms
from mesh_mcp.mesh import meshfile
from mesh_mcp.mesh.identity import load_or_create
from mesh_mcp.mesh.runtime import Mesh, MeshSettings
from mesh_mcp.state import NodeState


def test_the_probe_is_a_full_sized_initial_of_a_reserved_version_and_only_a_vn_to_us_answers_it() -> None:
    p = probe_packet(b"d" * 8, b"s" * 8)
    assert len(p) == 1200 and p[0] & 0xC0 == 0xC0 and p[1:5] == bytes.fromhex("1a2a3a4a")
    vn = bytes([0x80]) + b"\0\0\0\0" + bytes([8]) + b"s" * 8 + bytes([8]) + b"d" * 8 + bytes.fromhex("00000001")
    assert is_answer(vn, b"s" * 8)
    assert not is_answer(vn, b"x" * 8)  # another probe's answer
    assert not is_answer(bytes([0x80]) + bytes.fromhex("00000001") + vn[5:], b"s" * 8)  # not a VN
    assert not is_answer(b"\x80\0\0", b"s" * 8)


def test_a_real_mesh_listener_answers_and_nothing_else_does(tmp_path: Path) -> None:
    async def main() -> None:
        ident = load_or_create(tmp_path / "a")
        state = NodeState(node_id=ident.node_id, name="a", version="0", api_url="", console_url="")
        mesh = Mesh(ident, meshfile.create(owner=ident.public_bytes), tmp_path / "a", state,
                    MeshSettings(host="127.0.0.1"))  # fmt: skip
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        loop = asyncio.get_running_loop()

        class Junk(asyncio.DatagramProtocol):  # a UDP service that answers, but not QUIC
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                self.transport.sendto(b"\x80\x00\x00\x00\x00junk", addr)  # type: ignore[attr-defined]

        junk, _ = await loop.create_datagram_endpoint(Junk, local_addr=("127.0.0.1", 0))
        async with anyio.create_task_group() as tg:
            await tg.start(mesh.run)
            port = mesh.addresses[0].rsplit(":", 1)[1]
            ms = await rtt_ms(f"127.0.0.1:{port}", within_s=10)  # bounded, generous: a loaded machine answers late
            assert ms is not None and ms > 0
            silent_port, junk_port = silent.getsockname()[1], junk.get_extra_info("sockname")[1]
            with anyio.fail_after(30):  # bounded: each unanswered try waits at most within_s
                assert await rtt_ms(f"127.0.0.1:{silent_port}", within_s=0.3) is None
                assert await rtt_ms(f"127.0.0.1:{junk_port}", within_s=0.3) is None
                for bad in ("nonsense", "host:", ":80", "127.0.0.1:0", "127.0.0.1:99999", "[::1:x"):
                    assert await rtt_ms(bad, within_s=0.3) is None
                many = [f"127.0.0.1:{silent_port}"] * 10 + [f"127.0.0.1:{port}"]
                assert await best_rtt_ms(many, within_s=0.3) is None  # only the first MAX_ADDRESSES are probed
                best = await best_rtt_ms([f"127.0.0.1:{silent_port}", f"127.0.0.1:{port}"], within_s=3)
                assert best is not None
            tg.cancel_scope.cancel()
        silent.close()
        junk.close()

    assert MAX_ADDRESSES < 11
    anyio.run(main)


@pytest.mark.parametrize("address", ["localhost:1", "127.0.0.1:9"])
def test_an_unreachable_address_is_unknown_not_an_error(address: str) -> None:
    async def main() -> None:
        with anyio.fail_after(5):
            assert await rtt_ms(address, within_s=0.3) is None

    anyio.run(main)

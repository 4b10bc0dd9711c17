"""Issue 12's QUIC probe re-run against a real node: strangers open QUIC connections that complete TLS (ALPN
mesh-llm/1) and never authenticate, half of them keeping theirs alive with PINGs, from many source addresses.
Prints the node's RSS before, at the peak and after, how the connections ended, and whether an honest node joins
during the flood (before issue 12: 200 such connections stayed open, RSS 167 → 203 MB).

    python -m bench.preauth_flood --connections 200 --sources 25
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from tests.harness import NodeProcess, free_port
from tests.security.test_preauth_flood import close_all, idle_client


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def flood(port: int, n: int, sources: int, pid: int) -> dict[str, Any]:
    stack: list[Any] = []
    peak = rss_mb(pid)
    # aioquic fails a refused client's "connected" future after idle_client stopped waiting for it: not news here
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)

    async def one(i: int, out: list[Any]) -> None:
        out.append(await idle_client(port, f"127.0.1.{10 + i % sources}", stack, ping=i % 2 == 0))

    clients: list[Any] = []
    started = time.monotonic()
    try:
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i, clients)
                await anyio.sleep(0.01)
        connected = [c for c in clients if c is not None]
        while time.monotonic() - started < 15 and any(c.reason is None for c in connected):
            peak = max(peak, rss_mb(pid))
            await anyio.sleep(0.2)
        reasons = Counter((c.reason or "still open")[:60] for c in connected)
        return {
            "tried": n,
            "refused at once": n - len(connected),
            "completed TLS": len(connected),
            "ended": dict(reasons),
            "seconds until all ended": round(time.monotonic() - started, 1),
            "peak_rss_mb": round(peak, 1),
        }
    finally:
        await close_all(stack)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--sources", type=int, default=25)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        node = NodeProcess(Path(tmp) / "target", ["--client", "--mesh-host", "127.0.0.1", "--bind-port", str(port)])
        node.start()
        try:
            token = node.wait_for("token", lambda s: bool(s.get("invite_token")), 60)["invite_token"]
            assert node.proc is not None
            pid = node.proc.pid
            time.sleep(3)  # settle: the MCP SDK import and the scrubber load happen after start
            before = rss_mb(pid)
            result = asyncio.run(flood(port, args.connections, args.sources, pid))
            time.sleep(5)
            after = rss_mb(pid)
            honest = subprocess.Popen(
                [sys.executable, "-m", "mesh_mcp.cli", "--client", "--mesh-host", "127.0.0.3", "--join", token],
                env={**__import__("os").environ, "MESH_LLM_HOME": str(Path(tmp) / "honest")},
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            t = time.monotonic()
            assert honest.stdout is not None
            line = honest.stdout.readline()
            joined = time.monotonic() - t
            honest.terminate()
            honest.wait(15)
            print(f"RSS before {before:.1f} MB, peak {result.pop('peak_rss_mb')} MB, 5 s after {after:.1f} MB")
            for k, v in result.items():
                print(f"{k}: {v}")
            print(f"an honest node joined after the flood in {joined:.1f} s: {line.startswith('mesh1')}")
            print(f"log lines about refusals: {node.log().count('refused')}")
        finally:
            node.stop()


if __name__ == "__main__":
    main()

"""`mesh-llm blackboard --mcp`: the MCP tools over stdin/stdout, backed by the local node (`local.py` finds or
starts it; `HttpTools` talks to it).

stdout carries the MCP protocol: nothing here prints; logs go to stderr (logging).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from pathlib import Path

import anyio

from mesh_mcp.errors import user_error
from mesh_mcp.mcp.client import HttpTools
from mesh_mcp.mcp.local import attach_or_start
from mesh_mcp.mcp.server import build_server

log = logging.getLogger("mesh_llm.mcp")


async def run_stdio(home: Path, join: Sequence[str] = (), name: str | None = None) -> None:
    """`mesh-llm blackboard --mcp`: the MCP tools over stdin/stdout, backed by the local node.

    Returns when the client closes stdin, or on SIGTERM/SIGINT/SIGHUP; a node started for this
    session is stopped either way."""
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_signal, tg.cancel_scope)
            async with attach_or_start(home, join, name) as info:
                server = build_server(HttpTools(info.console_url, info.api_url))
                log.info("serving MCP over stdio for node %s", info.node_id)
                await server.run_stdio_async()
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The task group wraps what failed; a MeshLLMError (the node could not start) is for the user.
        if (first := user_error(group)) is None:
            raise
        raise first from None


async def _cancel_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s received: stopping", signal.Signals(signum).name)
            scope.cancel()
            return

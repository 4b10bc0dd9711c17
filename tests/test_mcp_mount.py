"""The node's own `/mcp` (`mesh_mcp.mcp.mount`): importing it leaves the MCP SDK unloaded (the node imports it at
start-up); `McpMount` passes everything but /mcp to the API, answers /mcp with 503 until `run` has loaded the
SDK, then serves the node's tools (`OwnTools`: the node's own HTTP endpoints, here a `FakeNode` behind the mount).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import anyio
import httpx2
from mcp import Client

from mesh_mcp.mcp.mount import McpMount
from tests.test_mcp_server import HEADERS, INIT, REPO, FakeNode, run, served


def test_importing_the_mount_leaves_the_mcp_sdk_unloaded() -> None:
    code = (
        "import json, sys, mesh_mcp.mcp.mount; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'mcp_types') "
        "or m in ('mesh_mcp.mcp.server', 'mesh_mcp.mcp.http_app', 'mesh_mcp.mcp.tools'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []


@dataclass
class Urls:
    """Where the node listens; like the node's state, filled in once the port is known."""

    console_url: str = ""
    api_url: str = ""


def test_mount_serves_the_api_and_its_own_tools_at_mcp_once_loaded() -> None:
    node = FakeNode()  # the node's console and API contract, as the app behind the mount
    urls = Urls()

    async def go() -> None:
        mount = McpMount(node.app, urls, allow_remote=False)
        mount.LOAD_WAIT_S = 0.2  # not loaded: an /mcp request waits this long, then gets 503
        async with served(mount) as base, httpx2.AsyncClient(timeout=10) as http:
            urls.console_url, urls.api_url = base, base + "/v1"
            assert (await http.get(base + "/v1/models")).json()["data"][2]["id"] == "Small"
            early = await http.post(base + "/mcp", json=INIT, headers=HEADERS)
            assert early.status_code == 503 and early.headers["retry-after"] == "1"
            async with anyio.create_task_group() as tg:
                mount.LOAD_WAIT_S = 60.0
                tg.start_soon(mount.run)
                async with Client(base + "/mcp") as client:  # waits for the SDK to load
                    r = await client.call_tool("mesh_models", {})
                    assert not r.is_error and r.structured_content is not None
                    assert [m["name"] for m in r.structured_content["models"]] == ["Embed", "Loading-7B", "Small"]
                    r = await client.call_tool("blackboard_post", {"text": "FINDING: the mount works"})
                    assert not r.is_error and [p["text"] for p in node.posts] == ["FINDING: the mount works"]
                tg.cancel_scope.cancel()
            assert mount.mcp is None

    run(go)

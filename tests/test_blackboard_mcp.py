"""Done-when for the blackboard: two agents on two machines, each with `mesh-llm blackboard --mcp`
(or the node's `/mcp`) in its MCP settings, post and find each other's status and questions through
the tools, with personal data scrubbed — driven by the official MCP SDK client against real nodes."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp_types import CallToolResult, TextContent

from mesh_mcp.mcp.local import read_runtime
from tests.conftest import SMOLLM
from tests.harness import NodeProcess, pid_alive

pytestmark = pytest.mark.slow
Spawn = Callable[..., NodeProcess]
REPO = Path(__file__).resolve().parent.parent
TOOLS = {"blackboard_post", "blackboard_search", "blackboard_feed", "mesh_models", "mesh_status", "mesh_ask"}


def stdio(home: Path, *args: str) -> StdioServerParameters:
    """What an agent's MCP settings hold: `mesh-llm blackboard --mcp` (here via this Python)."""
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mesh_mcp.cli", "blackboard", "--mcp", *args],
        env={"MESH_LLM_HOME": str(home), "PATH": os.environ.get("PATH", "")},
        cwd=REPO,
    )


def text(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def data(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    return result.structured_content


def node(spawn: Spawn, name: str, ip: str, *args: str) -> NodeProcess:
    n = spawn("--mesh-host", ip, "--name", name, *args, name=name)
    n.wait_for("up", lambda s: bool(s.get("invite_token")), timeout=60)
    return n


def test_two_agents_on_two_nodes_coordinate_through_mcp(spawn: Spawn, tmp_path: Path) -> None:
    alice = node(spawn, "alice", "127.0.0.2", "--blackboard")
    bob = node(spawn, "bob", "127.0.0.3", "--join", alice.status()["invite_token"])
    bob.wait_for("mesh", lambda s: len(s.get("peers", [])) >= 2, timeout=30)
    errlog = tmp_path / "mcp-stderr.log"

    async def agents() -> None:
        with open(errlog, "w") as err:
            async with (
                Client(stdio_client(stdio(alice.home), errlog=err)) as a,  # agent A: stdio, attached to alice
                Client(bob.api.removesuffix("/v1") + "/mcp") as b,  # agent B: the node's streamable HTTP
            ):
                assert {t.name for t in (await a.list_tools()).tools} == TOOLS
                assert {t.name for t in (await b.list_tools()).tools} == TOOLS
                status = data(await a.call_tool("blackboard_post", {"text": "STATUS: [acme/shop branch:main] billing"}))
                assert status["author"] == "alice" and status["kind"] == "STATUS"
                question = data(
                    await b.call_tool(
                        "blackboard_post",
                        {
                            "text": "QUESTION: who touched billing? mail me at bob.smith@example.org",
                            "author": "bob-agent",
                        },
                    )
                )
                assert "bob.smith@example.org" not in question["text"], "scrubbed before it is stored or sent"
                found: list[dict[str, Any]] = []
                with anyio.fail_after(15):
                    while not {status["id"], question["id"]} <= {p["id"] for p in found}:
                        await anyio.sleep(0.1)
                        found = data(await b.call_tool("blackboard_search", {"query": "billing"}))["posts"]
                answer = data(
                    await a.call_tool("blackboard_post", {"text": "ANSWER: alice is on it", "reply_to": question["id"]})
                )
                with anyio.fail_after(15):
                    while True:
                        feed = data(await b.call_tool("blackboard_feed", {"kind": "ANSWER"}))["posts"]
                        if feed:
                            break
                        await anyio.sleep(0.1)
                assert feed[0]["id"] == answer["id"] and feed[0]["reply_to"] == question["id"]
                mine = data(await a.call_tool("blackboard_feed", {"author": "bob-agent", "since_hours": 1}))["posts"]
                assert [p["id"] for p in mine] == [question["id"]]
                st = data(await a.call_tool("mesh_status", {}))
                assert "invite_token" not in json.dumps(st) and alice.status()["invite_token"] not in json.dumps(st)
                assert data(await b.call_tool("mesh_models", {}))["models"] == []
                r = await a.call_tool("mesh_ask", {"question": "hi"})
                assert r.is_error and "model" in text(r)
                r = await a.call_tool("blackboard_search", {"query": ""})
                assert r.is_error
                r = await a.call_tool("blackboard_post", {"text": "x" * 5000})
                assert r.is_error and "4096" in text(r)

    anyio.run(agents)
    assert "Traceback" not in errlog.read_text(), errlog.read_text()
    assert read_runtime(alice.home) is not None, "attaching does not disturb the running node"


def test_stdio_with_no_node_running_starts_a_client_and_cleans_it_up(spawn: Spawn, tmp_path: Path) -> None:
    alice = node(spawn, "alice", "127.0.0.2", "--blackboard")
    token = alice.status()["invite_token"]
    home = tmp_path / "laptop"
    errlog = tmp_path / "mcp-stderr.log"
    started: dict[str, Any] = {}

    async def agent() -> None:
        with open(errlog, "w") as err:
            async with Client(stdio_client(stdio(home, "--join", token, "--name", "laptop"), errlog=err)) as c:
                post = data(await c.call_tool("blackboard_post", {"text": "FINDING: CI needs 2 cores"}))
                assert post["author"] == "laptop"
                info = read_runtime(home)
                assert info is not None
                started["pid"] = info.pid
                st = data(await c.call_tool("mesh_status", {}))
                assert st.get("node_id") == info.node_id

    anyio.run(agent)
    alice_posts = []
    for _ in range(100):
        import httpx2

        alice_posts = httpx2.get(alice.console + "/api/blackboard", params={"q": "cores"}).json()["posts"]
        if alice_posts:
            break
        anyio.run(anyio.sleep, 0.1)
    assert [p["text"] for p in alice_posts] == ["FINDING: CI needs 2 cores"]
    # the node started for the agent is gone with it
    for _ in range(100):
        if not pid_alive(started["pid"]):
            break
        anyio.run(anyio.sleep, 0.1)
    assert not pid_alive(started["pid"]) and read_runtime(home) is None


def test_mesh_ask_answers_with_a_model_of_the_mesh(spawn: Spawn) -> None:
    host = spawn("--mesh-host", "127.0.0.2", "--model", SMOLLM, "--llama-arg=--temp", "--llama-arg=0", name="host")
    host.wait_model_state(SMOLLM, "serving", timeout=180)
    client = node(spawn, "agent", "127.0.0.3", "--client", "--blackboard", "--join", host.status()["invite_token"])

    async def agent() -> None:
        async with Client(client.api.removesuffix("/v1") + "/mcp") as c:
            with anyio.fail_after(30):
                while not (models := data(await c.call_tool("mesh_models", {}))["models"]):
                    await anyio.sleep(0.2)
            assert models[0]["name"] == SMOLLM and host.status()["node_id"] in models[0]["nodes"]
            r = data(await c.call_tool("mesh_ask", {"question": "Say hello.", "max_tokens": 8}))
            assert r["model"] == SMOLLM and r["answer"].strip()
            r2 = await c.call_tool("mesh_ask", {"question": "hi", "model": "no-such-model"})
            assert r2.is_error and "no-such-model" in text(r2)

    anyio.run(agent)

"""The README's agent config snippets parse and would launch the blackboard's MCP server.

The section "## Agents: the blackboard over MCP" holds JSON blocks for Claude Code (`mcpServers`: a stdio server
running `mesh-llm blackboard --mcp`, and the HTTP alternative) and a YAML block for Goose's `extensions:`. Each is
parsed as the agent would parse it and checked for the command, its arguments and the URL. The README also keeps
exactly two set-up commands.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTION = "## Agents: the blackboard over MCP"
COMMAND = "mesh-llm"
ARGS = ["blackboard", "--mcp"]
URL = "http://localhost:9337/mcp"
# goose crates/goose/src/agents/extension.rs: ExtensionConfig::Stdio, flattened into config's ExtensionEntry
GOOSE_STDIO_FIELDS = {
    "enabled",
    "type",
    "name",
    "description",
    "cmd",
    "args",
    "envs",
    "env_keys",
    "timeout",
    "bundled",
    "available_tools",
}

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def blocks(text: str, lang: str) -> list[str]:
    return [body for tag, body in _FENCE.findall(text) if tag == lang]


def mcp_servers() -> list[dict[str, Any]]:
    servers: list[dict[str, Any]] = []
    for body in blocks(section(SECTION), "json"):
        config = json.loads(body)
        assert set(config) == {"mcpServers"}, config
        for name, server in config["mcpServers"].items():
            assert isinstance(server, dict), name
            servers.append(server)
    return servers


def test_section_has_the_snippets() -> None:
    text = section(SECTION)
    assert len(blocks(text, "json")) == 2
    assert len(blocks(text, "yaml")) == 1
    assert "mesh-llm blackboard install-skill" in text


def test_the_sections_commands_parse_with_the_real_cli() -> None:
    """Every `mesh-llm` line shown in the section (and the snippets' arguments) is accepted by the CLI."""
    from mesh_mcp import cmd_blackboard
    from mesh_mcp.cli import _node_parser

    lines = [line.split("  #")[0].strip() for body in blocks(section(SECTION), "bash") for line in body.splitlines()]
    commands = [shlex.split(line) for line in lines if line.startswith("mesh-llm ")]
    assert len(commands) >= 4
    for argv in [*commands, [COMMAND, *ARGS]]:
        assert argv[0] == COMMAND
        if argv[1] == "blackboard":
            cmd_blackboard.parser().parse_args(argv[2:])
        else:
            _node_parser().parse_args(argv[1:])


def test_claude_code_stdio_snippet_launches_the_mcp_server() -> None:
    stdio = [s for s in mcp_servers() if s.get("type", "stdio") == "stdio"]
    assert len(stdio) == 1
    (server,) = stdio
    assert server["command"] == COMMAND
    assert server["args"] == ARGS
    assert set(server) <= {"type", "command", "args", "env"}


def test_claude_code_http_snippet_points_at_the_node() -> None:
    http = [s for s in mcp_servers() if s.get("type") == "http"]
    assert http == [{"type": "http", "url": URL}]


def test_goose_snippet_is_a_stdio_extension() -> None:
    (body,) = blocks(section(SECTION), "yaml")
    config = yaml.safe_load(body)
    assert set(config) == {"extensions"}
    ((key, ext),) = config["extensions"].items()
    assert set(ext) <= GOOSE_STDIO_FIELDS, set(ext) - GOOSE_STDIO_FIELDS
    assert ext["type"] == "stdio"
    assert ext["name"] == key  # goose keys an extension by its name
    assert ext["enabled"] is True
    assert ext["cmd"] == COMMAND
    assert ext["args"] == ARGS
    assert isinstance(ext["timeout"], int) and ext["timeout"] > 0
    assert isinstance(ext.get("envs", {}), dict)


def test_readme_keeps_two_setup_commands() -> None:
    commands = blocks(section("## Two commands"), "bash")
    assert len(commands) == 2
    assert all(len(c.strip().splitlines()) == 1 for c in commands)


# --- coding agents on the mesh's models: the launchers, pi and opencode ------------------------------------------

AGENTS_SECTION = "## Coding agents on the mesh's models"
OPENAI_ROOT = "http://127.0.0.1:9337/v1"  # a node's OpenAI-compatible API (default port)


def agent_configs() -> dict[str, dict[str, Any]]:
    """The section's JSON blocks, keyed by the agent they configure (pi: `providers`, opencode: `provider`)."""
    out: dict[str, dict[str, Any]] = {}
    for body in blocks(section(AGENTS_SECTION), "json"):
        config = json.loads(body)
        out["pi" if "providers" in config else "opencode"] = config
    return out


def test_agents_section_has_the_snippets() -> None:
    text = section(AGENTS_SECTION)
    assert len(blocks(text, "bash")) == 1
    assert set(agent_configs()) == {"pi", "opencode"}
    assert "~/.pi/agent/models.json" in text and "opencode.json" in text


def test_the_launcher_commands_parse_with_the_real_cli() -> None:
    from mesh_mcp.cmd_agents import AGENTS, parser

    (body,) = blocks(section(AGENTS_SECTION), "bash")
    commands = [shlex.split(line.split("  #")[0]) for line in body.splitlines() if line.startswith("mesh-llm ")]
    assert {argv[1] for argv in commands} == set(AGENTS)
    for argv in commands:
        own = argv[2 : argv.index("--")] if "--" in argv else argv[2:]
        parser(argv[1]).parse_args(own)


def test_pi_snippet_is_an_openai_completions_provider_for_the_node() -> None:
    from inference.catalog import by_name
    from mesh_mcp.mcp.local import DEFAULT_API_PORT

    config = agent_configs()["pi"]
    assert set(config) == {"providers"}
    ((name, provider),) = config["providers"].items()
    assert provider["baseUrl"] == OPENAI_ROOT and f":{DEFAULT_API_PORT}/" in provider["baseUrl"]
    assert provider["api"] == "openai-completions"
    assert isinstance(provider["apiKey"], str) and provider["apiKey"]  # pi requires one; the mesh ignores it
    assert provider["models"] and all(by_name(m["id"]) is not None for m in provider["models"])
    assert all(isinstance(m.get("contextWindow", 1), int) for m in provider["models"])
    assert f"pi --provider {name} --model" in section(AGENTS_SECTION)


def test_opencode_snippet_is_an_openai_compatible_provider_for_the_node() -> None:
    from inference.catalog import by_name

    config = agent_configs()["opencode"]
    assert config["$schema"] == "https://opencode.ai/config.json"
    ((name, provider),) = config["provider"].items()
    assert provider["npm"] == "@ai-sdk/openai-compatible"
    assert provider["options"]["baseURL"] == OPENAI_ROOT
    assert provider["models"] and all(by_name(model) is not None for model in provider["models"])
    for model in provider["models"]:
        assert f"opencode -m {name}/{model}" in section(AGENTS_SECTION)

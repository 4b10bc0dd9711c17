"""`mesh-llm goose` and `mesh-llm claude`: the model rule and the config/env they write (pure), and real launches.

The real launches put fake `goose` and `claude` executables on PATH (Python scripts written here). Each records its
argv and environment and does what the real agent does with what it was given: a tool-call round trip with the
official SDK (openai against the URL in Goose's provider file, anthropic against ANTHROPIC_BASE_URL), the first turn
streamed. The model is SmolLM2 served with a Hermes/Qwen-style tool template (tests/data/hermes-tools.jinja, taken
from Qwen2.5's GGUF); its turn opens with `<tool_call>\\n` as an assistant prefill and `tool_choice` required/any, so
llama-server's grammar makes the call deterministic (docs/notes/llama.cpp.md). Every launch must leave no node behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mesh_mcp import agents
from mesh_mcp.agents import MeshModel, NotYet, Picked
from mesh_mcp.cmd_agents import write_json
from tests.conftest import SMOLLM
from tests.harness import NodeProcess, free_port, pid_alive

Spawn = Callable[..., NodeProcess]
REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "tests" / "data" / "hermes-tools.jinja"

# --- the model rule ----------------------------------------------------------------------------------------------


def m(name: str, tools: bool | None, size: int = 0, state: str = "serving") -> MeshModel:
    return MeshModel(name, state, tools, size)


def test_the_strongest_tool_capable_model_is_picked() -> None:
    models = [
        m("Huge-70B-no-tools", False, 40_000_000_000),
        m("Qwen2.5-Coder-1.5B", True, 1_117_320_768),
        m("Qwen2.5-Coder-0.5B", True, 491_400_064),
        m("Old-node-model", None, 9_000_000_000),  # tool support unknown: not counted
        m("Big-coder-loading", True, 20_000_000_000, state="loading"),  # not serving yet
    ]
    choice = agents.pick_model(models, None)
    assert isinstance(choice, Picked) and choice.name == "Qwen2.5-Coder-1.5B"
    assert "largest of 2 tool-capable" in choice.why and "1.1 GB" in choice.why


def test_ties_and_unknown_sizes() -> None:
    assert agents.pick_model([m("b", True), m("a", True)], None) == agents.pick_model(
        [m("a", True), m("b", True)], None
    )
    choice = agents.pick_model([m("sized", True, 5), m("unsized", True)], None)
    assert isinstance(choice, Picked) and choice.name == "sized"


def test_model_given_is_matched_like_the_api_does() -> None:
    models = [m("SmolLM2-135M-Instruct-Q4_1", False, 98_000_000), m("Qwen2.5-Coder-1.5B-Instruct-Q4_K_M", True)]
    choice = agents.pick_model(models, "smollm2")
    assert isinstance(choice, Picked) and choice.name == "SmolLM2-135M-Instruct-Q4_1"
    assert "NO tool calls" in choice.why  # chosen anyway, and said so
    missing = agents.pick_model(models, "llama")
    assert isinstance(missing, NotYet) and not missing.loading and "no model named 'llama'" in missing.message
    loading = agents.pick_model([m("Big", True, state="loading")], "big")
    assert isinstance(loading, NotYet) and loading.loading


def test_no_tool_capable_model_says_so_and_lists_the_models() -> None:
    choice = agents.pick_model([m("SmolLM2", False, 98_000_000), m("Embed", None, state="serving")], None)
    assert isinstance(choice, NotYet) and not choice.loading
    assert "no model on the mesh can call tools" in choice.message
    assert "SmolLM2 (serving, no tools, 98 MB)" in choice.message and "Embed (serving, tools unknown" in choice.message
    waiting = agents.pick_model([m("SmolLM2", False), m("Coder", None, state="loading")], None)
    assert isinstance(waiting, NotYet) and waiting.loading
    empty = agents.pick_model([], None)
    assert isinstance(empty, NotYet) and empty.loading and "no model" in empty.message


def test_models_are_read_from_the_api_leniently() -> None:
    body = {
        "data": [
            {"id": "a", "state": "serving", "capabilities": {"tools": True}, "size_bytes": 7},
            {"id": "b", "capabilities": "weird", "size_bytes": -1},
            {"no": "id"},
            "junk",
        ]
    }
    assert agents.parse_models(body) == [m("a", True, 7), m("b", None)]
    assert agents.parse_models(["not", "an", "object"]) == []


# --- the config and environment each agent gets ---------------------------------------------------------------


def test_claude_is_warned_when_the_model_cannot_hold_its_prompt() -> None:
    small = MeshModel("SmolLM2", "serving", True, 98_000_000, context=8192)
    big = MeshModel("Qwen", "serving", True, 1_117_320_768, context=32768)
    unknown = MeshModel("Old", "serving", True, 1)
    warning = agents.context_warning("claude", small)
    assert warning is not None and "8192 tokens per request" in warning and "--ctx-size 32768" in warning
    assert agents.context_warning("claude", big) is None and agents.context_warning("claude", unknown) is None
    assert agents.context_warning("goose", small) is None
    models = agents.parse_models({"data": [{"id": "q", "state": "serving", "context_length": 32768}, {"id": "o"}]})
    assert [m.context for m in models] == [32768, 0]


def test_goose_gets_each_models_context_unless_the_user_set_one() -> None:
    out = agents.goose_provider(
        {"models": [{"name": "a", "context_limit": 2000}]}, "http://n/v1", ["a", "b", "c"], {"a": 9000, "b": 32768}
    )
    assert [(m["name"], m["context_limit"]) for m in out["models"]] == [("a", 2000), ("b", 32768), ("c", 4096)]


def test_goose_provider_merge_keeps_what_the_user_has(tmp_path: Path) -> None:
    mine = {
        "name": "mesh",
        "engine": "anthropic",
        "display_name": "My mesh",
        "base_url": "http://elsewhere:1/v1",
        "base_path": "v1/old",
        "timeout_seconds": 900,
        "headers": {"X-Team": "blue"},
        "models": [{"name": "Qwen-coder", "context_limit": 32768}, {"name": "gone-model", "context_limit": 1}],
    }
    out = agents.goose_provider(mine, "http://127.0.0.1:9337", ["Qwen-coder", "SmolLM2"])
    assert out["engine"] == "openai" and out["name"] == "mesh" and out["requires_auth"] is False
    assert out["base_url"] == "http://127.0.0.1:9337/v1/chat/completions" and "base_path" not in out
    assert out["display_name"] == "My mesh" and out["timeout_seconds"] == 900 and out["headers"] == {"X-Team": "blue"}
    assert out["models"] == [
        {"name": "Qwen-coder", "context_limit": 32768},  # the user's own limit survives
        {"name": "SmolLM2", "context_limit": agents.DEFAULT_CONTEXT},
    ]
    assert mine["engine"] == "anthropic", "the input is not changed"
    fresh = agents.goose_provider(None, "http://127.0.0.1:9400/", ["X"])
    assert fresh["base_url"] == "http://127.0.0.1:9400/v1/chat/completions" and fresh["api_key_env"]
    # written atomically, next to the user's other providers, which stay as they were
    d = tmp_path / "custom_providers"
    write_json(d / "custom_other.json", {"name": "custom_other"})
    write_json(d / "mesh.json", out)
    assert json.loads((d / "mesh.json").read_text()) == out
    assert sorted(p.name for p in d.iterdir()) == ["custom_other.json", "mesh.json"]


def test_goose_config_dir_follows_xdg(tmp_path: Path) -> None:
    assert agents.goose_config_dir({}, tmp_path) == tmp_path / ".config" / "goose"
    assert agents.goose_config_dir({"XDG_CONFIG_HOME": "/x"}, tmp_path) == Path("/x/goose")


def test_agent_environments() -> None:
    base = {"PATH": "/bin", "ANTHROPIC_API_KEY": "sk-real", "GOOSE_MODEL": "gpt-4o"}
    claude = agents.claude_env(base, "http://127.0.0.1:9337/", "Qwen")
    assert claude["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9337" and claude["ANTHROPIC_AUTH_TOKEN"]
    assert "ANTHROPIC_API_KEY" not in claude and claude["PATH"] == "/bin"
    assert all(claude[v] == "Qwen" for v in agents.CLAUDE_MODEL_VARS)
    assert claude["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    goose = agents.goose_env(base, "Qwen")
    assert goose["GOOSE_PROVIDER"] == "mesh" and goose["GOOSE_MODEL"] == "Qwen" and goose[agents.GOOSE_KEY_ENV]
    assert base["GOOSE_MODEL"] == "gpt-4o"
    assert agents.exit_status(3) == 3 and agents.exit_status(-signal.SIGKILL) == 137


def test_a_missing_agent_says_how_to_install_it(tmp_path: Path) -> None:
    for agent, hint in (("goose", "block.github.io/goose"), ("claude", "npm install -g @anthropic-ai/claude-code")):
        r = launcher(tmp_path, agent, path=str(tmp_path / "empty-bin")).wait_done()
        assert r.returncode == 127, r.stderr
        assert "is not installed" in r.stderr and hint in r.stderr
        assert not (tmp_path / "home" / "logs").exists(), "no node was started for nothing"


# --- real launches -------------------------------------------------------------------------------------------------

FAKE_AGENT = r"""
import json, os, signal, sys, time
from pathlib import Path

agent = Path(sys.argv[0]).name
mode = os.environ.get("FAKE_AGENT_MODE", "roundtrip")
home = Path(os.environ["MESH_LLM_HOME"])
node = json.loads((home / "node.json").read_text()) if (home / "node.json").exists() else {}
out = {"agent": agent, "argv": sys.argv[1:], "pid": os.getpid(), "node_pid": node.get("pid"),
       "env": {k: v for k, v in os.environ.items() if k.startswith(("ANTHROPIC_", "GOOSE_", "CLAUDE_", "MESH_LLM"))}}
record = Path(os.environ["FAKE_AGENT_RECORD"])

def save():
    record.write_text(json.dumps(out))

TOOL = {"name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = {"role": "user", "content": "What is the weather in Paris?"}
PREFILL = "<tool_call>\n"  # the model's turn starts a call; llama-server's grammar finishes it

def goose():
    from openai import OpenAI
    providers = Path.home() / ".config/goose/custom_providers"
    cfg = json.loads((providers / (os.environ["GOOSE_PROVIDER"] + ".json")).read_text())
    out["provider"] = cfg
    client = OpenAI(base_url=cfg["base_url"].removesuffix("/chat/completions"), api_key=os.environ[cfg["api_key_env"]])
    model = os.environ["GOOSE_MODEL"]
    tools = [{"type": "function", "function": TOOL}]
    calls, chunks = {}, 0
    stream = client.chat.completions.create(model=model, messages=[ASK, {"role": "assistant", "content": PREFILL}],
        tools=tools, tool_choice="required", temperature=0, max_tokens=80, stream=True)
    for chunk in stream:
        chunks += 1
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            c = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            c["id"] += d.id or ""
            c["name"] += (d.function.name or "") if d.function else ""
            c["arguments"] += (d.function.arguments or "") if d.function else ""
    call = calls[0]
    out["tool_call"] = {"name": call["name"], "input": json.loads(call["arguments"]), "chunks": chunks}
    history = [ASK, {"role": "assistant", "content": None, "tool_calls": [{"id": call["id"], "type": "function",
               "function": {"name": call["name"], "arguments": call["arguments"]}}]},
               {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]
    final = client.chat.completions.create(model=model, messages=history, tools=tools, temperature=0, max_tokens=30)
    out["answer"] = final.choices[0].message.content

def claude():
    import anthropic
    client = anthropic.Anthropic()  # ANTHROPIC_BASE_URL, ANTHROPIC_AUTH_TOKEN
    model = os.environ["ANTHROPIC_MODEL"]
    tools = [{"name": TOOL["name"], "description": TOOL["description"], "input_schema": TOOL["parameters"]}]
    with client.messages.stream(model=model, max_tokens=80, tools=tools, tool_choice={"type": "any"},
                                messages=[ASK, {"role": "assistant", "content": PREFILL}]) as stream:
        events = [e.type for e in stream]
        msg = stream.get_final_message()
    uses = [b for b in msg.content if b.type == "tool_use"]
    out["tool_call"] = {"name": uses[0].name, "input": uses[0].input, "stop_reason": msg.stop_reason,
                        "deltas": events.count("input_json")}
    calls = [b.model_dump(include={"type", "id", "name", "input"}) for b in uses]
    history = [ASK, {"role": "assistant", "content": calls},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": b.id, "content": "sunny, 21 C"}
                                            for b in uses]}]
    final = client.messages.create(model=model, max_tokens=30, tools=tools, messages=history)
    out["answer"] = "".join(b.text for b in final.content if b.type == "text")

if mode == "roundtrip":
    goose() if agent == "goose" else claude()
    if os.environ.get("FAKE_AGENT_WAIT_PEERS"):  # the started node saves the members it knows every 2 s
        deadline = time.monotonic() + 15
        while not (home / "peers.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    save()
elif mode.startswith("exit:"):
    save()
    sys.exit(int(mode[5:]))
elif mode == "crash":
    save()
    os.kill(os.getpid(), signal.SIGKILL)
elif mode == "sleep":  # an interactive session: Ctrl-C (SIGINT to the terminal's process group) ends it
    save()
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        sys.exit(130)
"""


class Launcher:
    def __init__(self, proc: subprocess.Popen[str], record: Path, stderr: Path) -> None:
        self.proc, self.record_path, self.stderr_path = proc, record, stderr
        self.returncode: int | None = None

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def record(self) -> dict[str, Any]:
        assert self.record_path.exists(), f"the agent never ran\n{self.stderr}"
        return json.loads(self.record_path.read_text())  # type: ignore[no-any-return]

    def wait_done(self, timeout: float = 180) -> Launcher:
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self


def launcher(
    tmp_path: Path,
    agent: str,
    *args: str,
    home: Path | None = None,
    path: str | None = None,
    env: dict[str, str] | None = None,
    tag: str = "run",
) -> Launcher:
    """`mesh-llm AGENT ARGS` as a user runs it (own session, like a terminal's job), fake agents on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("goose", "claude"):
        exe = bin_dir / name
        exe.write_text(f"#!{sys.executable}\n{FAKE_AGENT}")
        exe.chmod(0o755)
    record, stderr = tmp_path / f"{tag}-record.json", tmp_path / f"{tag}-stderr.log"
    user_home = tmp_path / "user"
    user_home.mkdir(exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if k not in ("XDG_CONFIG_HOME", "ANTHROPIC_API_KEY")}
    full_env.update(
        {
            "PATH": path if path is not None else f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(user_home),
            "MESH_LLM_HOME": str(home or tmp_path / "home"),
            "FAKE_AGENT_RECORD": str(record),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
    )
    with open(stderr, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh_mcp.cli", agent, *args],
            env=full_env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    return Launcher(proc, record, stderr)


def wait_gone(pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive {timeout} s after the agent exited"
        time.sleep(0.1)


def tool_host(spawn: Spawn, name: str = "host", ip: str = "127.0.0.2", tools: bool = True) -> NodeProcess:
    args = ["--mesh-host", ip, "--model", SMOLLM, "--parallel", "2", "--llama-arg=--temp", "--llama-arg=0"]
    if tools:
        args += ["--llama-arg=--chat-template-file", f"--llama-arg={TEMPLATE}"]
    host = spawn(*args, name=name)
    host.wait_model_state(SMOLLM, "serving", timeout=180)
    return host


def check_round_trip(rec: dict[str, Any]) -> None:
    assert rec["tool_call"]["name"] == "get_weather" and rec["tool_call"]["input"] == {"city": "Paris"}, rec
    assert "sunny" in rec["answer"], rec  # SmolLM2 repeats the tool's result


@pytest.mark.slow
def test_claude_starts_a_node_runs_a_tool_round_trip_and_leaves_nothing(spawn: Spawn, tmp_path: Path) -> None:
    host = tool_host(spawn)
    models = host.status()["models"]
    assert models[0]["tools"] is True and models[0]["size_bytes"] > 0, "from llama-server's /props"
    token = host.status()["invite_token"]
    port = free_port()
    env = {"FAKE_AGENT_WAIT_PEERS": "1"}
    run = launcher(tmp_path, "claude", "--join", token, "--port", str(port), "--", "-p", "hi", env=env).wait_done()
    assert run.returncode == 0, run.stderr
    rec = run.record()
    check_round_trip(rec)
    assert rec["tool_call"]["stop_reason"] == "tool_use" and rec["tool_call"]["deltas"] > 1, "streamed"
    assert rec["argv"] == ["-p", "hi"]
    assert rec["env"]["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{port}"
    assert all(rec["env"][v] == SMOLLM for v in agents.CLAUDE_MODEL_VARS)
    assert f"claude on {SMOLLM}" in run.stderr and "tool-capable" in run.stderr
    assert rec["node_pid"] and rec["node_pid"] != host.proc.pid  # type: ignore[union-attr]
    wait_gone(rec["node_pid"])
    assert not (tmp_path / "home" / "node.json").exists()

    # The same home without --join: the node started now rejoins the mesh this machine used last
    # (mesh.toml + peers.json), finds the model again, and goes when the agent is interrupted (Ctrl-C).
    assert (tmp_path / "home" / "peers.json").exists() and (tmp_path / "home" / "mesh.toml").exists()
    run2 = launcher(tmp_path, "claude", "--port", str(free_port()), env={"FAKE_AGENT_MODE": "sleep"}, tag="ctrl-c")
    deadline = time.monotonic() + 90
    while not run2.record_path.exists():
        assert run2.proc.poll() is None and time.monotonic() < deadline, run2.stderr
        time.sleep(0.1)
    rec2 = run2.record()
    assert rec2["env"]["ANTHROPIC_MODEL"] == SMOLLM and rec2["argv"] == []
    os.killpg(run2.proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    assert run2.wait_done(30).returncode == 130, run2.stderr
    wait_gone(rec2["node_pid"])
    assert not pid_alive(rec2["pid"])


@pytest.mark.slow
def test_goose_uses_the_running_node_and_keeps_the_users_providers(spawn: Spawn, tmp_path: Path) -> None:
    host = tool_host(spawn)
    providers = tmp_path / "user" / ".config" / "goose" / "custom_providers"
    write_json(providers / "custom_ollama.json", {"name": "custom_ollama", "engine": "ollama"})
    write_json(providers / "mesh.json", {"name": "mesh", "timeout_seconds": 900, "models": []})
    run = launcher(tmp_path, "goose", "--port", str(host.api_port), home=host.home).wait_done()
    assert run.returncode == 0, run.stderr
    rec = run.record()
    check_round_trip(rec)
    assert rec["tool_call"]["chunks"] > 2, "streamed"
    assert rec["argv"] == ["session"]
    assert rec["env"]["GOOSE_PROVIDER"] == "mesh" and rec["env"]["GOOSE_MODEL"] == SMOLLM
    assert rec["node_pid"] == host.proc.pid, "the running node was used"  # type: ignore[union-attr]
    cfg = json.loads((providers / "mesh.json").read_text())
    assert cfg["timeout_seconds"] == 900 and cfg["base_url"] == f"{host.api}/v1/chat/completions"
    assert [m["name"] for m in cfg["models"]] == [SMOLLM]
    assert json.loads((providers / "custom_ollama.json").read_text()) == {"name": "custom_ollama", "engine": "ollama"}
    assert host.proc.poll() is None, "a node the launcher did not start is left running"  # type: ignore[union-attr]

    # `--` passes the agent's own command; a crash of the agent is its exit status
    crash = launcher(tmp_path, "goose", "--port", str(host.api_port), "--", "run", "-t", "hi", home=host.home,
                     env={"FAKE_AGENT_MODE": "crash"}, tag="crash").wait_done()  # fmt: skip
    assert crash.returncode == 128 + signal.SIGKILL and crash.record()["argv"] == ["run", "-t", "hi"]


@pytest.mark.slow
def test_no_tool_capable_model_is_named_and_the_node_still_goes(spawn: Spawn, tmp_path: Path) -> None:
    host = tool_host(spawn, tools=False)  # SmolLM2's own template has no tool calls
    assert host.status()["models"][0]["tools"] is False
    token = host.status()["invite_token"]
    run = launcher(tmp_path, "claude", "--join", token, "--port", str(free_port()), "--wait", "30").wait_done()
    assert run.returncode == 1 and not run.record_path.exists(), run.stderr
    assert "no model on the mesh can call tools" in run.stderr and f"{SMOLLM} (serving, no tools" in run.stderr
    started = [line for line in run.stderr.splitlines() if "started node" in line]
    assert started, run.stderr
    pid = int(started[0].split("pid ")[1].split(",")[0])
    wait_gone(pid)
    # --model picks it anyway (said so), and the agent's exit status comes back
    forced = launcher(tmp_path, "goose", "--join", token, "--port", str(free_port()), "--model", "smollm2",
                      env={"FAKE_AGENT_MODE": "exit:3"}, tag="forced").wait_done()  # fmt: skip
    assert forced.returncode == 3 and "NO tool calls" in forced.stderr, forced.stderr
    wait_gone(forced.record()["node_pid"])

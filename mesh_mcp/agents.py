"""What `mesh-llm goose` and `mesh-llm claude` decide, without I/O: which model of the mesh an agent
gets, Goose's provider file merged into what the user has, and each agent's environment.

The model rule (`pick_model`): `--model` names one (matched like the API matches `model`: exact, then
case-insensitive, then a unique prefix); otherwise the strongest *tool-capable* model that is serving:
a model can call tools when the chat template its llama-server uses does (`/v1/models`
`capabilities.tools`, gossiped from the serving node), and among those the largest GGUF
(`size_bytes`) is taken as the strongest, ties by name. A model whose tool support is not known (a
node of an older version) does not count as tool-capable. `cmd_agents.py` runs the processes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh_mcp.api.router import match_model

SERVING = "serving"

GOOSE_PROVIDER = "mesh"  # ~/.config/goose/custom_providers/mesh.json, selected with GOOSE_PROVIDER=mesh
GOOSE_KEY_ENV = "MESH_LLM_API_KEY"  # the provider's api_key_env; the mesh needs no key, older goose wants one
DEFAULT_CONTEXT = 4096  # tokens: mesh-llm's default --ctx-size per slot, unless the user's file says otherwise
# Claude Code sends its instructions and tool definitions with every request: 20,310 tokens measured with
# Claude Code 2.1.197 `-p` (24 tools), before the user's first word.
CLAUDE_PROMPT_TOKENS = 20_310
DUMMY_KEY = "mesh-llm"  # the mesh's API takes no key; clients that insist on one get this

INSTALL = {
    "goose": "Goose is not installed (no `goose` on PATH). Install it: "
    "https://block.github.io/goose/docs/getting-started/installation "
    "(Linux/macOS: `curl -fsSL https://github.com/block/goose/releases/download/stable/download_cli.sh | bash`).",
    "claude": "Claude Code is not installed (no `claude` on PATH). Install it: "
    "`npm install -g @anthropic-ai/claude-code` (Node.js 18+), see https://code.claude.com/docs.",
}


@dataclass(frozen=True)
class MeshModel:
    """One entry of a node's `/v1/models`."""

    name: str
    state: str
    tools: bool | None  # its chat template can call tools; None: not known
    size_bytes: int  # 0: not known
    context: int = 0  # tokens one request may hold (`context_length`); 0: not known


@dataclass(frozen=True)
class Picked:
    name: str
    why: str  # for the user: what it is and why this one


@dataclass(frozen=True)
class NotYet:
    """No model to give the agent (yet): what to tell the user if waiting longer does not help."""

    message: str
    loading: bool  # some candidate is still loading: waiting may help


def parse_models(body: object) -> list[MeshModel]:
    """The models of a `/v1/models` answer (entries that are not objects with an `id` are skipped)."""
    data = body.get("data") if isinstance(body, dict) else None
    out: list[MeshModel] = []
    for entry in data if isinstance(data, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or entry.get("pseudo") is True:
            continue  # not a model, or the `auto` pseudo-model (a launcher names a real one)
        caps = entry.get("capabilities")
        tools = caps.get("tools") if isinstance(caps, dict) else None
        size = entry.get("size_bytes")
        out.append(
            MeshModel(
                name=entry["id"],
                state=str(entry.get("state", SERVING)),
                tools=tools if isinstance(tools, bool) else None,
                size_bytes=size if type(size) is int and size > 0 else 0,
                context=ctx if type(ctx := entry.get("context_length")) is int and ctx > 0 else 0,
            )
        )
    return out


def strength(model: MeshModel) -> tuple[bool, int, str]:
    """Sort key, weakest first: tool-capable, then size (unknown counts as 0)."""
    return (model.tools is True, model.size_bytes, model.name)


def pick_model(models: list[MeshModel], requested: str | None) -> Picked | NotYet:
    """The model an agent gets (see the module's rule), or why there is none."""
    names = [m.name for m in models]
    if requested:
        name = match_model(requested, names)
        if name is None:
            return NotYet(f"the mesh serves no model named {requested!r}; it has {listing(models)}", loading=False)
        model = models[names.index(name)]
        if model.state != SERVING:
            return NotYet(f"{name} is {model.state} on the mesh, not serving yet", loading=True)
        note = {True: "calls tools", False: "its chat template has NO tool calls", None: "tool support unknown"}
        return Picked(name, f"{name} ({note[model.tools]}, {size_text(model.size_bytes)}; chosen with --model)")
    capable = [m for m in models if m.tools is True and m.state == SERVING]
    if capable:
        best = max(capable, key=strength)
        why = f"{best.name} ({size_text(best.size_bytes)}; the largest of {len(capable)} tool-capable model(s) serving)"
        return Picked(best.name, why)
    loading = any(m.state != SERVING and m.tools is not False for m in models)
    if not models:
        return NotYet("no model is served on the mesh yet", loading=True)
    return NotYet(
        f"no model on the mesh can call tools (its chat template has no tool calls); the mesh has {listing(models)}. "
        "Serve one whose template has tool calls (e.g. `mesh-llm --model Qwen2.5-Coder-1.5B-Instruct`), "
        "or pick one anyway with --model",
        loading=loading,
    )


def context_warning(agent: str, model: MeshModel | None) -> str | None:
    """Why the agent's requests will not fit the model's context, when the mesh says how much one request holds."""
    if agent != "claude" or model is None or not model.context or model.context >= CLAUDE_PROMPT_TOKENS * 1.2:
        return None
    return (
        f"{model.name} holds {model.context} tokens per request, and Claude Code sends about {CLAUDE_PROMPT_TOKENS} "
        "before your first word: its requests will fail with a context error. Serve a model trained for a long "
        "context with a larger slot (e.g. `--ctx-size 32768 --parallel 1`; llama-server caps it at the model's "
        "training context)"
    )


def listing(models: list[MeshModel]) -> str:
    if not models:
        return "no models"
    tools = {True: "tools", False: "no tools", None: "tools unknown"}
    return ", ".join(
        f"{m.name} ({m.state}, {tools[m.tools]}, {size_text(m.size_bytes)})"
        for m in sorted(models, key=lambda m: m.name)
    )


def size_text(size: int) -> str:
    if not size:
        return "size unknown"
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


# --- Goose ------------------------------------------------------------------------------------------------------


def goose_config_dir(env: Mapping[str, str], home: Path) -> Path:
    """Goose's config directory: `$XDG_CONFIG_HOME/goose`, else `~/.config/goose` (also on macOS)."""
    xdg = env.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else home / ".config") / "goose"


def goose_provider(
    existing: Mapping[str, Any] | None, api_root: str, models: list[str], contexts: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Goose's declarative provider for the mesh (`custom_providers/mesh.json`), merged into the user's
    copy: our keys are set, every other key is kept, and a model's own settings (say `context_limit`) survive.

    Format: goose `DeclarativeProviderConfig` (crates/goose/src/config/declarative_providers.rs), engine
    `openai`; `base_url` names the chat completions endpoint, which older and newer Goose both accept."""
    out: dict[str, Any] = copy.deepcopy(dict(existing)) if existing else {}
    old_models = {m["name"]: m for m in out.get("models", []) if isinstance(m, dict) and isinstance(m.get("name"), str)}
    out.update(
        {
            "name": GOOSE_PROVIDER,
            "engine": "openai",
            "display_name": out.get("display_name") or "mesh-llm",
            "description": out.get("description") or "Models served by the mesh-llm mesh, through the local node",
            "api_key_env": GOOSE_KEY_ENV,
            "base_url": api_root.rstrip("/") + "/v1/chat/completions",
            "models": [
                {"context_limit": (contexts or {}).get(n) or DEFAULT_CONTEXT, **old_models.get(n, {}), "name": n}
                for n in models
            ],
            "requires_auth": False,
            "supports_streaming": True,
        }
    )
    out.pop("base_path", None)  # the path is in base_url
    return out


def goose_env(env: Mapping[str, str], model: str) -> dict[str, str]:
    """The agent's environment: the mesh provider and the model selected (GOOSE_PROVIDER, GOOSE_MODEL)."""
    return {**env, "GOOSE_PROVIDER": GOOSE_PROVIDER, "GOOSE_MODEL": model, GOOSE_KEY_ENV: DUMMY_KEY}


# --- Claude Code ------------------------------------------------------------------------------------------------

CLAUDE_MODEL_VARS = (
    "ANTHROPIC_MODEL",
    "ANTHROPIC_DEFAULT_OPUS_MODEL",
    "ANTHROPIC_DEFAULT_SONNET_MODEL",
    "ANTHROPIC_DEFAULT_HAIKU_MODEL",  # background tasks
    "ANTHROPIC_SMALL_FAST_MODEL",  # the same, for Claude Code 1.x
    "CLAUDE_CODE_SUBAGENT_MODEL",
)


def claude_env(env: Mapping[str, str], api_root: str, model: str) -> dict[str, str]:
    """Claude Code pointed at the node's Anthropic API (`ANTHROPIC_BASE_URL` is the root: it appends
    `/v1/messages`), with every model it would use set to `model`. A real `ANTHROPIC_API_KEY` is not
    passed on (Claude Code warns when it and a token are both set, and the mesh needs neither)."""
    out = {k: v for k, v in env.items() if k != "ANTHROPIC_API_KEY"}
    out.update({"ANTHROPIC_BASE_URL": api_root.rstrip("/"), "ANTHROPIC_AUTH_TOKEN": DUMMY_KEY})
    out.update(dict.fromkeys(CLAUDE_MODEL_VARS, model))
    # No telemetry, error reports or update checks: the mesh may be offline, and it is not Anthropic's API.
    out.setdefault("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
    return out


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child's return code (killed by signal N → 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode

"""`mesh-llm` command line: parses arguments and calls into the packages, nothing more.

mesh-llm [--model X ...]            run a node (console only when no model is given)
mesh-llm download [NAME ...] [--draft]   list the catalog, or fetch models
mesh-llm blackboard [TEXT | --search Q | --mcp | install-skill]   the agents' blackboard
mesh-llm goose | claude [--model M] [--join TOKEN] [-- ARGS]   run a coding agent on the mesh's models
mesh-llm doctor [--selftest | --build] [--json]   the llama.cpp build this machine uses and its self-test
mesh-llm top [--console URL] [--once]   live tok/s, in-flight requests and errors per model and node
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from inference import paths
from inference.llama_server import ServerSettings
from inference.speculation import DEFAULT_N_MAX, DraftFlags
from mesh_mcp.clock import SYSTEM_CLOCK
from mesh_mcp.discovery.move import MoveTo
from mesh_mcp.errors import MeshLLMError

log = logging.getLogger("mesh_llm.cli")


def _node_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesh-llm",
        description="Serve LLMs from the pooled capacity of your machines behind OpenAI/Anthropic APIs.",
        epilog="Subcommands: `mesh-llm download [NAME ...] [--draft]` lists the catalog or fetches models; "
        "`mesh-llm blackboard --help`: the agents' blackboard (post, search, MCP server); "
        "`mesh-llm goose` / `mesh-llm claude`: run Goose or Claude Code on the mesh's models; "
        "`mesh-llm doctor`: the llama.cpp build this machine uses, its CPU flags and self-test; "
        "`mesh-llm discover`: the public meshes listed on the Nostr relays and the LAN; "
        "`mesh-llm top`: live tok/s, in-flight requests and errors per model and node.",
    )
    p.add_argument("--version", action="store_true", help="print versions and the llama.cpp build in use, then exit")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="MODEL",
        help="catalog name (fuzzy: Qwen3-8B), Hugging Face URL, org/repo/file.gguf, or a local .gguf path; repeatable",
    )
    p.add_argument("--port", type=int, default=9337, help="API port (default 9337)")
    p.add_argument("--console-port", type=int, default=3131, help="console port (default 3131)")
    p.add_argument(
        "--listen-all",
        action="store_true",
        help="serve the API and console on all interfaces; other machines then need an API key (--api-key)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="a key other machines send as 'Authorization: Bearer KEY' or 'x-api-key: KEY' (repeatable; "
        "MESH_LLM_API_KEYS=FILE reads one key per line and keeps keys out of the process list)",
    )
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="with --listen-all: serve every machine that can reach this one, with no key",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let a browser app at ORIGIN (e.g. http://localhost:5173) call this node (repeatable)",
    )
    p.add_argument("--name", help="name of this node and author of posts written on it (default: host name, $USER)")
    p.add_argument("--models-dir", type=Path, help="where models live (default ~/.models, or $MESH_LLM_MODELS)")
    p.add_argument("--backend", choices=["cpu", "cuda", "metal", "vulkan"], help="llama.cpp backend (default: detect)")
    p.add_argument("--max-vram", type=float, metavar="GB", help="cap the memory this node offers to models")
    p.add_argument("--ctx-size", type=int, default=4096, help="context tokens per request slot (default 4096)")
    p.add_argument("--parallel", type=int, default=4, help="concurrent request slots per model (default 4)")
    p.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads for llama-server and rpc-server (default: all)"
    )
    p.add_argument(
        "--draft",
        nargs="?",
        const="",
        metavar="PATH|NAME|ngram",
        help="speculative decoding: a draft model (path or catalog name, fetched if needed), 'ngram' for n-gram "
        "lookup, or bare --draft to fetch each model's catalog draft (default: the catalog draft when on disk); "
        "kept only while measured to be faster",
    )
    p.add_argument("--no-draft", action="store_true", help="never speculate")
    p.add_argument("--draft-max", type=int, default=DEFAULT_N_MAX, metavar="N", help="tokens drafted per round (4)")
    p.add_argument("--draft-min", type=int, default=0, metavar="N", help="fewest drafted tokens worth verifying (0)")
    p.add_argument(
        "--llama-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument passed to llama-server verbatim (repeatable, e.g. --llama-arg=--temp --llama-arg=0)",
    )
    p.add_argument(
        "--join", action="append", default=[], metavar="TOKEN", help="join the mesh of this invite token (repeatable)"
    )
    p.add_argument("--client", action="store_true", help="join without serving: API only, no GPU needed")
    p.add_argument(
        "--auto",
        action="store_true",
        help="without --join: find the best public mesh (Nostr relays, the LAN) and join it, or create one; then "
        "serve a catalog model chosen for this machine: what the mesh wants first, else the largest that fits",
    )
    p.add_argument(
        "--publish",
        action="store_true",
        help="list this mesh publicly (Nostr relays and the LAN): the listing carries a joinable invite token, so "
        "anyone who finds it can join",
    )
    p.add_argument("--mesh-name", metavar="NAME", help="name the mesh (implies --publish); with --auto: join NAME")
    p.add_argument("--region", metavar="R", help="tag the listing with a region (e.g. eu-west); --auto prefers it")
    p.add_argument(
        "--max-clients", type=int, default=0, metavar="N", help="delist the mesh while N clients are connected"
    )
    p.add_argument(
        "--avoid-mesh",
        action="append",
        default=[],
        metavar="MESH_ID",
        help="with --auto: never join this mesh (its id, or its first 8+ characters as `discover` shows; repeatable)",
    )
    p.add_argument(
        "--nostr-relay",
        action="append",
        default=[],
        metavar="URL",
        help="Nostr relay to publish and search on (repeatable; replaces the 5 default public relays)",
    )
    p.add_argument(
        "--demand-ttl",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="a model no request named for this long is no longer wanted: extra replicas of it are released "
        "(default 1800)",
    )
    p.add_argument(
        "--split",
        type=int,
        metavar="N",
        help="serve each --model as a pipeline split over N nodes of the mesh, even when it fits one",
    )
    p.add_argument(
        "--blackboard",
        action="store_true",
        help="carry the agents' blackboard (members always do; a --client only with this flag)",
    )
    p.add_argument(
        "--bind-port",
        type=int,
        default=0,
        help="UDP port of the mesh listener; the RPC data plane takes the same number on TCP (default: any)",
    )
    p.add_argument("--mesh-host", default="0.0.0.0", help="interface the mesh listener binds (default: all)")
    p.add_argument(
        "--advertise", action="append", default=[], metavar="HOST", help="address to put in invite tokens (repeatable)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _control_parser(action: str) -> argparse.ArgumentParser:
    if action == "drop":
        p = argparse.ArgumentParser(
            prog="mesh-llm drop", description="Make the running local node stop serving a model."
        )
        p.add_argument("model", metavar="MODEL")
    else:
        p = argparse.ArgumentParser(
            prog="mesh-llm rotate-key",
            description=(
                "Issue a new mesh secret (on an owner of the mesh: the node that created it, or one it named): old "
                "invite tokens stop admitting nodes; members keep working; evicted nodes are disconnected and refused."
            ),
        )
        p.add_argument(
            "--evict",
            action="append",
            default=[],
            metavar="NODE_ID",
            help="leave this node (member or client) out of the new secret and disconnect it (repeatable)",
        )
        p.add_argument(
            "--add-owner",
            action="append",
            default=[],
            metavar="NODE_ID",
            help="let this member rotate the key too (it must be in the mesh now; repeatable)",
        )
    p.add_argument("--console-port", type=int, default=3131, help="console port of the running node (default 3131)")
    return p


def _control(action: str, args: argparse.Namespace) -> int:
    import httpx2

    url = f"http://127.0.0.1:{args.console_port}/api/{action}"
    try:
        request = {"model": args.model} if action == "drop" else {"evict": args.evict, "add_owner": args.add_owner}
        resp = httpx2.post(url, json=request, timeout=30)
    except httpx2.TransportError:
        print(f"mesh-llm: no node is running here (nothing answers on {url})", file=sys.stderr)
        return 1
    try:
        body = resp.json()
    except ValueError:
        body = {}
    if resp.status_code != 200 or not isinstance(body, dict):
        error = body.get("error", resp.text) if isinstance(body, dict) else resp.text
        if isinstance(error, dict):
            error = error.get("message", error)
        print(f"mesh-llm: {error}", file=sys.stderr)
        return 1
    print(body["dropped"] + " dropped" if action == "drop" else body["invite_token"])
    return 0


def _download_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mesh-llm download", description="List the model catalog or download models.")
    p.add_argument("names", nargs="*", metavar="NAME", help="catalog names (fuzzy) to download; none lists the catalog")
    p.add_argument("--draft", action="store_true", help="also fetch each model's draft for speculative decoding")
    p.add_argument("--models-dir", type=Path, help="where models live (default ~/.models, or $MESH_LLM_MODELS)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["download"]:
            return _download(_download_parser().parse_args(argv[1:]))
        if argv[:1] == ["blackboard"]:
            from .cmd_blackboard import main as blackboard

            return blackboard(argv[1:])
        if argv[:1] in (["goose"], ["claude"]):
            from .cmd_agents import main as run_agent

            return run_agent(argv[0], argv[1:])
        if argv[:1] == ["discover"]:
            from .cmd_discover import main as discover

            return discover(argv[1:])
        if argv[:1] == ["doctor"]:
            from .cmd_doctor import main as doctor

            return doctor(argv[1:])
        if argv[:1] == ["top"]:
            from .cmd_top import main as top

            return top(argv[1:])
        if argv[:1] in (["drop"], ["rotate-key"]):
            return _control(argv[0], _control_parser(argv[0]).parse_args(argv[1:]))
        return _run(_node_parser().parse_args(argv))
    except KeyboardInterrupt:
        return 130


def _download(args: argparse.Namespace) -> int:
    from .cmd_download import download_command, list_catalog

    if not args.names:
        print(list_catalog())
        return 0
    models_dir = args.models_dir or paths.models_dir()
    return anyio.run(lambda: download_command(args.names, draft=args.draft, models_dir=models_dir))


def _run(args: argparse.Namespace) -> int:
    if args.version:
        from .cmd_doctor import version_lines

        print("\n".join(version_lines()))
        return 0
    from .node import Node, NodeConfig
    from .ui import Bars, setup_logging

    if not 1 <= args.draft_max <= 32 or not 0 <= args.draft_min <= args.draft_max:
        print("mesh-llm: --draft-max must be 1 to 32, and --draft-min 0 to --draft-max", file=sys.stderr)
        return 2
    if args.no_draft and args.draft is not None:
        print("mesh-llm: --draft and --no-draft contradict each other; give one", file=sys.stderr)
        return 2
    console = setup_logging(args.verbose)
    if args.ctx_size < 256 or args.parallel < 1:
        print("mesh-llm: --ctx-size must be at least 256 and --parallel at least 1", file=sys.stderr)
        return 2
    if not 10 <= args.demand_ttl <= 7 * 86400:
        print("mesh-llm: --demand-ttl must be from 10 seconds to 7 days", file=sys.stderr)
        return 2
    if args.split is not None and args.split < 2:
        print("mesh-llm: --split N needs N ≥ 2 nodes", file=sys.stderr)
        return 2
    if args.client and args.model:
        print("mesh-llm: --client nodes serve no models; drop --model or --client", file=sys.stderr)
        return 2
    from mesh_mcp.api.guard import KEYS_ENV, api_keys, cors_origin

    try:
        keys = api_keys(args.api_key, os.environ.get(KEYS_ENV))
        cors = tuple(cors_origin(o) for o in args.cors_origin)
    except MeshLLMError as exc:
        print(f"mesh-llm: {exc}", file=sys.stderr)
        return 2
    if args.listen_all and not keys and not args.no_auth:
        print(
            "mesh-llm: --listen-all lets other machines use this node, so it needs API keys: add --api-key KEY "
            f"(repeatable) or set {KEYS_ENV} to a file with one key per line; or pass --no-auth to let anyone who "
            "can reach this machine in without a key",
            file=sys.stderr,
        )
        return 2
    if args.max_clients < 0:
        print("mesh-llm: --max-clients must be 0 (no cap) or more", file=sys.stderr)
        return 2
    from .public import Choice, Public, auto_choice, wants

    avoid = [a.strip().lower() for a in args.avoid_mesh]
    if any(len(a) < 8 or any(c not in "0123456789abcdef" for c in a) for a in avoid):
        print("mesh-llm: --avoid-mesh takes a mesh id (hex, at least its first 8 characters)", file=sys.stderr)
        return 2
    relays = tuple(args.nostr_relay) or Public.relays
    public = Public(
        publish=args.publish or bool(args.mesh_name),
        mesh_name=args.mesh_name,
        region=args.region,
        max_clients=args.max_clients,
        relays=relays,
        takeover=args.auto,
        avoid=frozenset(avoid),
    )
    joins = tuple(args.join)
    if args.auto and not joins:
        from inference import hardware

        from .api.guard import Policy
        from .node import while_searching

        me = wants(args.client, hardware.detect(args.max_vram).capacity_bytes, args.region, tuple(args.model))
        host = "0.0.0.0" if args.listen_all else "127.0.0.1"
        policy = Policy(args.listen_all, keys, args.no_auth, frozenset(cors))

        async def search() -> Choice:
            return await auto_choice(paths.home_dir(), public, me, SYSTEM_CLOCK)

        try:
            ports = (args.port, args.console_port)
            choice = anyio.run(while_searching, search, paths.home_dir(), args.name, host, ports, policy)
        except MeshLLMError as exc:
            print(f"mesh-llm: {exc}", file=sys.stderr)
            return 1
        if choice.token is not None:  # a member of a listed mesh: its publisher lists it; this node takes over if gone
            joins = (choice.token,)
            public = replace(public, publish=False)
        else:  # --auto found nothing: it creates a public mesh (the next --auto finds it); named, it may move
            public = replace(public, publish=True, name_watch=bool(args.mesh_name))
    config = NodeConfig(
        models=tuple(args.model),
        host="0.0.0.0" if args.listen_all else "127.0.0.1",
        api_port=args.port,
        console_port=args.console_port,
        home=paths.home_dir(),
        models_dir=(args.models_dir or paths.models_dir()).expanduser(),
        backend=args.backend,
        name=args.name,
        max_vram_gb=args.max_vram,
        server=ServerSettings(
            ctx_per_slot=args.ctx_size,
            slots=args.parallel,
            extra_args=(*(("--threads", str(args.threads)) if args.threads else ()), *args.llama_arg),
        ),
        threads=args.threads,
        draft=DraftFlags(args.draft, args.no_draft, args.draft_max, args.draft_min),
        joins=joins,
        client=args.client,
        mesh_host=args.mesh_host,
        mesh_port=args.bind_port,
        advertise=tuple(args.advertise),
        blackboard=args.blackboard,
        author=args.name,
        split=args.split,
        api_keys=keys,
        no_auth=args.no_auth,
        cors_origins=cors,
        auto=args.auto and not args.client,
        demand_ttl_s=args.demand_ttl,
        public=public,
    )
    bars = Bars(console)
    try:
        while True:
            try:
                node = Node(config, bars)
            except MeshLLMError as err:
                print(f"mesh-llm: {err}", file=sys.stderr)
                return 1
            outcome = _run_node(node)
            if not isinstance(outcome, MoveTo):
                if outcome:
                    return outcome
                break
            # Lost the --mesh-name race: the node stopped cleanly; it starts again as a member of the winner's mesh.
            log.info("restarting in the mesh of the winning listing: %s", outcome.why)
            public = replace(config.public, publish=False, name_watch=False)  # the winner's publisher lists it
            config = replace(config, joins=(outcome.token,), public=public)
    finally:
        bars.stop()
    log.info("stopped")
    return 0


def _run_node(node: Any) -> int | MoveTo:
    """Run `node` until Ctrl-C or SIGTERM (0), a user error (1, printed), or a `MoveTo` (returned)."""

    async def run_until_signal() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_signal, tg.cancel_scope)
            await node.run()

    try:
        anyio.run(run_until_signal)
    except BaseExceptionGroup as group:
        moved, rest = group.split(MoveTo)
        if moved is not None and rest is None:
            return _first(moved)
        errors = _user_errors(group)
        if errors is None:
            raise
        for error in errors:
            print(f"mesh-llm: {error}", file=sys.stderr)
        return 1
    except MoveTo as move:
        return move
    except MeshLLMError as exc:
        print(f"mesh-llm: {exc}", file=sys.stderr)
        return 1
    return 0


def _first(group: BaseExceptionGroup) -> MoveTo:
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, MoveTo):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
    raise AssertionError("a MoveTo group without a MoveTo")


def _user_errors(group: BaseExceptionGroup) -> list[MeshLLMError] | None:
    """The MeshLLMErrors in a task-group failure, or None if anything else is in there."""
    matched, rest = group.split(MeshLLMError)
    if rest is not None or matched is None:
        return None
    out: list[MeshLLMError] = []
    stack: list[BaseException] = [matched]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        elif isinstance(exc, MeshLLMError):
            out.append(exc)
    return out


async def _cancel_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info(
                "%s received: shutting down (stopping llama-server, closing ports)",
                signal.Signals(signum).name,
            )
            scope.cancel()
            return


if __name__ == "__main__":
    sys.exit(main())

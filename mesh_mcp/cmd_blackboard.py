"""`mesh-llm blackboard`: post to, search and read the mesh's blackboard through the running local
node; `--mcp` serves the blackboard to an agent over stdio; `install-skill` installs the agent skill.

mesh-llm blackboard "STATUS: [org/repo branch:main] refactoring billing"   post
mesh-llm blackboard --search "billing refactor" [--from NAME] [--since HOURS]   search
mesh-llm blackboard [--from NAME] [--since HOURS]                              the recent feed

What it prints comes from other people's posts: post text, authors and the node's messages are shown
through `inference.controls.printable` (control, bidi and format characters as U+FFFD), whatever the
node sent, so no post can drive the terminal; `--json` is ASCII-escaped JSON.

Scriptable: with `--json` every command prints one JSON document on stdout — a post: the post object; search and
the feed: an array of posts; `install-skill --json`: an array of `{"agent", "path", "action"}` — and an error as
`{"error": {"message", "status"?}}` on stderr (`status`: the node's HTTP status, when it answered). Exit codes
(`EXIT_*`): 0 done, 1 an error (no node runs, or it refused: a rate limit, a bad post, no blackboard), 2 a usage
error found before asking the node (bad flags, text and --search together, --limit or --since out of range).
`--port` is the reference implementation's name for `--console-port`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx2

from inference import paths
from inference.controls import printable

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
MAX_LIMIT = 100  # the node's cap on posts per answer (blackboard.board.MAX_RESULTS)
MAX_SINCE_HOURS = 48.0  # a post lives 48 hours (blackboard.post.TTL_S)

NO_NODE = (
    "no mesh-llm node is running here ({url} does not answer). Start one: `mesh-llm --client --blackboard` "
    "(no GPU needed; add `--join TOKEN` to join a mesh), or `mesh-llm --model NAME`."
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesh-llm blackboard",
        description="The mesh's blackboard: post what you are doing, found or need; search what others posted. "
        "Posts reach every node, are scrubbed of personal data and expire after 48 hours.",
        epilog="`mesh-llm blackboard install-skill` installs the agent skill for Claude Code, Goose and pi. "
        "Exit codes: 0 done, 1 an error (no node, or the node refused), 2 a usage error.",
    )
    p.add_argument("text", nargs="?", help='text to post, e.g. "STATUS: [org/repo branch:main] refactoring billing"')
    p.add_argument("--search", metavar="QUERY", help="full-text search (ranked)")
    p.add_argument("--from", dest="author", metavar="NAME", help="only posts by this author")
    p.add_argument("--since", type=float, metavar="HOURS", help="only posts from the last HOURS hours")
    p.add_argument("--kind", metavar="KIND", help="only posts of this kind (STATUS, FINDING, QUESTION, ANSWER, …)")
    p.add_argument("--limit", type=int, default=20, help="at most this many posts (default 20, at most 100)")
    p.add_argument("--reply-to", metavar="ID", help="id of the post this answers (when posting)")
    p.add_argument("--author", dest="post_author", metavar="NAME", help="author name for this post (default: node's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--mcp", action="store_true", help="serve the blackboard and mesh tools over MCP on stdio")
    p.add_argument(
        "--join", action="append", default=[], metavar="TOKEN", help="with --mcp: mesh to join if no node runs"
    )
    p.add_argument("--name", help="with --mcp: author name of a node started for it (default $USER)")
    p.add_argument(
        "--console-port", "--port", type=int, help="console port of the local node (default: the running node's)"
    )
    return p


def main(argv: list[str]) -> int:
    if argv[:1] == ["install-skill"]:
        return install_skill(argv[1:])
    p = parser()
    args = p.parse_args(argv)  # a usage error exits EXIT_USAGE (argparse)
    if not 1 <= args.limit <= MAX_LIMIT:
        p.error(f"--limit is between 1 and {MAX_LIMIT}")
    if args.since is not None and not 0 < args.since <= MAX_SINCE_HOURS:
        p.error(f"--since is in hours, more than 0 and at most {MAX_SINCE_HOURS:g}")
    if args.text is not None and args.search is not None:
        p.error("give text to post or --search, not both")
    home = paths.home_dir()
    if args.mcp:
        import anyio

        from mesh_mcp.mcp.stdio import run_stdio

        anyio.run(run_stdio, home, list(args.join), args.name)
        return 0
    url = console_url(home, args.console_port)
    try:
        return _post(url, args) if args.text is not None else _read(url, args)
    except httpx2.TransportError:
        return _error(NO_NODE.format(url=url), args.json)


def console_url(home: Path, port: int | None) -> str:
    if port is None:
        from mesh_mcp.mcp.local import read_runtime

        info = read_runtime(home)
        if info is not None:
            return info.console_url.rstrip("/")
        port = 3131
    return f"http://127.0.0.1:{port}"


def _post(url: str, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"text": args.text}
    if args.post_author:
        body["author"] = args.post_author
    if args.reply_to:
        body["reply_to"] = args.reply_to
    resp = httpx2.post(url + "/api/blackboard", json=body, timeout=30)
    if resp.status_code != 201:
        return _fail(resp, args.json)
    post = _answer(resp, "post", dict)
    if post is None:
        return _error(f"the node at {url} sent an answer that is not a post", args.json)
    print(json.dumps(post) if args.json else f"Posted {printable(str(post.get('id')))}")
    return EXIT_OK


def _read(url: str, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    for key, value in (("q", args.search), ("from", args.author), ("since", args.since), ("kind", args.kind)):
        if value is not None:
            params[key] = value
    resp = httpx2.get(url + "/api/blackboard", params=params, timeout=30)
    if resp.status_code != 200:
        return _fail(resp, args.json)
    posts = _answer(resp, "posts", list)
    if posts is None or not all(isinstance(p, dict) for p in posts):
        return _error(f"the node at {url} sent an answer that is not a list of posts", args.json)
    if args.json:
        print(json.dumps(posts))
        return EXIT_OK
    if not posts:
        print("no posts match" if args.search else "the blackboard is empty")
    now = time.time()
    for post in posts:
        reply = f" (re {printable(str(post['reply_to'])[:8])})" if post.get("reply_to") else ""
        author, text = printable(" ".join(str(post["author"]).split())), printable(str(post["text"]))
        print(f"{printable(str(post['id'])[:8])}  {_ago(now - post['created']):>8}  {author}{reply}: {text}")
    return EXIT_OK


def _answer(resp: httpx2.Response, key: str, kind: type) -> Any:
    """`resp`'s JSON object's `key` when it is a `kind`; None for any other answer."""
    try:
        found = resp.json()
    except ValueError:
        return None
    value = found.get(key) if isinstance(found, dict) else None
    return value if isinstance(value, kind) else None


def _fail(resp: httpx2.Response, as_json: bool) -> int:
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:1000]
    return _error(str(message), as_json, resp.status_code)


def _error(message: str, as_json: bool, status: int | None = None) -> int:
    """Say what failed on stderr (a line, or `{"error": {...}}` with --json) and give EXIT_ERROR."""
    if as_json:
        print(json.dumps({"error": {"message": message, **({"status": status} if status else {})}}), file=sys.stderr)
    else:
        print(f"mesh-llm: {printable(message)}", file=sys.stderr)
    return EXIT_ERROR


def _ago(seconds: float) -> str:
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def install_skill(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mesh-llm blackboard install-skill",
        description="Install the blackboard skill where Claude Code, Goose and pi look for skills.",
    )
    p.add_argument("--json", action="store_true", help='print [{"agent", "path", "action"}, ...]')
    args = p.parse_args(argv)
    from blackboard.skill import format_results
    from blackboard.skill import install_skill as install

    try:
        results = install()
    except OSError as exc:
        return _error(f"cannot install the skill: {exc}", args.json)
    if args.json:
        print(json.dumps([{"agent": r.agent, "path": str(r.path), "action": r.action} for r in results]))
    else:
        print(format_results(results))
    return EXIT_OK

"""The tree's layering, checked on the source: which plane may import which (issue 13).

`inference/` knows llama.cpp and models, no peers; `blackboard/` knows posts, no transport; `mesh_mcp/mesh/`
(membership and transport) never imports the serving modes, the data plane or the MCP server; the data plane
never imports serving, the API or MCP; nor does `mesh/` import the API (the API's directory over the mesh lives in
`api/mesh_directory.py`).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ("mesh_mcp", "inference", "blackboard")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _is_module(name: str) -> bool:
    base = ROOT / name.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _nodes(tree: ast.AST, typing_only: bool) -> list[ast.AST]:
    """Every node of `tree`; without `typing_only`, not those under `if TYPE_CHECKING:` (never run)."""
    if typing_only:
        return list(ast.walk(tree))
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports(typing_only: bool = True) -> set[tuple[str, str]]:
    """(importing module, imported module) for every import between our packages (with `typing_only=False`, only
    those that run: not under `if TYPE_CHECKING:`)."""
    out: set[tuple[str, str]] = set()
    for path in [p for pkg in OURS for p in (ROOT / pkg).rglob("*.py")]:
        mod = _module(path)
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in _nodes(ast.parse(path.read_text()), typing_only):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    out.add((mod, full if _is_module(full) else target))
            elif isinstance(node, ast.Import):
                out.update((mod, alias.name) for alias in node.names)
    return {(a, b) for a, b in out if b.split(".")[0] in OURS}


def _crossing(importer: str, forbidden: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in imports() if a.startswith(importer) and b.startswith(forbidden)}


def test_the_graph_is_read() -> None:  # the checks below are only as good as this
    found = imports()
    assert ("mesh_mcp.node", "mesh_mcp.serving.supervisor") in found
    assert ("mesh_mcp.mesh.runtime", "mesh_mcp.mesh.gossip") in found


def test_inference_and_blackboard_know_no_node() -> None:
    # The one error tree is the package root's (`mesh_mcp.errors`): every plane raises from it, it imports nothing.
    assert not _crossing("inference", ("mesh_mcp", "blackboard")) - {(a, "mesh_mcp.errors") for a, _ in imports()}
    assert not _crossing("blackboard", ("mesh_mcp",)) - {(a, "mesh_mcp.errors") for a, _ in imports()}


def test_the_error_tree_imports_nothing_of_ours() -> None:
    assert not _crossing("mesh_mcp.errors", OURS)


def test_membership_and_transport_import_no_serving_dataplane_api_or_mcp() -> None:
    assert not _crossing("mesh_mcp.mesh.", ("mesh_mcp.serving", "mesh_mcp.dataplane", "mesh_mcp.mcp", "mesh_mcp.api"))


def test_the_data_plane_imports_no_serving_api_or_mcp() -> None:
    assert not _crossing("mesh_mcp.dataplane.", ("mesh_mcp.serving", "mesh_mcp.api", "mesh_mcp.mcp"))


RUNNERS = ("mesh_mcp.serving.solo", "mesh_mcp.serving.split", "mesh_mcp.serving.moe")


def test_one_home_per_serving_mode() -> None:
    """Decide, then do: the planner (serving/plan.py) imports no runner, and only serving/runners.py picks one — a
    new serving mode touches the planner and one runner, nothing else."""
    assert not _crossing("mesh_mcp.serving.plan", ("mesh_mcp.serving.", "mesh_mcp.mesh", "mesh_mcp.api"))
    importers = {a for a, b in imports() if b.startswith(RUNNERS) and not a.startswith(RUNNERS)}
    assert importers == {"mesh_mcp.serving.runners"}, importers


def test_no_import_cycles() -> None:
    """No cycle among the imports that run (a helper may name its facade's type under `if TYPE_CHECKING:`)."""
    graph: dict[str, set[str]] = {}
    for a, b in imports(typing_only=False):
        if a != b:
            graph.setdefault(a, set()).add(b)
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " → ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])
    assert ("mesh_mcp.mesh.runtime", "mesh_mcp.mesh.liveness") in imports(typing_only=False)  # the graph is read


def test_discovery_knows_no_serving_api_mcp_or_data_plane() -> None:
    """The public-mesh plane (listings, Nostr, mDNS, the publisher) sees the mesh only through what it is handed:
    the node's glue (mesh_mcp/public.py) builds its listing from the serving plane."""
    assert ("mesh_mcp.public", "mesh_mcp.discovery.publisher") in imports()  # the graph is read
    forbidden = ("mesh_mcp.serving", "mesh_mcp.api", "mesh_mcp.mcp", "mesh_mcp.dataplane", "mesh_mcp.node")
    assert not _crossing("mesh_mcp.discovery", forbidden)

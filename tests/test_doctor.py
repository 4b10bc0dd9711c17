"""`mesh-llm doctor` and `mesh-llm --version`: the build in use, its CPU flags and self-test, the cache path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference.llamacpp import LlamaCpp


def mesh_llm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh_mcp.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.slow
def test_doctor_names_the_build_in_use_and_its_self_test(llama: LlamaCpp) -> None:
    out = mesh_llm("doctor", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["in_use"] == llama.variant
    used = next(b for b in report["builds"] if b["variant"] == llama.variant)
    assert used["selftest_passed"] is True and used["path"] == str(llama.bin_dir)
    assert "-DGGML_NATIVE=OFF" in used["flags"]
    assert report["cpu"]["arch"] and report["cache"]
    text = mesh_llm("doctor").stdout
    assert f"{llama.variant}: " in text and "<- in use" in text and "self-test passed" in text
    version = mesh_llm("--version").stdout
    assert "mesh-llm " in version and f"{llama.variant} build, self-test passed" in version


def test_doctor_on_an_empty_cache_builds_nothing_and_says_what_happens_next(tmp_path: Path) -> None:
    env = {"MESH_LLM_CACHE": str(tmp_path), "MESH_LLM_BACKEND": "cpu"}
    out = mesh_llm("doctor", env=env)
    assert out.returncode == 0, out.stderr
    assert "not built" in out.stdout and "none yet" in out.stdout and str(tmp_path) in out.stdout
    assert not (tmp_path / "llama.cpp").exists()
    assert "not built and self-tested on this machine yet" in mesh_llm("--version", env=env).stdout

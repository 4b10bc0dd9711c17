"""Our rpc-server repacks a stage's weights as llama-server repacks its own (the pinned ggml-rpc edit in
llama.cpp/pin.toml): real processes, Gemma-3-270M (Q4_K weights, which the CPU backend repacks), llama-server
`--rpc` with every layer on one rpc-server, greedy decoding.

- through the rpc-server the answer is solo's (repacked) answer, token for token — not `--no-repack` solo's,
  which differs on this prompt set (repacked kernels round differently), so the test fails if the repacking is not
  done or not found again at compute time;
- the same rpc-server serves a second host after the first one left (what it repacked for the first is forgotten:
  the second host's buffers may take the same addresses);
- `MESH_LLM_RPC_NO_REPACK=1` keeps an rpc-server's weights plain: its answers are `--no-repack` solo's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest

from inference.llamacpp import LlamaCpp
from tests.harness import free_port

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
TOKENS = 32


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    """Poll `ready` until it holds (bounded); fail at once if `proc` exits."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"{what} exited ({proc.returncode})"
        assert time.monotonic() < deadline, f"{what} not ready in {timeout:.0f} s"
        time.sleep(0.1)


def _healthy(url: str) -> bool:
    try:
        return httpx2.get(url + "/health", timeout=2).status_code == 200
    except httpx2.TransportError:
        return False


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@contextmanager
def llama_server(llama: LlamaCpp, model: Path, *args: str) -> Iterator[str]:
    """A llama-server on `model` (1 thread, loopback) until the block ends; its base URL once healthy."""
    port = free_port()
    cmd = [str(llama.server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--threads", "1"]
    cmd += ["-c", "1024", "-np", "1", "--fit", "off", "--no-webui", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url), proc, f"llama-server ({' '.join(cmd)})", 240)
        yield url
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def rpc_server(llama: LlamaCpp, env: dict[str, str] | None = None) -> Iterator[str]:
    """An rpc-server (1 thread) on a free loopback port; its endpoint once it accepts connections."""
    port = free_port()
    cmd = [str(llama.rpc_server), "-H", "127.0.0.1", "-p", str(port), "-t", "1"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    try:
        wait_until(lambda: _listening(port), proc, "rpc-server", 60)
        yield f"127.0.0.1:{port}"
        assert proc.poll() is None, "the rpc-server died serving"
    finally:
        proc.kill()
        proc.wait()


def answers(url: str) -> list[str]:
    out = []
    for prompt in PROMPTS:
        body = {"prompt": prompt, "n_predict": TOKENS, "temperature": 0, "top_k": 1, "seed": 1, "cache_prompt": False}
        r = httpx2.post(url + "/completion", json=body, timeout=300)
        assert r.status_code == 200, r.text
        out.append(str(r.json()["content"]))
    return out


def test_an_rpc_server_stage_answers_like_repacked_solo_for_every_host(llama: LlamaCpp, gemma: Path) -> None:
    with llama_server(llama, gemma) as solo:
        repacked = answers(solo)
    with llama_server(llama, gemma, "--no-repack") as solo:
        plain = answers(solo)
    assert repacked != plain, "the prompts must tell repacked kernels from plain ones"
    with rpc_server(llama) as endpoint:
        for host in ("first", "second"):
            with llama_server(llama, gemma, "--rpc", endpoint, "-ngl", "999") as split:
                assert answers(split) == repacked, f"the {host} host through the rpc-server"
    with rpc_server(llama, {"MESH_LLM_RPC_NO_REPACK": "1"}) as endpoint:
        with llama_server(llama, gemma, "--rpc", endpoint, "-ngl", "999") as split:
            assert answers(split) == plain

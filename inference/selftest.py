"""The build self-test: llama.cpp binaries prove they run on this machine before any model is served.

`self_test(llama, workdir)` runs the binaries on the known-answer model of `inference.tiny_gguf` in each
mode a node uses them:
1. **llama-server** alone (solo serving): load (with llama.cpp's warm-up), a 32-token prompt in one batch,
   8 greedy tokens;
2. **ggml-rpc-server** through a local `--rpc` load (what a pipeline-split worker runs): the same request
   with every layer and the output on the rpc-server.
The model continues byte token t with t+1, so the prompt "A…`" must come back as "abcdefgh". A process
that dies (which signal, its log's last lines), one that is not ready in `timeout_s`, or a wrong answer
fails the build, with that reason. About 2 s for both modes on 2 cores.

Verdicts are remembered beside the build, per machine (`machine_key`: CPU model and features, kernel
release, machine id), so a build is tested once on each machine it meets, also when the cache directory
is copied or shared; `mesh-llm doctor --selftest` tests again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import httpx2

from . import paths
from .cpu import CpuInfo
from .exits import ExitReport, describe_exit
from .llama_server import LlamaServer, ServerSettings
from .llamacpp import LlamaCpp
from .rpc_server import RpcServer, RpcSettings
from .supervise import printable, tail
from .tiny_gguf import SUCCESSOR_VERSION, successor, write_successor_model

log = logging.getLogger("mesh_llm.selftest")

SELFTEST_VERSION = 1  # a change of the test's model or checks re-tests every build
MAX_ANSWER_BYTES = 64 << 10  # a right answer is ~2 KB; anything past this is read no further
PROMPT = tuple(range(ord("A"), ord("A") + 32))  # 'A' … '`': one batch of 32 tokens (AMX tiles need > 1)
N_PREDICT = 8


def expected_tokens() -> tuple[int, ...]:
    out, last = [], PROMPT[-1]
    for _ in range(N_PREDICT):
        last = successor(last)
        out.append(last)
    return tuple(out)


def _text(tokens: tuple[int, ...] | list[int]) -> str:
    return bytes(t for t in tokens if 0 <= t < 256).decode("latin-1")


@dataclass(frozen=True)
class Verdict:
    passed: bool
    detail: str  # what was seen, in a sentence (and the log's last lines when a process died)
    mode: str = ""  # "llama-server" or "rpc-server": the mode that failed
    at: float = 0.0  # when it was tested (unix time)
    cpu: str = ""
    test: int = SELFTEST_VERSION
    lasting: bool = True  # False for a hang: the next start tests again (a loaded machine can be slow)

    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.at)) if self.at else "?"


def _machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value:
            return value
    return socket.gethostname()


def machine_key(cpu: CpuInfo) -> str:
    """Which machine a verdict holds for: CPU and features, kernel release, machine id (16 hex digits)."""
    parts = [cpu.arch, cpu.system, cpu.model, " ".join(sorted(cpu.features)), platform.release(), _machine_id()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def load_verdict(path: Path) -> Verdict | None:
    """A stored verdict for this test version; None when absent, unreadable or from an older test."""
    try:
        raw = json.loads(path.read_text())
        verdict = Verdict(**raw)
    except (OSError, ValueError, TypeError):
        return None
    return verdict if verdict.test == SELFTEST_VERSION else None


def save_verdict(path: Path, verdict: Verdict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(verdict), indent=2))
    tmp.replace(path)


def model_path(cache: Path) -> Path:
    """The known-answer model, written on first use (milliseconds)."""
    path = cache / f"successor-v{SUCCESSOR_VERSION}.gguf"
    if not path.is_file():
        write_successor_model(path)
    return path


@dataclass
class _Run:
    """One llama-server run's outcome."""

    tokens: list[int] | None = None
    problem: str = ""  # why no answer came
    ended: ExitReport | None = None
    hung: bool = False  # it neither answered nor died in time


async def _ask_once(server: LlamaServer, timeout_s: float) -> _Run:
    run = _Run()
    ready, exited = anyio.Event(), anyio.Event()

    async def serve() -> None:
        try:
            run.ended = describe_exit(await server.run_once(ready.set), "llama-server")
        except OSError as exc:
            run.ended = ExitReport(None, f"could not start {server.llama.server}: {exc}")
        finally:
            exited.set()
            ready.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        with anyio.move_on_after(timeout_s + 5):  # llama_server's own load timeout stops it at timeout_s
            await ready.wait()
        url = server.base_url
        if url is None:
            run.problem = "exited while loading" if run.ended is not None else "did not become ready"
            if run.ended is None or server.timed_out:
                run.problem, run.hung = f"did not become ready within {timeout_s:.0f}s", True
        else:
            try:
                run.tokens = await _complete(url, timeout_s)
            except httpx2.TimeoutException:
                run.problem, run.hung = f"did not answer within {timeout_s:.0f}s", True
            except _BadAnswer as exc:
                run.problem = str(exc)
            except (httpx2.HTTPError, ValueError, TypeError) as exc:
                run.problem = f"failed the request ({type(exc).__name__})"
                with anyio.move_on_after(10):  # a crash mid-request: let the exit status arrive
                    await exited.wait()
        tg.cancel_scope.cancel()
    return run


class _BadAnswer(Exception):
    """llama-server answered, but not with a completion."""


async def _complete(url: str, timeout_s: float) -> list[int]:
    """The generated token ids for the test prompt (the answer read to `MAX_ANSWER_BYTES` at most)."""
    body = {
        "prompt": list(PROMPT),
        "n_predict": N_PREDICT,
        "temperature": 0,
        "top_k": 1,
        "return_tokens": True,
        "cache_prompt": False,
    }
    raw = bytearray()
    async with (
        httpx2.AsyncClient(timeout=timeout_s) as client,
        client.stream("POST", url + "/completion", json=body) as resp,
    ):
        async for chunk in resp.aiter_bytes():
            raw += chunk
            if len(raw) > MAX_ANSWER_BYTES:
                raise _BadAnswer(f"answered more than {MAX_ANSWER_BYTES} bytes (HTTP {resp.status_code})")
    data = json.loads(raw)
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if resp.status_code != 200 or not isinstance(tokens, list):
        text = raw[:200].decode("utf-8", "replace")
        raise _BadAnswer(f"answered HTTP {resp.status_code}: {printable(text)}")
    return [int(t) for t in tokens]


def _with_tail(text: str, log_path: Path) -> str:
    last = tail(log_path)
    return text + (f"\nlast lines of {log_path}:\n{last}" if last else "")


def _judge(run: _Run, noun: str, log_path: Path) -> str | None:
    """None when the answer is right, else why the build fails, in words."""
    want = expected_tokens()
    if run.tokens is not None:
        if tuple(run.tokens) == want:
            return None
        return (
            f"{noun} answered {_text(run.tokens)!r} (tokens {run.tokens}) where the test model's answer is "
            f"{_text(want)!r}: this build computes wrong results on this machine"
        )
    why = f"{noun} {run.problem}"
    if run.ended is not None and run.ended.code != 0 and not run.hung:
        why += f" ({run.ended.text})"
    return _with_tail(why, log_path)


async def self_test(
    llama: LlamaCpp, workdir: Path, *, gpu_layers: int = 0, timeout_s: float = 120.0, rpc: bool = True
) -> Verdict:
    """Run the binaries in each mode on the known-answer model (logs and files under `workdir`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    model = model_path(paths.cache_dir() / "selftest")
    started = time.monotonic()
    settings = ServerSettings(ctx_per_slot=256, slots=1, gpu_layers=gpu_layers, load_timeout_s=timeout_s)
    solo_log = workdir / "llama-server.log"
    solo_log.unlink(missing_ok=True)
    run = await _ask_once(LlamaServer(llama, model, "selftest", solo_log, settings), timeout_s)
    if why := _judge(run, "llama-server", solo_log):
        return Verdict(False, why, "llama-server", time.time(), lasting=not run.hung)
    if rpc:
        failed = await _rpc_mode(llama, model, workdir, timeout_s)
        if failed is not None:
            why, hung = failed
            return Verdict(False, why, "rpc-server", time.time(), lasting=not hung)
    took = time.monotonic() - started
    modes = "llama-server and rpc-server (--rpc)" if rpc else "llama-server"
    return Verdict(True, f"{modes} answered {_text(expected_tokens())!r} as expected ({took:.1f}s)", "", time.time())


async def _rpc_mode(llama: LlamaCpp, model: Path, workdir: Path, timeout_s: float) -> tuple[str, bool] | None:
    """None when the --rpc load answers right, else (why not, whether it hung)."""
    states: list[tuple[str, str]] = []
    rpc = RpcServer(
        llama,
        home=workdir,
        settings=RpcSettings(cache=False, max_start_failures=1, ready_timeout_s=timeout_s),
        on_state=lambda state, detail: states.append((state, detail)),
        name="rpc-server",
    )
    rpc.log_path.unlink(missing_ok=True)
    async with anyio.create_task_group() as tg:
        await tg.start(rpc.run)
        endpoint = rpc.endpoint
        if endpoint is None:
            tg.cancel_scope.cancel()
            detail = states[-1][1] if states else "did not start"
            return _with_tail(f"rpc-server did not start: {detail}", rpc.log_path), rpc.timed_out
        host_log = workdir / "llama-server-rpc.log"
        host_log.unlink(missing_ok=True)
        settings = ServerSettings(
            ctx_per_slot=256, slots=1, gpu_layers=999, extra_args=("--rpc", endpoint), load_timeout_s=timeout_s
        )
        run = await _ask_once(LlamaServer(llama, model, "selftest-rpc", host_log, settings), timeout_s)
        tg.cancel_scope.cancel()
    died = [d for s, d in states if "died" in d]
    if died and run.tokens is None:
        return _with_tail(f"{died[0].split(';')[0]} serving a local --rpc load", rpc.log_path), False
    wrong = _judge(run, "llama-server with a local rpc-server", host_log)
    return None if wrong is None else (wrong, run.hung)

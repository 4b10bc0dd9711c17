"""What a llama.cpp process's exit status means, in words a user can act on.

`describe_exit(code, noun)` is pure: the exit codes llama-server and ggml-rpc-server are known to use
(1 load or argument error, 134 abort, 0 from rpc-server when its bind or transport fails) and deaths by
signal, named (`SIGSEGV (segmentation fault)`), with what to try. A crash by SIGSEGV, SIGILL, SIGBUS or
SIGFPE is a fault of the binary on this machine — an instruction the CPU or VM will not run, a kernel
that faults — not of the model, so the advice points at the build: `mesh-llm doctor`, the portable
build, `MESH_LLM_LLAMA_BIN`, `--backend`.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

# Signals that mean the binary itself faulted (as opposed to being stopped).
FAULTS = frozenset({signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGFPE})
_MEANING = {
    signal.SIGSEGV: "segmentation fault",
    signal.SIGILL: "illegal instruction",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "arithmetic fault",
    signal.SIGABRT: "aborted",
}
FAULT_HINT = (
    "This is a fault of the llama.cpp binary on this machine, not of the model. `mesh-llm doctor --selftest` "
    "re-runs the builds' self-test (a build that fails it is replaced by a more portable one at the next "
    "start); `MESH_LLM_LLAMA_BIN=/dir` uses llama-server and ggml-rpc-server built elsewhere; `--backend cpu` "
    "leaves a GPU backend out."
)
KILL_HINT = "Something outside mesh-llm killed it: the kernel's out-of-memory killer (see `dmesg`) or another process."


@dataclass(frozen=True)
class ExitReport:
    code: int | None  # None: it never started
    text: str  # "killed by SIGSEGV (segmentation fault)", "exit 1: llama-server could not load …"
    signal: str | None = None  # "SIGSEGV" when a signal ended it
    hint: str = ""  # what to try, when there is something to try

    @property
    def fault(self) -> bool:
        return self.signal is not None and signal.Signals[self.signal] in FAULTS


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(code: int, noun: str = "llama-server") -> ExitReport:
    """What exit status `code` of `noun` (llama-server or rpc-server) means (negative: killed by -code)."""
    if code < 0:
        name = signal_name(-code)
        try:
            sig: signal.Signals | None = signal.Signals(-code)
        except ValueError:
            sig = None
        meaning = _MEANING.get(sig) if sig is not None else None
        text = f"killed by {name} (signal {-code}" + (f", {meaning})" if meaning else ")")
        if sig in FAULTS:
            return ExitReport(code, text, name, FAULT_HINT)
        if sig == signal.SIGABRT:
            return ExitReport(code, f"{text}: {noun} aborted (assertion, out of memory, or a dead RPC peer)", name)
        return ExitReport(code, text, name, KILL_HINT if sig == signal.SIGKILL else "")
    if code == 134:
        return ExitReport(code, f"exit 134: {noun} aborted (assertion, out of memory, or a dead RPC peer)")
    if noun == "rpc-server":
        if code == 0:
            return ExitReport(
                0, "exit 0: rpc-server stopped on its own (bind, device or transport failure; see the log)"
            )
        if code == 1:
            return ExitReport(
                1, "exit 1: rpc-server rejected its arguments, found no device, or could not create its cache directory"
            )
    elif code == 1:
        return ExitReport(1, f"exit 1: {noun} could not load the model or rejected a flag")
    return ExitReport(code, f"exit {code}")

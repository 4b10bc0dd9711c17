"""Time a first build, its self-test, and a fallback build in the same tree (issue 11).

Runs `ensure_llama_cpp` on the cache given by MESH_LLM_CACHE (use an empty one) with a tester that fails the
first plan after really self-testing it, so the second plan is built the way a failed self-test makes a node
build it. Prints each stage with its time; the build logs say which files were compiled.

    MESH_LLM_CACHE=/tmp/fb/cache python bench/fallback_build.py
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio

from inference.llamacpp import LlamaCpp
from inference.provision import ensure_llama_cpp
from inference.selftest import Verdict, self_test


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    first: list[str] = []

    def progress(stage: str, fraction: float) -> None:
        if fraction == 0.0:
            print(f"{time.strftime('%X')} {stage}", flush=True)

    async def tester(llama: LlamaCpp, workdir: Path) -> Verdict:
        verdict = await self_test(llama, workdir)
        if not first or first[0] == llama.variant:
            first.append(llama.variant)
            return Verdict(
                False, f"forced failure after a real self-test ({verdict.detail})", "llama-server", time.time()
            )
        return verdict

    started = time.monotonic()
    llama = anyio.run(lambda: ensure_llama_cpp(on_progress=progress, tester=tester))
    print(f"using {llama.variant} after {time.monotonic() - started:.0f}s; fallback: {llama.fallback}")


if __name__ == "__main__":
    main()

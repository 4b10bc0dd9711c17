"""Exec a command that dies with its parent: `python -m inference.pdeathsig -- CMD ARGS...`.

On Linux it sets PR_SET_PDEATHSIG(SIGKILL) and then execs, so a llama-server or rpc-server is
never orphaned even if the node is killed with SIGKILL. SIGKILL, not SIGTERM: llama-server's
graceful shutdown can hang once its parent is gone (seen here: "cleaning up before exit..." until a
second signal). Elsewhere it simply execs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python -m inference.pdeathsig -- CMD [ARGS...]")
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl; then nobody would ever signal us.
        if os.getppid() == 1:
            sys.exit(1)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])

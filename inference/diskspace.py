"""Free disk space: checked before a write of known size, and a full disk told in numbers.

`require_space` refuses, before the first byte, a write that cannot fit: every directory's need is summed per
filesystem (a wheel cache and the models directory on one disk need both), compared with what that filesystem
has free (`shutil.disk_usage` of the directory, or of its nearest existing parent), and a shortfall is a
`DiskFull` saying what needs how much where, how much is free, and what to do. `is_disk_full` tells ENOSPC and
EDQUOT apart from other `OSError`s, for writers that meet a full disk mid-write (a size that was unknown, or
lied about, or another process filling the disk meanwhile); `disk_full_is_an_error` turns them into `DiskFull`
around a block of writes. `mb` is how sizes are written in these messages.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mesh_mcp.errors import DiskFull

__all__ = ["HOME_HINT", "MODELS_HINT", "disk_full_is_an_error", "free_bytes", "is_disk_full", "mb", "require_space"]

MODELS_HINT = "free some space or pass --models-dir on a larger disk"
"""What to do when the models directory is too small (the usual case)."""
HOME_HINT = "free some space or set MESH_LLM_HOME to a directory on a larger disk"
"""What to do when the node's home (rpc cache, expert shards) is too small."""

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` is a write refused for want of space: ENOSPC (the disk) or EDQUOT (the user's quota)."""
    return isinstance(exc, OSError) and exc.errno in _FULL


def mb(n: int, *, up: bool = False) -> str:
    """`n` bytes in decimal megabytes, as a person reads them: `98 MB`, `3.5 MB`, `0 MB`.

    `up` rounds up (for what is needed), else down (for what is free), so that a shortfall never reads as
    "needs 98 MB but only 98 MB is free"."""
    value = max(n, 0) / 1e6
    if value >= 10 or value == 0:
        whole = math.ceil(value) if up else math.floor(value)
        return f"{whole} MB"
    tenths = math.ceil(value * 10) if up else math.floor(value * 10)
    return f"{tenths / 10:g} MB"


def _existing(path: Path) -> Path:
    """`path`, or the nearest parent that exists (a models directory is created only when first written)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


def free_bytes(directory: Path) -> int | None:
    """Bytes an unprivileged writer may still use on `directory`'s filesystem; None when it cannot be asked."""
    try:
        return shutil.disk_usage(_existing(directory)).free
    except OSError:
        return None


def _device(directory: Path) -> int | None:
    try:
        return os.stat(_existing(directory)).st_dev
    except OSError:
        return None


def require_space(what: str, needs: Iterable[tuple[Path, int]], *, hint: str = MODELS_HINT) -> None:
    """Refuse with `DiskFull` when the bytes `needs` would write do not fit; `what` names the thing written.

    `needs` is (directory, bytes) pairs; pairs on one filesystem are summed and reported as one. A directory
    whose free space cannot be read is not refused here (the write itself will say)."""
    by_device: dict[object, tuple[list[Path], int]] = {}
    for directory, n in needs:
        if n <= 0:
            continue
        key: object = _device(directory)
        if key is None:
            key = directory
        dirs, total = by_device.get(key, ([], 0))
        if directory not in dirs:
            dirs.append(directory)
        by_device[key] = (dirs, total + n)
    for dirs, need in by_device.values():
        free = free_bytes(dirs[0])
        if free is None or need <= free:
            continue
        where = " and ".join(str(d) for d in dirs)
        raise DiskFull(f"{what} needs {mb(need, up=True)} in {where} but only {mb(free)} is free: {hint}.")


@contextmanager
def disk_full_is_an_error(what: str, directory: Path, *, hint: str = HOME_HINT) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside the block into a `DiskFull` saying that `what` (a phrase: "writing the
    expert shard of x.gguf") failed for want of room in `directory`; other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        free = free_bytes(directory)
        left = f" ({mb(free)} free)" if free is not None else ""
        raise DiskFull(
            f"The disk holding {directory} is full{left}: {what} failed ({exc.strerror}). "
            f"{hint[:1].upper() + hint[1:]}."
        ) from exc

"""What this machine can offer: CPU cores, RAM, GPUs and their memory.

`detect()` probes (nvidia-smi for CUDA GPUs, sysconf for RAM); `parse_nvidia_smi` is pure so it is
tested without a GPU. On a machine without a GPU the serving capacity is a share of RAM.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field

MiB = 1 << 20
# On CPU-only nodes, offer this share of RAM to models (the rest stays for the OS and KV cache).
CPU_RAM_SHARE = 0.6


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class Hardware:
    cpu_cores: int
    ram_bytes: int
    gpus: tuple[GPU, ...] = field(default_factory=tuple)
    system: str = ""

    @property
    def vram_bytes(self) -> int:
        return sum(g.memory_bytes for g in self.gpus)

    @property
    def capacity_bytes(self) -> int:
        """Memory this node can give to model weights + KV cache."""
        return self.vram_bytes if self.gpus else int(self.ram_bytes * CPU_RAM_SHARE)

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["vram_bytes"] = self.vram_bytes
        d["capacity_bytes"] = self.capacity_bytes
        return d


def parse_nvidia_smi(output: str) -> tuple[GPU, ...]:
    """Parse `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits` (MiB)."""
    gpus = []
    for line in output.splitlines():
        name, _, mem = line.rpartition(",")
        if name.strip() and mem.strip().isdigit():
            gpus.append(GPU(name=name.strip(), memory_bytes=int(mem.strip()) * MiB))
    return tuple(gpus)


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _nvidia_gpus() -> tuple[GPU, ...]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ()
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return parse_nvidia_smi(out)


def detect(max_vram_gb: float | None = None) -> Hardware:
    gpus = _nvidia_gpus()
    hw = Hardware(cpu_cores=os.cpu_count() or 1, ram_bytes=_ram_bytes(), gpus=gpus, system=platform.system())
    if max_vram_gb is not None:
        cap = int(max_vram_gb * (1 << 30))
        # --max-vram caps what this node offers; model it as one device of that size at most.
        if hw.gpus:
            hw = Hardware(hw.cpu_cores, hw.ram_bytes, (GPU("capped", min(cap, hw.vram_bytes)),), hw.system)
        else:
            hw = Hardware(hw.cpu_cores, min(hw.ram_bytes, int(cap / CPU_RAM_SHARE)), (), hw.system)
    return hw

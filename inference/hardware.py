"""What this machine can offer: CPU cores, RAM, GPUs and their memory — measured, then capped.

`detect()` probes; the parsers (`parse_nvidia_smi`, `parse_meminfo`, `parse_sysctl_memsize`, `parse_device`)
and `Hardware.capacity_bytes` are pure, so they are tested without the hardware. The rules:

- NVIDIA: NVML when `pynvml` happens to be importable, else `nvidia-smi`; a GPU offers its *free* memory (total
  when free is unknown) minus 512 MiB for the CUDA context llama.cpp will create. `CUDA_VISIBLE_DEVICES` (indices)
  is honoured, and `device` ("cuda:1", "CUDA1", "1"; "cpu" for none) picks one GPU after it, as llama.cpp counts.
- Apple Silicon: unified memory; Metal gets 70 % of `hw.memsize`, leaving macOS at least 4 GiB.
- CPU only: 80 % of *available* RAM (`MemAvailable` in /proc/meminfo; total RAM elsewhere). KV cache and compute
  buffers are counted by the model's memory need, so the share only guards against other processes growing.
- `max_vram_gb` caps whatever was measured.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mesh_mcp.errors import ConfigError

MiB, GiB = 1 << 20, 1 << 30
CPU_RAM_SHARE = 0.8  # of MemAvailable
APPLE_SHARE = 0.7  # of hw.memsize
APPLE_OS_RESERVE = 4 * GiB
GPU_RESERVE = 512 * MiB  # the CUDA context and cuBLAS workspace of llama-server, outside llama.cpp's buffers

# Memory bandwidth, for predicted tokens/s only (an estimate: decode reads every weight once per token).
CPU_BANDWIDTH = 20e9
APPLE_BANDWIDTH = 100e9
GPU_BANDWIDTH = 300e9
_GPU_BANDWIDTHS = (  # name substring -> bytes/s (vendor figures), first match wins
    ("H200", 4.8e12),
    ("H100", 3.35e12),
    ("A100", 1.9e12),
    ("L40", 0.86e12),
    ("4090", 1.0e12),
    ("3090", 0.93e12),
    ("A10", 0.6e12),
    ("L4", 0.3e12),
    ("T4", 0.32e12),
)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # total
    index: int | None = None
    free_bytes: int | None = None

    @property
    def usable_bytes(self) -> int:
        free = self.memory_bytes if self.free_bytes is None else min(self.free_bytes, self.memory_bytes)
        return max(free - GPU_RESERVE, 0)

    @property
    def bandwidth_bytes_s(self) -> float:
        return next((bw for key, bw in _GPU_BANDWIDTHS if key in self.name), GPU_BANDWIDTH)


@dataclass(frozen=True)
class Hardware:
    cpu_cores: int
    ram_bytes: int
    gpus: tuple[GPU, ...] = field(default_factory=tuple)
    system: str = ""
    available_ram_bytes: int | None = None  # MemAvailable; None where unknown
    unified_memory: bool = False  # Apple Silicon: the GPU shares RAM
    cap_bytes: int | None = None  # --max-vram

    @property
    def vram_bytes(self) -> int:
        return sum(g.memory_bytes for g in self.gpus)

    @property
    def capacity_bytes(self) -> int:
        """Memory this node can give to models: weights + KV cache + compute buffers (see the module rules)."""
        if self.unified_memory:
            measured = max(min(int(self.ram_bytes * APPLE_SHARE), self.ram_bytes - APPLE_OS_RESERVE), 0)
        elif self.gpus:
            measured = sum(g.usable_bytes for g in self.gpus)
        else:
            ram = self.ram_bytes if self.available_ram_bytes is None else self.available_ram_bytes
            measured = int(ram * CPU_RAM_SHARE)
        return measured if self.cap_bytes is None else min(measured, self.cap_bytes)

    @property
    def bandwidth_bytes_s(self) -> float:
        """Estimated memory bandwidth of the device that holds the weights (the slowest GPU when several)."""
        if self.unified_memory:
            return APPLE_BANDWIDTH
        if self.gpus:
            return min(g.bandwidth_bytes_s for g in self.gpus)
        return CPU_BANDWIDTH

    def describe(self) -> str:
        """One line for the log: cores, RAM, GPUs."""
        gpus = ", ".join(f"{g.name} {g.memory_bytes / 2**30:.0f} GiB" for g in self.gpus) or "no GPU"
        return f"{self.cpu_cores} cores, {self.ram_bytes / 2**30:.0f} GiB RAM, {gpus}"

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["vram_bytes"] = self.vram_bytes
        d["capacity_bytes"] = self.capacity_bytes
        d["bandwidth_bytes_s"] = self.bandwidth_bytes_s
        return d


def _mib(text: str) -> int | None:
    text = text.strip()
    return int(float(text) * MiB) if re.fullmatch(r"\d+(\.\d+)?", text) else None


def parse_nvidia_smi(output: str) -> tuple[GPU, ...]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader,nounits` (MiB),
    or the older two-column `name,memory.total`. Rows whose memory reads `[N/A]` are skipped."""
    gpus = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) >= 4 and cells[0].isdigit():
            total, free = _mib(cells[-2]), _mib(cells[-1])
            name = ",".join(cells[1:-2]).strip()
            if name and total is not None:
                gpus.append(GPU(name=name, memory_bytes=total, index=int(cells[0]), free_bytes=free))
        elif len(cells) >= 2:
            total = _mib(cells[-1])
            name = ",".join(cells[:-1]).strip()
            if name and total is not None:
                gpus.append(GPU(name=name, memory_bytes=total, index=len(gpus)))
    return tuple(gpus)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per field (`MemTotal`, `MemAvailable`, …)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)(?:\s+kB)?\s*$", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if line.rstrip().endswith("kB") else 1)
    return out


def parse_sysctl_memsize(output: str) -> int | None:
    """`sysctl -n hw.memsize` (or `sysctl hw.memsize`) output → bytes."""
    m = re.search(r"(\d+)\s*$", output.strip())
    return int(m.group(1)) if m else None


def parse_device(device: str | int | None) -> int | str | None:
    """`--device` → a GPU position (int), "cpu", or None (all GPUs).

    Accepts 1, "1", "cuda:1", "CUDA1", "gpu1", "MTL0" (positions count as llama.cpp does: visible GPUs only)."""
    if device is None or isinstance(device, int):
        return device
    text = device.strip().lower()
    if text == "cpu":
        return "cpu"
    m = re.fullmatch(r"(?:cuda:?|gpu:?|mtl|metal:?)?(\d+)", text)
    if not m:
        raise ConfigError(f"--device {device!r}: use a GPU index (0, cuda:1, CUDA1) or cpu")
    return int(m.group(1))


def visible_gpus(gpus: Sequence[GPU], cuda_visible_devices: str | None) -> tuple[GPU, ...]:
    """The GPUs llama.cpp will see, in its order: `CUDA_VISIBLE_DEVICES` as indices (UUID lists are not
    resolved: all GPUs are kept)."""
    if cuda_visible_devices is None:
        return tuple(gpus)
    wanted = [c.strip() for c in cuda_visible_devices.split(",") if c.strip()]
    if not wanted or wanted == ["-1"]:
        return ()
    if not all(w.isdigit() for w in wanted):
        return tuple(gpus)
    by_index = {g.index: g for g in gpus}
    return tuple(by_index[int(w)] for w in wanted if int(w) in by_index)


def select_gpus(gpus: tuple[GPU, ...], device: str | int | None) -> tuple[GPU, ...]:
    choice = parse_device(device)
    if choice is None:
        return gpus
    if choice == "cpu":
        return ()
    assert isinstance(choice, int)
    if not 0 <= choice < len(gpus):
        have = f"GPUs 0–{len(gpus) - 1}" if gpus else "no NVIDIA GPU"
        raise ConfigError(f"--device {device}: this machine has {have}")
    return (gpus[choice],)


def _run(*cmd: str) -> str | None:
    exe = shutil.which(cmd[0])
    if not exe:
        return None
    try:
        return subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _nvml_gpus() -> tuple[GPU, ...] | None:
    try:
        import pynvml  # optional: only when installed
    except ImportError:
        return None
    nv: Any = pynvml
    try:
        nv.nvmlInit()
        try:
            gpus = []
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                gpus.append(GPU(name=name, memory_bytes=int(mem.total), index=i, free_bytes=int(mem.free)))
            return tuple(gpus)
        finally:
            nv.nvmlShutdown()
    except Exception:  # NVML errors have their own class tree; any failure means "ask nvidia-smi"
        return None


def _nvidia_gpus() -> tuple[GPU, ...]:
    nvml = _nvml_gpus()
    if nvml is not None:
        return nvml
    out = _run("nvidia-smi", "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits")
    return parse_nvidia_smi(out) if out else ()


def _ram() -> tuple[int, int | None]:
    """(total, available) RAM in bytes; available is None where the OS does not say."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 0
    try:
        with open("/proc/meminfo") as fh:
            info = parse_meminfo(fh.read())
    except OSError:
        return total, None
    return info.get("MemTotal", total), info.get("MemAvailable")


def detect(max_vram_gb: float | None = None, device: str | int | None = None) -> Hardware:
    """Probe this machine. `device` picks one GPU ("cuda:1") or "cpu"; `max_vram_gb` caps the capacity."""
    system = platform.system()
    total, available = _ram()
    unified = system == "Darwin" and platform.machine() == "arm64"
    if unified:
        total = parse_sysctl_memsize(_run("sysctl", "-n", "hw.memsize") or "") or total
    if unified:  # one Metal device: any --device but "cpu" means it
        gpus: tuple[GPU, ...] = ()
        unified = parse_device(device) != "cpu"
    else:
        gpus = select_gpus(visible_gpus(_nvidia_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES")), device)
    return Hardware(
        cpu_cores=os.cpu_count() or 1,
        ram_bytes=total,
        gpus=gpus,
        system=system,
        available_ram_bytes=available,
        unified_memory=unified,
        cap_bytes=None if max_vram_gb is None else int(max_vram_gb * GiB),
    )

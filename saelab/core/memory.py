"""Memory a device has left, and an up-front refusal of work that cannot fit in it.

CPU: the smallest of the kernel's MemAvailable (/proc/meminfo), what this process's memory cgroup (v2 or v1,
e.g. a container's or a SLURM job's limit) has left, and what its data-size limit (`ulimit -d`) has left. CUDA:
`torch.cuda.mem_get_info` (free bytes on the GPU). Other devices, or where nothing can be read: unknown, and
nothing is refused.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

GIB = 2**30
#: A cgroup "limit" at or above this is no limit (v1 reports about 2**63 when unset).
_NO_LIMIT = 2**60


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes this process's memory cgroup may still use (limit less usage), or None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: memory.max / memory.current
            folder = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit, usage = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
        elif "memory" in controllers.split(","):  # v1
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit = _read_int(folder / "memory.limit_in_bytes")
            usage = _read_int(folder / "memory.usage_in_bytes")
        else:
            continue
        if limit is not None and usage is not None and limit < _NO_LIMIT:
            return max(limit - usage, 0)
    return None


def _data_limit_room() -> int | None:
    """Bytes left under this process's RLIMIT_DATA (soft limit less its VmData), or None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return max(soft - int(line.split()[1]) * 1024, 0)
    except (OSError, ValueError, IndexError):
        pass
    return soft


def available_memory(device: torch.device) -> int | None:
    """Bytes `device` can still allocate (None: unknown)."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    found = [b for b in (_meminfo_available(), _cgroup_room(), _data_limit_room()) if b is not None]
    return min(found) if found else None


def check_fits(needed: int, device: torch.device, what: str, fix: str) -> None:
    """Raise MemoryError naming `what` (the estimate's parts), the device's free memory and `fix` when `needed`
    bytes exceed what `device` has left."""
    free = available_memory(device)
    if free is None or needed <= free:
        return
    raise MemoryError(
        f"{what}: about {needed / GIB:.2f} GiB, but {device} has {free / GIB:.2f} GiB available. {fix}"
    )

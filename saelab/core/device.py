"""Device names from configs: checked, `auto` resolved, and under torchrun a bare `cuda` mapped to this process's GPU."""

from __future__ import annotations

import os

import torch


def check_device_name(field: str, name: str) -> None:
    """Raise ValueError unless `name` is "auto" or a device string torch understands (cpu, cuda, cuda:1, mps...)."""
    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"{field}={name!r} is not a device torch knows; use auto, cpu, cuda, cuda:<index> or mps."
        ) from None


def resolve_device(name: str, field: str = "trainer.device") -> torch.device:
    """`auto` -> cuda or cpu; under torchrun a bare `cuda` is this process's GPU (cuda:LOCAL_RANK).
    Raises ValueError naming `field` for an unknown device or a GPU torch cannot see."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    check_device_name(field, name)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field}={name!r} but torch sees no CUDA GPU here; use {field}=cpu (or auto).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{field}={name!r} but the MPS backend is not available; use {field}=cpu (or auto).")
    return local_device(device)


def local_device(device: torch.device) -> torch.device:
    """A bare `cuda` device becomes this process's GPU, cuda:LOCAL_RANK (cuda:0 where only one GPU is visible)."""
    if device.type != "cuda" or device.index is not None or "LOCAL_RANK" not in os.environ:
        return device
    local_rank = int(os.environ["LOCAL_RANK"])
    return torch.device("cuda", local_rank if torch.cuda.device_count() > 1 else 0)

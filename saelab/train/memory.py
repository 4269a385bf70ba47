"""Memory a training run needs, estimated before anything is allocated, so a run that cannot fit is refused
naming the setting instead of dying in the allocator mid-initialisation."""

from __future__ import annotations

import torch

from saelab.core.memory import GIB, check_fits
from saelab.sae.base import SAEConfig
from saelab.sae.registry import build_sae

#: Float32 copies of the [batch, d_sae] pre-activations a step holds at its peak (the codes and their gradient).
ACTIVATION_COPIES = 2


def training_bytes(cfg: SAEConfig, batch_size: int) -> tuple[int, int]:
    """(weights + gradients + Adam's two moments, one step's [batch, d_sae] activations) in bytes for an SAE of
    resolved config `cfg`, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        sae = build_sae(cfg)
    weights = sum(p.numel() * p.element_size() for p in sae.parameters())
    buffers = sum(b.numel() * b.element_size() for b in sae.buffers())
    return 4 * weights + buffers, ACTIVATION_COPIES * batch_size * cfg.d_sae * 4


def check_training_memory(cfg: SAEConfig, batch_size: int, device: torch.device, size_setting: str) -> None:
    """Refuse (MemoryError naming `size_setting`, e.g. "sae.expansion_factor=100000", the batch size and the
    estimate) a run whose SAE, optimizer state and batch activations would not fit in `device`'s free memory.
    batch_size: the rows one process trains on per step."""
    state, activations = training_bytes(cfg, batch_size)
    check_fits(
        state + activations,
        device,
        f"training an SAE of {cfg.d_sae:,} latents on d_in={cfg.d_in} ({size_setting}) with batches of "
        f"{batch_size:,} rows (trainer.batch_size) needs its weights, gradients and Adam moments "
        f"({state / GIB:.2f} GiB) and a step's [batch, d_sae] activations ({activations / GIB:.2f} GiB)",
        "Lower the SAE's width (sae.expansion_factor or sae.d_sae) or trainer.batch_size, or train on a device "
        "with more memory.",
    )

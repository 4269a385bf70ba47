"""Memory training needs on its device, estimated from the SAE configs before anything is allocated, so that a
run (or a group of SAEs trained together) that cannot fit is refused up front, naming the setting or the jobs,
instead of failing in the allocator mid-initialisation or after the model has loaded.

Estimate per SAE: its parameters four times (weights, gradients, Adam's two moments) plus its buffers, kept for
the whole run; and the transient tensors of one training step, about `STEP_COPIES` [batch, d_sae] float32
tensors (pre-activations, codes and their gradients; a stack of S SAEs holds S of those at once). SAEs trained
together step in turn, so only the largest step's transients count, next to every SAE's state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saelab.core.memory import GIB, available_memory, check_fits
from saelab.sae.base import DTYPES, SAEConfig, SparseCodes
from saelab.sae.registry import build_sae, get_sae_class

#: [batch, d_sae] float32 tensors a step keeps: sparse-code variants (top-k selections) and dense ones.
STEP_COPIES = {"sparse": 2, "dense": 4}


def state_bytes(cfg: SAEConfig) -> int:
    """Bytes of the SAE `cfg` (d_in, d_sae resolved) and its training state: each trainable parameter four
    times (weights, gradient, Adam's two moments), other parameters and buffers once."""
    with torch.device("meta"):  # shapes only: nothing allocated, nothing drawn
        sae = build_sae(cfg)
    trained = sum(p.numel() * p.element_size() for p in sae.parameters() if p.requires_grad)
    fixed = sum(p.numel() * p.element_size() for p in sae.parameters() if not p.requires_grad)
    return 4 * trained + fixed + sum(b.numel() * b.element_size() for b in sae.buffers())


def step_bytes(cfg: SAEConfig, batch_size: int) -> int:
    """Bytes of one training step's transient tensors for the SAE `cfg` on batches of `batch_size` rows."""
    kind = "sparse" if issubclass(get_sae_class(cfg.architecture), SparseCodes) else "dense"
    itemsize = max(DTYPES[cfg.dtype].itemsize, 4)
    return STEP_COPIES[kind] * batch_size * cfg.d_sae * itemsize


def size_text(n: int) -> str:
    """Bytes as GiB (two decimals), or MiB (one) below 1 GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def check_training_memory(cfg: SAEConfig, batch_size: int, device: torch.device, size_setting: str) -> None:
    """Refuse (MemoryError naming `size_setting`, e.g. "sae.expansion_factor=100000", the batch size and the
    estimate) a run whose SAE, optimizer state and batch activations would not fit in `device`'s free memory.
    batch_size: the rows one process trains on per step."""
    state, activations = state_bytes(cfg), step_bytes(cfg, batch_size)
    check_fits(
        state + activations,
        device,
        f"training an SAE of {cfg.d_sae:,} latents on d_in={cfg.d_in} ({size_setting}) with batches of "
        f"{batch_size:,} rows (trainer.batch_size) needs its weights, gradients and Adam moments "
        f"({size_text(state)}) and a step's [batch, d_sae] activations ({size_text(activations)})",
        "Lower the SAE's width (sae.expansion_factor or sae.d_sae) or trainer.batch_size, or train on a device "
        "with more memory.",
    )


def check_group_fits(
    names: Sequence[str],
    cfgs: Sequence[SAEConfig],
    batch_size: int,
    device: torch.device,
    stack_sizes: Sequence[int],
) -> int:
    """Raise MemoryError naming the jobs (largest first) and the estimate when the SAEs `cfgs` (jobs `names`)
    with their Adam state and the largest step (a stack of up to max(stack_sizes) SAEs) do not fit in the
    memory free on `device`. Returns the estimate in bytes."""
    states = [state_bytes(cfg) for cfg in cfgs]
    largest_step = max(step_bytes(cfg, batch_size) for cfg in cfgs) * max(stack_sizes, default=1)
    total = sum(states) + largest_step
    free = available_memory(device)
    if free is None or total <= free:
        return total
    ranked = sorted(zip(states, names, strict=True), reverse=True)
    listed = ", ".join(f"{name} ({size_text(size)})" for size, name in ranked[:8])
    more = f" and {len(ranked) - 8} more" if len(ranked) > 8 else ""
    raise MemoryError(
        f"the {len(cfgs)} SAEs trained together need about {size_text(total)} on {device} (weights, gradients and Adam "
        f"state: {listed}{more}; plus {size_text(largest_step)} for a training step) but {size_text(free)} is free. Train "
        "fewer or smaller SAEs per sweep (split it by sae.* values), lower trainer.batch_size, or spread the "
        "SAEs over several GPUs (torchrun with hydra.launcher.parallel=distribute)."
    )

"""Loss terms and step statistics shared by the variants: batch-normalised FVU (exact under data parallelism),
the auxiliary dead-latent reconstruction (AuxK and MP's revival term), the dead latents' pre-activation loss
(JumpReLU, gated), and fired / L0 of a batch's codes."""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.kernels import sparse_decode
from saelab.kernels.select import dead_topk
from saelab.parallel import global_batch


def fraction_of_variance_unexplained(x: Tensor, x_hat: Tensor) -> Tensor:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over a batch [B, d]; float32 (or float64) scalar, summed in
    at least float32 whatever the inputs' dtype. x must carry no gradient.

    In data-parallel training (`global_batch.sharded`) x, x_hat are this rank's rows of the global batch and the
    value is W * (their squared error) / (the global batch's denominator): its mean over the W ranks, and the
    mean of its gradients that DDP takes, are the global batch's FVU and gradient.
    """
    wide = at_least_float32(x, x_hat)  # a float16 sum of squares overflows at 65504
    error = (x.to(wide) - x_hat.to(wide)).pow(2).sum()
    return global_batch.ranks() * error / global_batch.centred_sumsq(x).clamp_min(1e-12)


def at_least_float32(*tensors: Tensor) -> torch.dtype:
    """The tensors' common dtype promoted to at least float32 (float64 stays float64)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def warmup_factor(step: int, total_steps: int, warmup_frac: float) -> float:
    """A penalty's weight factor at `step`: linear from 1 / warmup to 1 over the first warmup_frac * total_steps
    steps (warmup), then 1; 1 throughout when that is under one step."""
    warmup = warmup_frac * total_steps
    return min(1.0, (step + 1) / warmup) if warmup >= 1 else 1.0


def dead_pre_act_loss(pre: Tensor, threshold: Tensor | float, W_dec: Tensor, dead_mask: Tensor) -> Tensor:
    """Mean over rows of sum_i ReLU(threshold_i - pre_i) ||W_dec,i|| over the dead latents (dead_mask [n]), from
    pre-activations pre [B, n] and the thresholds they must pass to fire (threshold [n], or 0 for a gate):
    Anthropic's pre-act loss (January 2025), here only on latents the trainer counts as dead. A latent whose
    pre-activations all sit below its threshold gets no gradient from the reconstruction; this pulls them up to it
    (and a learned threshold down to them) until the latent fires and the other terms reach it again."""
    gap = (torch.as_tensor(threshold, dtype=pre.dtype, device=pre.device) - pre).relu()
    weight = W_dec.norm(dim=1).to(pre.dtype) * dead_mask
    return (gap * weight).sum(dim=-1, dtype=at_least_float32(pre)).mean()


def auxiliary_k(configured: int, d_in: int, d_sae: int) -> int:
    """How many dead latents an auxiliary loss may use: `configured`, or d_in // 2 when it is 0; at most d_sae."""
    return min(configured or max(d_in // 2, 1), d_sae)


def dead_residual_loss(residual: Tensor, residual_hat: Tensor, n_dead: Tensor, aux_k: int) -> Tensor:
    """min(n_dead / aux_k, 1) * FVU of the detached residual [B, d] rebuilt as residual_hat [B, d] from dead
    latents (Gao et al.'s AuxK scaling; n_dead: scalar count of dead latents); NaN -> 0."""
    scale = (n_dead / aux_k).clamp(max=1.0)
    return (scale * fraction_of_variance_unexplained(residual, residual_hat)).nan_to_num(0.0)


def dense_auxk_reconstruction(
    pre: Tensor, dead_mask: Tensor, W_dec: Tensor, aux_k: int
) -> tuple[Tensor, Tensor]:
    """AuxK's residual reconstruction for a variant with dense pre-activations pre [B, n] (with gradient): each
    row's top aux_k pre-activations among the dead latents (dead_mask [n]), ReLU, decoded without b_dec by the
    rows of W_dec [n, d]. Returns (residual_hat [B, d], n_dead: scalar count of dead latents)."""
    with torch.no_grad():
        _, indices = dead_topk(pre.detach().clone(), dead_mask, min(aux_k, pre.shape[1]))
    values = (
        pre.gather(1, indices).relu() * dead_mask[indices]
    )  # slots past the dead count carry live latents
    return sparse_decode(values, indices, W_dec), dead_mask.sum()


@torch.no_grad()
def dense_activity(active: Tensor) -> tuple[Tensor, Tensor]:
    """active [B, n] bool -> (fired [n] bool: active on any row, l0: scalar mean active latents per row)."""
    return active.any(dim=0), active.sum(dim=1).float().mean()


@torch.no_grad()
def sparse_activity(active: Tensor, indices: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """active [B, w] bool over the slots indices [B, w] -> (fired [d_sae] bool, l0: scalar mean per row)."""
    counts = torch.zeros(d_sae, dtype=torch.int32, device=indices.device)
    fired = counts.index_add_(0, indices.reshape(-1), active.reshape(-1).int()) > 0
    return fired, active.sum(dim=-1).float().mean()

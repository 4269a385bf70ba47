"""The plain-autograd TopK + AuxK training pass that the sparse kernels replace: the baseline of
`scripts/bench_train.py` and the behaviour the fast path must reproduce.

Everything goes through dense [B, n] autograd: torch.topk on the pre-activations, an embedding-bag decoder
with PyTorch's own backward, and AuxK's masked top-k, so backward runs two dense [B, n] x [n, d] products.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.sae.base import TrainContext, TrainOutput


def _fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    return (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)


def _decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def plain_topk_training_forward(sae: Any, x: Tensor, ctx: TrainContext) -> TrainOutput:
    """TopK SAE training pass (Gao et al. 2024: FVU + aux_k_coef * AuxK) on x [B, d_in] with dense autograd.

    `sae` is a TopKSAE (W_enc, b_enc, W_dec, b_dec, cfg.k, cfg.aux_k_coef, aux_k, d_sae).
    """
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(sae.cfg.k, dim=-1, sorted=False)
    values = values.relu()
    x_hat = _decode(values, indices, sae.W_dec) + sae.b_dec
    fvu = _fvu(x, x_hat)
    loss = fvu
    metrics = {"fvu": fvu.detach()}
    if sae.cfg.aux_k_coef > 0 and ctx.any_dead:
        dead_pre = pre.masked_fill(~ctx.dead_mask, -torch.inf)
        aux_values, aux_indices = dead_pre.topk(sae.aux_k, dim=-1, sorted=False)
        residual = x - x_hat.detach()
        scale = (ctx.dead_mask.sum() / sae.aux_k).clamp(max=1.0)
        auxk = (scale * _fvu(residual, _decode(aux_values.relu(), aux_indices, sae.W_dec))).nan_to_num(0.0)
        loss = loss + sae.cfg.aux_k_coef * auxk
        metrics["auxk"] = auxk.detach()
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    fired[indices[values > 0]] = True
    l0 = (values > 0).sum(dim=-1).float().mean()
    return TrainOutput(loss=loss, x_hat=x_hat, fired=fired, l0=l0, metrics=metrics)

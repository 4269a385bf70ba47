"""Sparse encoder gradient for pre = (x - b_dec) @ W_enc + b_enc followed by a top-k style selection.

The selection (TopK, AuxK's dead top-k, ...) runs without autograd on the detached pre-activations and
yields values [B, K] and indices [B, K] where every value is either pre[b, indices[b, j]] (kept) or exactly
0 (dropped, e.g. by the ReLU). `sparse_encoder_values` returns those values unchanged but attached to the
encoder parameters, so that backward costs O(B * K * d) instead of the two dense [B, n] x [n, d] products
(grad W_enc and grad of the input through b_dec) of plain autograd:

    g = grad_values * (values != 0)                 the ReLU / keep mask, as in plain autograd
    grad W_enc[:, i] = sum_{slots on latent i} g * (x_b - b_dec)
    grad b_enc[i] = sum_{slots on latent i} g
    grad b_dec = -W_enc @ grad b_enc,   grad x_b = sum_j g[b, j] * W_enc[:, indices[b, j]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from saelab.kernels.auxk import AuxGradients
from saelab.kernels.backend import encoder_grad_dense, rows_dtype
from saelab.kernels.decode import check_codes
from saelab.kernels.rows import SlotPlan, accumulate_rows


class _SparseEncoderValues(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        values: Tensor,
        indices: Tensor,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        plan: SlotPlan,
        aux: AuxGradients | None,
    ) -> Tensor:
        ctx.plan, ctx.rows_dtype, ctx.aux = plan, rows_dtype(W_enc.device, W_enc.dtype), aux
        ctx.save_for_backward(values, indices, x, W_enc, b_dec)
        return values.view_as(values)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_values: Tensor) -> tuple[Tensor | None, ...]:
        values, indices, x, W_enc, b_dec = ctx.saved_tensors
        n = W_enc.shape[1]
        g = torch.where(values != 0, grad_values, 0).to(W_enc.dtype)
        grad_b_enc = torch.zeros(n, dtype=W_enc.dtype, device=W_enc.device).index_add_(
            0, indices.reshape(-1), g.reshape(-1)
        )
        if ctx.aux is not None:  # AuxK's share, before grad b_dec is taken from grad b_enc
            grad_b_enc = ctx.aux.add_to(grad_b_enc, "b_enc")
        grad_x = grad_W_enc = grad_b_dec = None
        if ctx.needs_input_grad[2]:
            grad_x = F.embedding_bag(indices, W_enc.T, mode="sum", per_sample_weights=g).to(x.dtype)
        if ctx.needs_input_grad[3]:
            centred = (x - b_dec).to(ctx.rows_dtype)
            grad_W_enc = encoder_weight_grad(ctx.plan, g, centred, grad_values.dtype, W_enc.dtype)
            if ctx.aux is not None:
                grad_W_enc = ctx.aux.add_to(grad_W_enc, "W_enc_columns")
        if ctx.needs_input_grad[5]:
            grad_b_dec = -(W_enc @ grad_b_enc).to(b_dec.dtype)
        grad_b_enc = grad_b_enc if ctx.needs_input_grad[4] else None
        return None, None, grad_x, grad_W_enc, grad_b_enc, grad_b_dec, None, None


def encoder_weight_grad(
    plan: SlotPlan, g: Tensor, centred: Tensor, compute_dtype: torch.dtype, out_dtype: torch.dtype
) -> Tensor:
    """grad W_enc [d, n] in out_dtype = centred^T @ S for the sparse [B, n] matrix S holding g [B, K] at the
    plan's indices: a scatter of the B * K slots, or (backend.encoder_grad_dense) one dense GEMM in
    compute_dtype."""
    if not encoder_grad_dense():
        return accumulate_rows(plan, g, centred, out_dtype=out_dtype).T
    batch = g.shape[0]
    codes = torch.zeros(batch, plan.n, dtype=compute_dtype, device=g.device)
    codes.scatter_add_(1, plan.indices, g.to(compute_dtype))
    return (centred.to(compute_dtype).T @ codes).to(out_dtype)


def sparse_encoder_values(
    values: Tensor,
    indices: Tensor,
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    plan: SlotPlan | None = None,
    aux: AuxGradients | None = None,
) -> Tensor:
    """Differentiable copy of selected code values [B, K] (see the module docstring for the contract).

    values, indices: [B, K] from a no-grad selection on pre = (x - b_dec) @ W_enc + b_enc; x [B, d_in];
    W_enc [d_in, n]; b_enc [n]; b_dec [d_in]. Gradients flow to x, W_enc, b_enc and b_dec only.
    plan: a SlotPlan of `indices` to share its sort with the decoder's backward. aux: the step's gathered
    AuxK gradients, whose encoder columns and b_enc entries (and so b_dec's share) this backward takes in.
    """
    check_codes(values, indices)
    if values.shape[0] != x.shape[0]:
        raise ValueError(
            f"codes have {values.shape[0]} rows but x has {x.shape[0]}; pass the batch they encode."
        )
    plan = plan or SlotPlan(indices, W_enc.shape[1])
    return _SparseEncoderValues.apply(values.detach(), indices, x, W_enc, b_enc, b_dec, plan, aux)

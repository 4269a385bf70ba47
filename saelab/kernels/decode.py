"""Sparse decoder: x_hat = sum_j values[:, j] * W_dec[indices[:, j]] (+ b_dec), with a sparse backward.

Forward is one embedding bag (or the Triton decode kernel, see `backend`), O(B * K * d). Backward touches only the K active rows per sample:
grad W_dec[i] = sum over slots using latent i of value * grad_out (a bag per latent, O(B * K * d)) and
grad values[b, j] = <W_dec[indices[b, j]], grad_out[b]>. A dense decoder would cost 2 * B * n * d each way.
The columns of the codes may be split into groups decoded separately (TopK and AuxK codes in one call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from saelab.kernels.auxk import AuxGradients
from saelab.kernels.backend import rows_dtype, sparse_backend, triton_kernels
from saelab.kernels.rows import SlotPlan, accumulate_rows, gather_dot, group_bags


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        values: Tensor,
        indices: Tensor,
        weight: Tensor,
        sizes: tuple[int, ...],
        plan: SlotPlan,
        aux: AuxGradients | None,
    ) -> Tensor:
        # table: the rows the kernels gather, weight itself or its copy in backend.rows_dtype (kept for backward)
        table = weight.to(rows_dtype(weight.device, weight.dtype))
        ctx.sizes, ctx.plan, ctx.weight_dtype, ctx.aux = sizes, plan, weight.dtype, aux
        ctx.save_for_backward(values, indices, table)
        if sparse_backend(weight.device) == "triton":
            return triton_kernels().decode_rows(values, indices, table, sizes).to(weight.dtype)
        weights = values.to(weight.dtype)
        if len(sizes) == 1:
            return F.embedding_bag(indices, weight, mode="sum", per_sample_weights=weights)[:, None]
        offsets, _ = group_bags(values.shape[0], sizes, values.device)
        flat = F.embedding_bag(
            rearrange(indices, "b k -> (b k)"),
            weight,
            offsets,
            mode="sum",
            per_sample_weights=weights.flatten(),
        )
        return rearrange(flat, "(b g) d -> b g d", g=len(sizes))

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, None, Tensor | None, None, None, None]:
        values, indices, table = ctx.saved_tensors
        batch, groups = values.shape[0], len(ctx.sizes)
        grad_rows = rearrange(grad_out, "b g d -> (b g) d").to(table.dtype)
        row_of_slot = None
        if groups > 1:
            _, column_group = group_bags(batch, ctx.sizes, values.device)
            row_of_slot = torch.arange(batch, device=values.device)[:, None] * groups + column_group
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_values = gather_dot(indices, table, grad_rows, ctx.sizes, out_dtype=values.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = accumulate_rows(
                ctx.plan, values, grad_rows, row_of_slot, out_dtype=ctx.weight_dtype
            )
            if ctx.aux is not None:
                grad_weight = ctx.aux.add_to(grad_weight, "W_dec_rows")
        return grad_values, None, grad_weight, None, None, None


def check_codes(values: Tensor, indices: Tensor) -> None:
    if values.shape != indices.shape or values.ndim != 2:
        raise ValueError(
            f"sparse codes need values and indices of the same [batch, K] shape, got "
            f"{tuple(values.shape)} and {tuple(indices.shape)}."
        )


def sparse_decode_groups(
    values: Tensor,
    indices: Tensor,
    weight: Tensor,
    sizes: tuple[int, ...],
    plan: SlotPlan | None = None,
    aux: AuxGradients | None = None,
) -> Tensor:
    """Codes (values [B, K], indices [B, K] into weight [n, d]) whose K columns form consecutive groups of
    `sizes` -> [B, G, d], group g decoded on its own. plan: a SlotPlan of `indices` to share its sort. aux:
    the step's gathered AuxK gradients, whose decoder rows the weight gradient takes in (`saelab.kernels.auxk`)."""
    check_codes(values, indices)
    if sum(sizes) != values.shape[1]:
        raise ValueError(f"column groups {sizes} must add up to the codes' width K={values.shape[1]}.")
    return _SparseDecode.apply(
        values, indices, weight, tuple(sizes), plan or SlotPlan(indices, weight.shape[0]), aux
    )


def sparse_decode(
    values: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None = None, plan: SlotPlan | None = None
) -> Tensor:
    """(values [B, K], indices [B, K] into weight [n, d], optional bias [d]) -> [B, d] in weight's dtype."""
    out = sparse_decode_groups(values, indices, weight, (values.shape[1],), plan)[:, 0]
    return out if bias is None else out + bias

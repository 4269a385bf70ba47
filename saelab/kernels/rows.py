"""Row gather/scatter primitives for sparse codes (values [B, K], indices [B, K] into a table [n, d]).

They run in O(B * K * d) and never build a [B, n] or [B, K, d] tensor: on fused `embedding_bag` kernels
(the CPU path), or on the Triton kernels of `triton_rows`, which stay balanced when a few latents are hit
by every row (`backend.sparse_backend` picks per device). A slot is one (b, j) entry of the codes; the slots of a row may be split into column
groups that are summed separately (bags), e.g. TopK codes and AuxK codes of the same row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from saelab.kernels.backend import sparse_backend, triton_kernels


class SlotPlan:
    """The slots of indices [B, K] grouped by latent, for scatters into an [n, d] table.

    The sort runs on first use and is then shared by every scatter over the same indices (the encoder and
    decoder backward of one step), so a step sorts its B * K slots once.
    """

    def __init__(self, indices: Tensor, n: int):
        self.indices, self.n = indices, n
        self._sorted: tuple[Tensor, Tensor] | None = None
        self._offsets: Tensor | None = None

    def sorted_slots(self) -> tuple[Tensor, Tensor]:
        """(latents [B * K] ascending, order [B * K]: the slots in that order)."""
        if self._sorted is None:
            self._sorted = rearrange(self.indices, "b k -> (b k)").sort()
        return self._sorted

    def sorted(self) -> tuple[Tensor, Tensor]:
        """(order [B * K]: slots sorted by latent, offsets [n]: where each latent's slots start in order)."""
        latents, order = self.sorted_slots()
        if self._offsets is None:
            self._offsets = torch.searchsorted(
                latents, torch.arange(self.n, device=latents.device)
            )  # no sync
        return order, self._offsets


def group_bags(batch: int, sizes: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """Bags for rows split into column groups of `sizes`: (offsets [B * G] into the flattened [B, K] slots,
    bag of each column [K]); bag b * G + g sums row b's columns of group g. Built from Python ints with
    device ops only (no host-to-device copy, hence no sync on CUDA)."""
    row_start = torch.arange(batch, device=device) * sum(sizes)
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    offsets = rearrange(torch.stack([row_start + s for s in starts], dim=1), "b g -> (b g)")
    column_group = torch.cat([torch.full((size,), g, device=device) for g, size in enumerate(sizes)])
    return offsets, column_group


def accumulate_rows(
    plan: SlotPlan,
    weights: Tensor,
    rows: Tensor,
    row_of_slot: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """out[i] = sum over slots s on latent i of weights[s] * rows[row_of_slot[s]]; returns [n, d] in
    out_dtype (default: rows' dtype).

    weights: [B, K]; rows: [R, d]; row_of_slot: [B, K] indices into rows (default: the slot's own row b, with
    R = B). With the default this is S^T @ rows for the sparse [B, n] matrix S holding `weights` at the
    plan's indices: each latent's slots, contiguous in the plan's order, are summed as one bag. The Triton
    path sums in float32 whatever rows' dtype (bfloat16 rows halve the bytes gathered).
    """
    latents, order = plan.sorted_slots()
    if row_of_slot is None:
        row_ids = torch.div(order, weights.shape[1], rounding_mode="floor")
    else:
        row_ids = rearrange(row_of_slot, "b k -> (b k)")[order]
    slot_weights = rearrange(weights, "b k -> (b k)")[order]
    out_dtype = out_dtype or rows.dtype
    if sparse_backend(rows.device) == "triton":
        return triton_kernels().segment_accumulate(latents, row_ids, slot_weights, rows, plan.n).to(out_dtype)
    _, offsets = plan.sorted()
    summed = F.embedding_bag(
        row_ids, rows, offsets, mode="sum", per_sample_weights=slot_weights.to(rows.dtype)
    )
    return summed.to(out_dtype)


def gather_dot(
    indices: Tensor,
    table: Tensor,
    rows: Tensor,
    sizes: tuple[int, ...] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """out[b, j] = <table[indices[b, j]], rows[bag of slot (b, j)]> -> [B, K] in out_dtype (default: table's).

    indices [B, K] into table [n, d]; without sizes each row is one bag and rows is [B, d]; with column-group
    sizes (see `group_bags`) rows holds one [d] vector per bag, [B * G, d]. On the torch path this is the
    per-sample-weight gradient of an embedding bag, whose kernel never materialises the gathered rows.
    """
    out_dtype = out_dtype or table.dtype
    if sparse_backend(table.device) == "triton":
        return triton_kernels().gather_dot(indices, table, rows, sizes or (indices.shape[1],)).to(out_dtype)
    offsets = None if sizes is None else group_bags(indices.shape[0], sizes, indices.device)[0]
    with torch.enable_grad():
        probe = torch.ones(indices.shape, dtype=table.dtype, device=table.device, requires_grad=True)
        flat_probe = rearrange(probe, "b k -> (b k)") if offsets is not None else probe
        flat_indices = rearrange(indices, "b k -> (b k)") if offsets is not None else indices
        bags = F.embedding_bag(
            flat_indices, table.detach(), offsets, mode="sum", per_sample_weights=flat_probe
        )
        (grad,) = torch.autograd.grad(bags, probe, rows.to(table.dtype))
    return grad.to(out_dtype)

"""AuxK on the gathered dead sub-dictionary (Gao et al. 2024's auxiliary loss, computed densely).

While few latents are dead, AuxK's top aux_k dead latents are nearly the same in every row, so routing them
through per-latent bags makes a few huge bags (slow on GPU) and, when fewer than aux_k latents are dead,
pads every row with empty slots (slow on CPU). Here the C candidate dead latents are gathered once:

    pre_dead = pre[:, dead]                      [B, C]  (no matmul: a gather of the selection's pre-activations)
    Z        = top aux_k of each row of pre_dead, ReLU, scattered back into [B, C]
    e_hat    = Z @ W_dec[dead]                   [B, d]  (dense GEMM)

and backward is three more dense GEMMs of the same size (grad Z, grad W_dec[dead], grad W_enc[:, dead]).
Those sub-dictionary gradients go into `AuxGradients`, which the sparse decode and encoder backwards (run after
this one) add into the full-size gradient buffers they build anyway: no zero-filled [n, d] gradient per
parameter and no extra full-size addition in autograd's accumulation.

The candidate list comes from the trainer: `dead_latent_list` runs at its periodic dead-latent check (the
one host sync that check already makes) and pads the list to a bucketed capacity, so a step uses device
ops only and shapes change rarely. A candidate that revived since the check is masked out with the
step's dead mask; a latent that died since is picked up at the next check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from saelab.kernels.backend import auxk_dense
from saelab.kernels.select import dead_topk, topk_select


def dead_list_capacity(count: int) -> int:
    """Padded length for `count` dead latents: 0 for none, else `count` rounded up to a multiple of
    max(16, 2**(bits(count) - 4)): at most 15 or 12.5% padding, and few distinct shapes as the count drifts."""
    if count == 0:
        return 0
    step = 2 ** max(count.bit_length() - 4, 4)
    return -(-count // step) * step


def dead_latent_list(dead_mask: Tensor) -> Tensor:
    """Indices of the dead latents of dead_mask [n], padded with n to `dead_list_capacity` -> [C] int64.

    Reads the count on the host (a device sync on CUDA): call it at the periodic dead-latent check."""
    dead = dead_mask.nonzero().squeeze(1)
    n, count = dead_mask.shape[0], dead.numel()
    return F.pad(dead, (0, dead_list_capacity(count) - count), value=n)


def gather_dead(pre: Tensor, dead_latents: Tensor, dead_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(pre [B, n], padded candidates [C], dead_mask [n]) -> (pre_dead [B, C] with -inf where a candidate is
    padding or no longer dead, latents [C] clamped into [0, n), n_dead: scalar count of valid candidates)."""
    n = dead_mask.shape[0]
    valid = F.pad(dead_mask, (0, 1))[dead_latents]
    latents = dead_latents.clamp(max=n - 1)
    pre_dead = pre.index_select(1, latents).masked_fill_(~valid, -torch.inf)
    return pre_dead, latents, valid.sum()


def dead_codes(pre_dead: Tensor, aux_k: int) -> Tensor:
    """Each row's top aux_k of pre_dead [B, C] after ReLU, zeros elsewhere -> [B, C] (all of a row when C <= aux_k)."""
    if pre_dead.shape[1] <= aux_k:
        return pre_dead.relu()
    values, positions = topk_select(pre_dead, aux_k)
    return torch.zeros_like(pre_dead).scatter_(1, positions, values.relu())


@dataclass
class AuxGradients:
    """AuxK's gradients on the gathered latents [C], handed from the gathered AuxK backward to the sparse
    kernels' backwards, which add them into their full-size gradient buffers (`add_to`). W_dec_rows [C, d]
    (rows of grad W_dec), W_enc_columns [d, C] (columns of grad W_enc), b_enc [C]; None until written."""

    latents: Tensor
    W_dec_rows: Tensor | None = None
    W_enc_columns: Tensor | None = None
    b_enc: Tensor | None = None

    def add_to(self, grad: Tensor, part: str) -> Tensor:
        """grad with the `part` ("W_dec_rows": grad [n, d], "W_enc_columns": [d, n], "b_enc": [n]) added at the
        latents, in place; then that part is released. grad is unchanged when the part was not written."""
        rows = getattr(self, part)
        if rows is None:
            return grad
        setattr(self, part, None)
        return grad.index_add_(1 if part == "W_enc_columns" else 0, self.latents, rows.to(grad.dtype))


class _GatheredAuxDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        codes: Tensor,
        x: Tensor,
        W_enc: Tensor,
        b_dec: Tensor,
        W_dec: Tensor,
        gradients: AuxGradients,
        after: Tensor,
    ) -> Tensor:
        ctx.gradients = gradients
        ctx.save_for_backward(codes, x, W_enc, b_dec, W_dec)
        return (codes @ W_dec.index_select(0, gradients.latents).to(codes.dtype)).to(W_dec.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        codes, x, W_enc, b_dec, W_dec = ctx.saved_tensors
        out, latents, dtype = ctx.gradients, ctx.gradients.latents, codes.dtype
        grad_out = grad_out.to(dtype)
        # gradient of the kept pre-activations: through the ReLU and the selection, as in plain autograd
        g = torch.where(codes != 0, grad_out @ W_dec.index_select(0, latents).to(dtype).T, 0)
        out.W_dec_rows = codes.T @ grad_out
        out.W_enc_columns = (x - b_dec).to(dtype).T @ g
        out.b_enc = g.sum(dim=0, dtype=W_enc.dtype)
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = (g @ W_enc.index_select(1, latents).to(dtype).T).to(x.dtype)
        return None, grad_x, None, None, None, None, None


def gathered_auxk_decode(
    codes: Tensor,
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor,
    W_dec: Tensor,
    gradients: AuxGradients,
    after: Tensor,
) -> Tensor:
    """AuxK's reconstruction of the residual, e_hat = codes @ W_dec[latents] -> [B, d] in W_dec's dtype, for
    the latents [C] of `gradients`.

    codes [B, C] (detached, from `dead_codes` on pre = (x - b_dec) @ W_enc + b_enc gathered at the latents):
    each entry is that pre-activation or exactly 0. The gradient of x is returned; those of W_dec[latents] and,
    through the nonzero codes, W_enc[:, latents] and b_enc[latents] (and so b_dec's share) are written into
    `gradients`, which the same step's `sparse_encoder_values` and `sparse_decode_groups` were given: their
    backwards add them into the full-size gradients they build, exactly as dense autograd would send them.
    after: the sparse decode's output, which makes this backward run before theirs. The GEMMs run in codes'
    dtype (bf16 under autocast)."""
    return _GatheredAuxDecode.apply(codes.detach(), x, W_enc, b_dec, W_dec, gradients, after)


@dataclass
class AuxSelection:
    """AuxK's codes for one batch. Dense: codes [B, C] over the latents [C] of `gradients`, the AuxGradients
    that `gathered_auxk_decode` hands to the sparse kernels. Sparse: values, indices [B, w] that join the TopK
    codes in the sparse kernels. n_dead: scalar count of dead latents."""

    n_dead: Tensor
    codes: Tensor | None = None
    values: Tensor | None = None
    indices: Tensor | None = None
    gradients: AuxGradients | None = None

    @property
    def dense(self) -> bool:
        return self.codes is not None


def select_auxk(
    pre: Tensor, dead_mask: Tensor, dead_latents: Tensor | None, aux_k: int, dense: bool | None = None
) -> AuxSelection:
    """AuxK's selection from detached pre-activations pre [B, n] (may be overwritten) and dead_mask [n].

    With a candidate list dead_latents [C] (`dead_latent_list`) only those columns are read, and
    `backend.auxk_dense` picks the dense product or the sparse codes (dense=False: always the sparse codes);
    without one, a masked top-k over all of n (sparse codes). Device ops only, on CUDA no host sync."""
    if dead_latents is None:
        values, indices = dead_topk(pre, dead_mask, aux_k)
        return AuxSelection(dead_mask.sum(), values=values.relu(), indices=indices)
    pre_dead, latents, n_dead = gather_dead(pre, dead_latents, dead_mask)
    if dense is not False and auxk_dense(pre.device, latents.numel(), aux_k):
        codes = dead_codes(pre_dead, aux_k)
        return AuxSelection(n_dead, codes=codes, gradients=AuxGradients(latents))
    values, positions = topk_select(pre_dead, min(aux_k, latents.numel()))
    return AuxSelection(n_dead, values=values.relu(), indices=latents[positions])

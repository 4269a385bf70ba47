"""SAE codes in either form: dense z [B, n], or sparse (values [B, k], indices [B, k]) from TopK-style SAEs.

Everything downstream (dead-latent counts, L0, L1) works on both forms; the sparse form costs O(B*k).
A latent counts as active on a row when its code is nonzero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.sae.base import SAE

Codes = Tensor | tuple[Tensor, Tensor]


def encode_codes(sae: SAE, x: Tensor) -> Codes:
    """x [B, d_in] -> sparse (values, indices) when the SAE has encode_sparse / decode_sparse, else dense z [B, n]."""
    if hasattr(sae, "encode_sparse") and hasattr(sae, "decode_sparse"):
        return sae.encode_sparse(x)
    return sae.encode(x)


def decode_codes(sae: SAE, codes: Codes) -> Tensor:
    """Codes -> x_hat [B, d_in]."""
    if isinstance(codes, tuple):
        return sae.decode_sparse(*codes)
    return sae.decode(codes)


def output_of(sae: SAE, x: Tensor, codes: Codes) -> Tensor:
    """The output for input x [B, d_in] from its codes: the reconstruction [B, d_in], or a transcoder's
    prediction [B, d_out] (skip term included)."""
    decoded = decode_codes(sae, codes)
    return sae.predict(x, decoded) if sae.is_transcoder else decoded


def n_rows(codes: Codes) -> int:
    return (codes[0] if isinstance(codes, tuple) else codes).shape[0]


def active_mask(codes: Codes) -> Tensor:
    """[B, n] bool for dense codes, [B, k] bool (which kept slots are nonzero) for sparse codes."""
    values = codes[0] if isinstance(codes, tuple) else codes
    return values != 0


def fire_counts(codes: Codes, d_sae: int) -> Tensor:
    """Per-latent number of rows on which it is active: [n] long. O(B*k) for sparse codes."""
    if isinstance(codes, tuple):
        values, indices = codes
        counts = torch.zeros(d_sae, dtype=torch.long, device=indices.device)
        return counts.index_add_(0, indices.reshape(-1), (values != 0).reshape(-1).long())
    if codes.shape[-1] != d_sae:
        raise ValueError(f"dense codes have {codes.shape[-1]} latents, expected d_sae={d_sae}.")
    return (codes != 0).sum(dim=0)


def l0_per_row(codes: Codes) -> Tensor:
    """Active latents per row: [B] float64."""
    return active_mask(codes).sum(dim=-1).double()


def l1_per_row(codes: Codes) -> Tensor:
    """Sum of absolute codes per row, accumulated in float64: [B] float64."""
    values = codes[0] if isinstance(codes, tuple) else codes
    return values.abs().sum(dim=-1, dtype=torch.float64)


def to_dense(codes: Codes, d_sae: int) -> Tensor:
    """Codes -> dense z [B, n] (duplicate sparse indices are summed)."""
    if not isinstance(codes, tuple):
        return codes
    values, indices = codes
    dense = torch.zeros(values.shape[0], d_sae, dtype=values.dtype, device=values.device)
    return dense.scatter_add_(1, indices, values)


def select_rows(codes: Codes, rows: Tensor | slice) -> Codes:
    """Keep the rows picked by a [B] bool mask, an index tensor or a slice, of dense or sparse codes."""
    if isinstance(codes, tuple):
        return codes[0][rows], codes[1][rows]
    return codes[rows]

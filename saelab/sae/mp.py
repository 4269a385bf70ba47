"""Matching-pursuit SAE (Costa, Fel, Lubana, Tolooshams, Ba 2025, "From Flat to Hierarchical").

A tied dictionary D = W_dec [n, d_in] of unit rows; the encoder is D^T (there is no W_enc or b_enc
parameter). Encoding runs k greedy pursuit steps on r_0 = x - b_dec:

    j_t = argmax_i <r_{t-1}, D_i>,   c_t = max(<r_{t-1}, D_j_t>, 0),   z_j_t += c_t,   r_t = r_{t-1} - c_t D_j_t

and x_hat = x - r_k = b_dec + z @ D. Since ||r_t||^2 = ||r_{t-1}||^2 - c_t^2 for unit atoms, the residual
never grows, so k may be raised at inference (`encode(x, k=...)`). Gradients flow through the values c_t and
the residual chain; the argmax selection is not differentiated. Selection needs the correlations r_t @ D^T
for every step: they are either recomputed (k matmuls of B x d x n) or updated with the Gram matrix
G = D D^T (corr -= c_t G[j_t], one n x n x d matmul then O(B n) memory-bound work per step), which is
cheaper when n is small next to k * B and d_in is not tiny. The values themselves are always the exact
inner products with the running residual, so both paths give the same codes.

Loss = FVU + aux_k_coef * revival, where the revival term is AuxK adapted to a tied dictionary: the top
`aux_k` dead atoms by correlation with the detached residual e = x - x_hat reconstruct e as
sum_i max(<e, D_i>, 0) D_i, scored by FVU against e. Without it, atoms that never win an argmax receive no
gradient and stay dead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelab.core.checks import check_number
from saelab.sae.base import SAE, SAEConfig, SparseCodes, TrainContext, TrainOutput, tenfold_gao_lr
from saelab.sae.losses import (
    auxiliary_k,
    dead_residual_loss,
    dense_activity,
    fraction_of_variance_unexplained,
)
from saelab.sae.registry import register

GRAM_MODES = ("auto", "always", "never")
#: "auto" keeps the Gram matrix only up to this many entries (2^26 floats = 256 MiB in float32) ...
GRAM_MAX_ENTRIES = 2**26
#: ... and only from this input width on: below it a correlation matmul costs about what the memory-bound
#: Gram update does (measured in scripts/bench_recovery.py).
GRAM_MIN_D_IN = 128


@dataclass
class MPConfig(SAEConfig):
    """k: pursuit steps per row. aux_k: dead atoms the revival term may use (0 -> d_in // 2).
    aux_k_coef: revival weight (0 disables). gram: "always" selects by Gram-matrix updates, "never" by
    recomputed correlations, "auto" by the Gram matrix when d_in >= 128, 2 * d_sae <= k * batch and the
    Gram matrix has at most 2^26 entries.
    """

    architecture: str = "mp"
    k: int = 32
    aux_k: int = 0
    aux_k_coef: float = 1.0 / 32.0
    gram: str = "auto"

    def validate(self) -> None:
        super().validate()
        check_number("sae.k", self.k, low=1, integer=True, hint="It is the number of pursuit steps.")
        check_number("sae.aux_k", self.aux_k, low=0, integer=True, hint="0 means d_in // 2.")
        check_number("sae.aux_k_coef", self.aux_k_coef, low=0, hint="0 disables the revival term.")
        if self.gram not in GRAM_MODES:
            raise ValueError(f"sae.gram={self.gram!r} must be one of {list(GRAM_MODES)}.")


@register("mp")
class MatchingPursuitSAE(SparseCodes, SAE):
    config_class = MPConfig
    data_parallel = True
    required_fields = ("d_in", "d_sae", "k")
    k_at_most_d_sae = False  # pursuit steps may pick an atom again
    unit_norm_decoder = True
    cfg: MPConfig

    def create_parameters(self, dtype: torch.dtype) -> None:
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in, dtype=dtype))

    @property
    def W_enc(self) -> Tensor:
        """[d_in, n]: the encoder is the dictionary transpose (tied weights)."""
        return self.W_dec.T

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Dictionary rows random unit directions, b_dec zero."""
        with torch.no_grad():
            w = torch.randn(self.d_sae, self.d_in, dtype=torch.float32, generator=generator)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            self.b_dec.zero_()

    @property
    def aux_k(self) -> int:
        return auxiliary_k(self.cfg.aux_k, self.d_in, self.d_sae)

    def use_gram(self, batch_size: int, k: int) -> bool:
        if self.cfg.gram != "auto":
            return self.cfg.gram == "always"
        n = self.d_sae
        return self.d_in >= GRAM_MIN_D_IN and 2 * n <= k * batch_size and n * n <= GRAM_MAX_ENTRIES

    # ----------------------------------------------------------- pursuit
    def pre_activations(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> first-step correlations <x - b_dec, D_i> [B, n]."""
        return (x - self.b_dec) @ self.W_dec.T

    def pursuit(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, d_in] -> (values [B, k] >= 0, atom indices [B, k], final residual [B, d_in]).

        An atom may be picked at several steps (its values add up). Differentiable in values and residual.
        """
        k = k or self.cfg.k
        dictionary = self.W_dec
        residual = x - self.b_dec
        with torch.no_grad():
            corr = residual @ dictionary.T
            gram = dictionary @ dictionary.T if self.use_gram(x.shape[0], k) else None
        values, indices = [], []
        for step in range(k):
            idx = corr.argmax(dim=1)
            atoms = F.embedding(idx, dictionary)
            value = (residual * atoms).sum(dim=1).clamp_min(0.0)
            residual = residual - value[:, None] * atoms
            values.append(value)
            indices.append(idx)
            if step + 1 < k:
                with torch.no_grad():
                    if gram is None:
                        corr = residual @ dictionary.T
                    else:
                        corr.addcmul_(gram.index_select(0, idx), value[:, None], value=-1.0)
        return torch.stack(values, dim=1), torch.stack(indices, dim=1), residual

    # ----------------------------------------------------------- inference
    def encode_sparse_rows(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """x [B, d_in] -> (values [B, k], indices [B, k]); an atom picked twice has its total in its first slot
        and 0 in the later ones, so every nonzero slot is a distinct active latent."""
        values, indices, _ = self.pursuit(x, k)
        totals = torch.zeros(x.shape[0], self.d_sae, dtype=values.dtype, device=x.device)
        totals = totals.scatter_add(1, indices, values).gather(1, indices)
        repeated = (indices[:, :, None] == indices[:, None, :]).tril(diagonal=-1).any(dim=-1)
        return totals.masked_fill(repeated, 0.0), indices

    def decode_sparse_rows(self, values: Tensor, indices: Tensor, with_bias: bool = True) -> Tensor:
        """(values [B, k], indices [B, k]) -> x_hat [B, d_in]."""
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")
        return out + self.b_dec if with_bias else out

    def encode_rows(self, x: Tensor, k: int | None = None) -> Tensor:
        """x [B, d_in] -> dense codes z [B, n]; k overrides the number of pursuit steps (`encode(x, k=...)`)."""
        values, indices, _ = self.pursuit(x, k)
        z = torch.zeros(x.shape[0], self.d_sae, dtype=values.dtype, device=x.device)
        return z.scatter_add(1, indices, values)

    def reconstruct_rows(self, x: Tensor, k: int | None = None) -> Tensor:
        """x [B, d_in] -> x - r_k [B, d_in]; k overrides the number of pursuit steps (`sae(x, k=...)`)."""
        _, _, residual = self.pursuit(x, k)
        return x - residual

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Pursuit is positively homogeneous in x - b_dec, so only b_dec changes (codes scale by 1/scale)."""
        self.b_dec /= scale

    # ------------------------------------------------------------ training
    def default_lr(self, batch_size: int) -> float:
        """`tenfold_gao_lr`: at the base rate a tied pursuit dictionary moves too slowly."""
        return tenfold_gao_lr(self.d_sae, batch_size)

    def training_forward(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        values, indices, residual = self.pursuit(x, self.cfg.k)
        x_hat = x - residual
        fvu = fraction_of_variance_unexplained(x, x_hat)
        loss = fvu
        metrics = {"fvu": fvu.detach()}
        if self.cfg.aux_k_coef > 0 and ctx.any_dead:
            revival = self.revival_loss(residual.detach(), ctx.dead_mask)
            loss = loss + self.cfg.aux_k_coef * revival
            metrics["revival"] = revival.detach()
        with torch.no_grad():
            z = torch.zeros(x.shape[0], self.d_sae, dtype=values.dtype, device=x.device)
            fired, l0 = dense_activity(z.scatter_add_(1, indices, values) > 0)
        return TrainOutput(loss=loss, x_hat=x_hat, fired=fired, l0=l0, metrics=metrics)

    def revival_loss(self, residual: Tensor, dead_mask: Tensor) -> Tensor:
        """FVU of the residual [B, d] rebuilt from its top aux_k positive correlations with dead atoms."""
        with torch.no_grad():
            corr = (residual @ self.W_dec.T).masked_fill(~dead_mask, -torch.inf)
            idx = corr.topk(self.aux_k, dim=1, sorted=False).indices
        atoms = F.embedding(idx, self.W_dec)  # [B, aux_k, d]
        values = torch.einsum("bd,bkd->bk", residual, atoms).clamp_min(0.0) * dead_mask[idx]
        rebuilt = torch.einsum("bk,bkd->bd", values, atoms)
        return dead_residual_loss(residual, rebuilt, dead_mask.sum(), self.aux_k)

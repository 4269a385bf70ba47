"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

z keeps the k largest pre-activations per row (ReLU on the kept values). Loss = FVU + aux_k_coef * AuxK,
where AuxK fits the detached residual e = x - x_hat with the top `aux_k` pre-activations among dead
latents (decoded without b_dec), normalised by the residual's variance. Decoder rows are unit norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.sae.base import SAE, SAEConfig, TrainContext, TrainOutput
from saelab.sae.registry import register


@dataclass
class TopKConfig(SAEConfig):
    """k: active latents per row. aux_k: dead latents AuxK may use (0 -> d_in // 2). aux_k_coef: AuxK weight."""

    architecture: str = "topk"
    k: int = 32
    aux_k: int = 0
    aux_k_coef: float = 1.0 / 32.0

    def validate(self) -> None:
        super().validate()
        if not 0 < self.k <= self.d_sae:
            raise ValueError(
                f"sae.k={self.k} must be in [1, sae.d_sae={self.d_sae}]; lower k or widen the SAE."
            )
        if self.aux_k < 0:
            raise ValueError(f"sae.aux_k={self.aux_k} must be >= 0 (0 means d_in // 2).")
        if self.aux_k_coef < 0:
            raise ValueError(f"sae.aux_k_coef={self.aux_k_coef} must be >= 0 (0 disables AuxK).")


def fraction_of_variance_unexplained(x: Tensor, x_hat: Tensor) -> Tensor:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over a batch [B, d]; scalar."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)


@register("topk")
class TopKSAE(SAE):
    config_class = TopKConfig
    unit_norm_decoder = True
    cfg: TopKConfig

    @property
    def aux_k(self) -> int:
        return min(self.cfg.aux_k or max(self.d_in // 2, 1), self.d_sae)

    def select(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """pre [B, n] -> (values [B, k] >= 0, indices [B, k])."""
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return values.relu(), indices

    def encode_sparse(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """x [B, d_in] -> (values [B, k], indices [B, k])."""
        return self.select(self.pre_activations(x), k or self.cfg.k)

    def decode_sparse(self, values: Tensor, indices: Tensor, with_bias: bool = True) -> Tensor:
        """(values [B, k], indices [B, k]) -> x_hat [B, d_in], via an embedding bag over W_dec rows."""
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")
        return out + self.b_dec if with_bias else out

    def encode(self, x: Tensor) -> Tensor:
        values, indices = self.encode_sparse(x)
        return torch.zeros(x.shape[0], self.d_sae, dtype=values.dtype, device=x.device).scatter_(
            1, indices, values
        )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        flat = x.reshape(-1, self.d_in)
        return self.decode_sparse(*self.encode_sparse(flat)).reshape(x.shape)

    def training_forward(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        pre = self.pre_activations(x)
        values, indices = self.select(pre, self.cfg.k)
        x_hat = self.decode_sparse(values, indices)
        fvu = fraction_of_variance_unexplained(x, x_hat)
        loss = fvu
        metrics = {"fvu": fvu.detach()}
        if self.cfg.aux_k_coef > 0 and ctx.any_dead:
            auxk = self.auxk_loss(pre, x - x_hat.detach(), ctx.dead_mask)
            loss = loss + self.cfg.aux_k_coef * auxk
            metrics["auxk"] = auxk.detach()
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
        fired[indices[values > 0]] = True
        l0 = (values > 0).sum(dim=-1).float().mean()
        return TrainOutput(loss=loss, x_hat=x_hat, fired=fired, l0=l0, metrics=metrics)

    def auxk_loss(self, pre: Tensor, residual: Tensor, dead_mask: Tensor) -> Tensor:
        """Normalised error of reconstructing residual [B, d] from the top aux_k dead pre-activations."""
        dead_pre = pre.masked_fill(~dead_mask, -torch.inf)
        values, indices = dead_pre.topk(self.aux_k, dim=-1, sorted=False)
        values = values.relu()  # non-dead slots are -inf -> 0
        residual_hat = self.decode_sparse(values, indices, with_bias=False)
        n_dead = dead_mask.sum()
        scale = (n_dead / self.aux_k).clamp(max=1.0)
        loss = fraction_of_variance_unexplained(residual, residual_hat)
        return (scale * loss).nan_to_num(0.0)

    def default_lr(self, batch_size: int) -> float:
        """Gao et al.'s width scaling, times sqrt(batch / 4096); floored so small SAEs still converge quickly."""
        return 2e-4 / math.sqrt(self.d_sae / 2**14) * math.sqrt(batch_size / 4096)

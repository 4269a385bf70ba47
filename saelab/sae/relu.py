"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates", April 2024).

z = ReLU(pre). Loss = sum_d (x - x_hat)^2 (mean over batch) + lambda * sum_i z_i ||W_dec,i||_2, with
lambda ramped linearly from 0 over the first `l1_warmup_frac` of training. Decoder rows are free in norm;
init: rows random directions of norm `init_decoder_norm`, W_enc = W_dec^T, biases 0. The penalty is
scale-dependent: inputs are expected normalised so that E||x|| = sqrt(d_in) (the trainer does this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.core.checks import check_number
from saelab.sae.base import SAE, SAEConfig, TrainContext, TrainOutput
from saelab.sae.losses import dense_activity, fraction_of_variance_unexplained, warmup_factor
from saelab.sae.registry import register


@dataclass
class ReLUConfig(SAEConfig):
    """l1_coefficient: lambda. l1_warmup_frac: fraction of steps over which lambda ramps up from 0.
    init_decoder_norm: the norm of each decoder row at initialisation."""

    architecture: str = "relu"
    l1_coefficient: float = 5.0
    l1_warmup_frac: float = 0.05
    init_decoder_norm: float = 0.1

    def validate(self) -> None:
        super().validate()
        check_number("sae.l1_coefficient", self.l1_coefficient, low=0)
        check_number("sae.l1_warmup_frac", self.l1_warmup_frac, low=0, high=1)
        check_number("sae.init_decoder_norm", self.init_decoder_norm, low=0, low_open=True)


@register("relu")
class ReLUSAE(SAE):
    config_class = ReLUConfig
    data_parallel = True
    saelens_architecture = "standard"
    saelens_reads = ("standard",)
    dictionary_learning_class = "AutoEncoder"
    dictionary_learning_trainer = "StandardTrainer"
    dictionary_learning_reads = ("AutoEncoderNew",)
    cfg: ReLUConfig

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        with torch.no_grad():
            self.W_dec.mul_(self.cfg.init_decoder_norm)
            self.W_enc.copy_(self.W_dec.T)

    def encode_rows(self, x: Tensor) -> Tensor:
        return self.pre_activations(x).relu()

    def l1_coefficient_at(self, step: int, total_steps: int) -> float:
        """Lambda after linear warm-up over the first l1_warmup_frac * total_steps steps."""
        return self.cfg.l1_coefficient * warmup_factor(step, total_steps, self.cfg.l1_warmup_frac)

    def default_lr(self, batch_size: int) -> float:
        """2.5x the base rate: decoder rows start at norm 0.1 and are not renormalised, so at the TopK rate the
        features sharpen slowly (BENCHMARKS.md "Default learning rate")."""
        return 2.5 * super().default_lr(batch_size)

    def training_forward(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        z = self.encode_rows(x)
        x_hat = ctx.output(self.decode(z))
        target = ctx.target_for(x)  # x itself, or a transcoder's y
        sq_error = (target - x_hat).pow(2).sum(dim=-1).mean()  # per row, in training space
        l1_penalty = (z * self.W_dec.norm(dim=1)).sum(dim=-1).mean()  # decoder-norm weighted
        loss = sq_error + self.l1_coefficient_at(ctx.step, ctx.total_steps) * l1_penalty
        fired, l0 = dense_activity(z > 0)
        metrics = {  # names distinct from eval's per-element mse and plain l1: these are the loss terms
            "sq_error": sq_error.detach(),
            "l1_penalty": l1_penalty.detach(),
            "fvu": fraction_of_variance_unexplained(target, x_hat.detach()),
        }
        return TrainOutput(loss=loss, x_hat=x_hat, fired=fired, l0=l0, metrics=metrics)

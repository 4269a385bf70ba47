"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates", April 2024).

z = ReLU(pre). Loss = sum_d (x - x_hat)^2 (mean over batch) + lambda * sum_i z_i ||W_dec,i||_2, with
lambda ramped linearly from 0 over the first `l1_warmup_frac` of training (30% here, against Anthropic's 5%: the
features form before the penalty bites; on the tuning sets 100% of planted features recovered instead of 95%, and
9% of SmolLM2's latents dead instead of 25%: BENCHMARKS.md "Every variant at its defaults"). Decoder rows are free
in norm; init: rows random directions of norm `init_decoder_norm`, W_enc = W_dec^T, biases 0. The penalty is
scale-dependent: inputs are expected normalised so that E||x|| = sqrt(d_in) (the trainer does this).

With a target L0 the run ends with a calibration (`calibration_shift`): over its last CALIBRATION_BATCHES steps it
averages the soft threshold delta >= 0 on the weighted codes z_i ||W_dec,i|| at which a batch's L0 is the target,
and the last step lowers each encoder bias by delta / ||W_dec,i||, so the saved SAE's codes are ReLU(pre_i -
delta / ||W_dec,i||). That is the shrinkage a larger lambda (by 2 delta) applies to each code given the others, so
the calibration is one more step of the penalty, not a new rule. The controller alone ends 20-40% above the target
on a language model: the L0 climbs while the learning rate decays to 0, when lambda no longer moves the weights;
no controller gain caught that, and training without the decay costs far more FVU than the calibration
(docs/variants/relu.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.core.checks import check_number
from saelab.parallel import global_batch
from saelab.sae.base import SAE, SAEConfig, TrainContext, TrainOutput
from saelab.sae.losses import dense_activity, fraction_of_variance_unexplained
from saelab.sae.registry import register
from saelab.sae.target_l0 import (
    CALIBRATION_BATCHES,
    TargetL0Controller,
    calibration_level,
    check_reachable,
    check_target_l0,
)

#: The calibration warns when the controller alone ended above this many times the target (its soft threshold then
#: shrinks every code far enough to cost reconstruction; on SmolLM2 an overshoot of 29% cost 6% more FVU).
LARGE_CALIBRATION = 1.5
#: The calibration's floor on a decoder row's norm (`ReLUSAE.calibration_norms`).
NORM_FLOOR = 1e-6


@dataclass
class ReLUConfig(SAEConfig):
    """target_l0: the L0 that lambda adapts to reach during training (`saelab.sae.target_l0`; None: lambda fixed at
    l1_coefficient). l1_coefficient: lambda, or its starting value with a target. l1_warmup_frac: fraction of steps
    over which lambda ramps up from 0. init_decoder_norm: the norm of each decoder row at initialisation."""

    architecture: str = "relu"
    target_l0: float | None = 32.0
    l1_coefficient: float = 1.0
    l1_warmup_frac: float = 0.3
    init_decoder_norm: float = 0.1

    def validate(self) -> None:
        super().validate()
        check_target_l0(self.target_l0)
        low_open = self.target_l0 is not None
        check_number("sae.l1_coefficient", self.l1_coefficient, low=0, low_open=low_open)
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

    def __init__(self, cfg: ReLUConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        self.sparsity_control = TargetL0Controller(cfg.target_l0, cfg.l1_coefficient, cfg.l1_warmup_frac)
        #: sum of the calibration's delta over the steps of its window so far (checkpointed with the trainer state)
        self.register_buffer("calibration_shift_sum", torch.zeros((), dtype=torch.float32), persistent=False)
        #: the last step's L0 before the calibration (the controller's own landing), set by the calibration
        self.uncalibrated_l0: Tensor | None = None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        with torch.no_grad():
            self.W_dec.mul_(self.cfg.init_decoder_norm)
            self.W_enc.copy_(self.W_dec.T)

    @torch.no_grad()
    def initialize_from_sample(self, x: Tensor) -> None:
        """The base init (b_dec = geometric median of x [N, d_in]), after checking that target_l0 is reachable."""
        check_reachable(self.cfg.target_l0, self.d_sae)
        super().initialize_from_sample(x)

    def encode_rows(self, x: Tensor) -> Tensor:
        return self.pre_activations(x).relu()

    def missed_target_l0(self, l0: float) -> str | None:
        """The controller's warning (`TargetL0Controller.missed_target_or_spent`), or, when the calibration got the
        saved SAE to the target from more than LARGE_CALIBRATION times it, a warning that it cost reconstruction."""
        if note := self.sparsity_control.missed_target_or_spent(l0):
            return note
        target = self.cfg.target_l0
        before = None if self.uncalibrated_l0 is None else float(self.uncalibrated_l0)
        if target is None or before is None or before <= LARGE_CALIBRATION * target:
            return None
        return (
            f"the controller alone ended at L0 {before:.1f}, {before / target - 1:.0%} above sae.target_l0="
            f"{target:g}; the end-of-run calibration reached the target by shrinking every code (lowering the "
            "encoder biases), which costs reconstruction at this distance. Train longer, or start "
            "sae.l1_coefficient higher."
        )

    def calibration_steps(self, ctx: TrainContext) -> int:
        """How many last steps of the run estimate the calibration (0 without a target)."""
        return 0 if self.cfg.target_l0 is None else min(CALIBRATION_BATCHES, ctx.total_steps)

    def calibration_norms(self) -> Tensor:
        """||W_dec,i|| [n] in float32, floored at NORM_FLOOR: a zero decoder row would otherwise turn its latent's
        shifted bias into -inf (the floor silences such a latent instead, with a finite bias)."""
        return self.W_dec.detach().float().norm(dim=1).clamp_min(NORM_FLOOR)

    @torch.no_grad()
    def calibration_shift(self, pre: Tensor) -> Tensor:
        """delta for one batch (pre [B, n]): the soft threshold on the weighted codes z_i ||W_dec,i|| at which the
        global batch's L0 is target_l0 (`calibration_level` of log pre_i + log ||W_dec,i||), or 0 where the L0 is
        at or below the target already (a scalar tensor; no host sync)."""
        pre = pre.float()
        positive = pre > 0
        log_score = torch.where(positive, pre.log() + self.calibration_norms().log(), -math.inf)
        dense = global_batch.mean(positive.sum(dim=1, dtype=torch.float32).mean()) > self.cfg.target_l0
        return torch.where(dense, calibration_level(log_score, self.cfg.target_l0).exp(), 0.0)

    def default_lr(self, batch_size: int) -> float:
        """2.5x the base rate: decoder rows start at norm 0.1 and are not renormalised, so at the TopK rate the
        features sharpen slowly (BENCHMARKS.md "Default learning rate")."""
        return 2.5 * super().default_lr(batch_size)

    def training_forward(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        pre = self.pre_activations(x)
        calibration = self.calibration_steps(ctx)
        if ctx.step >= ctx.total_steps - calibration:
            self.calibration_shift_sum.add_(self.calibration_shift(pre.detach()))
        calibrated = calibration > 0 and ctx.step == ctx.total_steps - 1
        if calibrated:
            shift = self.calibration_shift_sum / calibration
            with torch.no_grad():
                self.uncalibrated_l0 = global_batch.mean((pre > 0).sum(dim=1, dtype=torch.float32).mean())
                self.b_enc.sub_((shift / self.calibration_norms()).to(self.b_enc.dtype))
            pre = self.pre_activations(x)
        z = pre.relu()
        x_hat = ctx.output(self.decode(z))
        target = ctx.target_for(x)  # x itself, or a transcoder's y
        sq_error = (target - x_hat).pow(2).sum(dim=-1).mean()  # per row, in training space
        l1_penalty = (z * self.W_dec.norm(dim=1)).sum(dim=-1).mean()  # decoder-norm weighted
        fired, l0 = dense_activity(z > 0)
        coefficient = self.sparsity_control.coefficient(l0, ctx)
        loss = sq_error + coefficient * l1_penalty
        metrics = {  # names distinct from eval's per-element mse and plain l1: these are the loss terms
            "sq_error": sq_error.detach(),
            "l1_penalty": l1_penalty.detach(),
            "l1_coefficient": torch.as_tensor(coefficient, dtype=torch.float32, device=x.device),
            "fvu": fraction_of_variance_unexplained(target, x_hat.detach()),
        }
        if calibrated:
            metrics["bias_calibration"] = shift
            metrics["l0_before_calibration"] = self.uncalibrated_l0
        return TrainOutput(loss=loss, x_hat=x_hat, fired=fired, l0=l0, metrics=metrics)

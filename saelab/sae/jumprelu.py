"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; trained as in Gemma Scope, Lieberum et al. 2024).

Inference: z_i = ReLU(pre_i) * [pre_i > threshold_i], with a learned per-latent `threshold` [n]: SAELens's
JumpReLU rule, so JumpReLU SAEs trained elsewhere (Gemma Scope, SAELens, dictionary_learning) load and run
unchanged, and the ones trained here load there.

Training: loss = FVU(x, x_hat) + lambda(t) * sparsity, decoder rows kept at unit norm (as Gemma Scope and
dictionary_learning's JumpReluTrainer do; the L0 penalty cannot be lowered by rescaling, so the decoder norm
needs no place in it). `sparsity_loss` picks the per-row penalty:
- "l0" (the paper): sum_i H(pre_i - threshold_i);
- "tanh" (Anthropic's January 2025 variant, SAELens's "tanh" mode): sum_i tanh(tanh_scale * z_i).
lambda ramps linearly from 0 over the first `sparsity_warmup_frac` of training (Gemma Scope warms it up).
The step function has no useful derivative, so both the JumpReLU and the Heaviside of the L0 penalty take
the paper's straight-through pseudo-derivatives with the rectangle kernel K(u) = [-1/2 < u < 1/2] of
bandwidth eps, for the threshold only:
    d z_i / d threshold_i := -(threshold_i / eps) K((pre_i - threshold_i) / eps)
    d H(pre_i - threshold_i) / d threshold_i := -(1 / eps) K((pre_i - threshold_i) / eps)
while d z_i / d pre_i = [z_i > 0] and the Heaviside passes no gradient to pre (as in the paper).
`ste_to_input=True` also hands pre the opposite of both kernel terms (Anthropic's estimator, a SAELens option).

Units: `init_threshold` and `bandwidth` are in the paper's units, inputs scaled to unit mean squared norm;
the trainer scales inputs to E||x|| = sqrt(d_in) instead, so the SAE multiplies both by sqrt(d_in). The
threshold is trained directly (not as log-threshold: Adam moves a parameter by about lr a step, which a
log-threshold turns into a factor, far too slow from a 1e-3 start), projected to >= 0 after each step.
The reconstruction term is TopK's FVU: the squared error of the paper over the global batch's centred
variance, so a 2-process data-parallel step equals the 1-process step (the L0 term is a per-row mean).
Init: tied weights, b_dec = geometric median of the first batch, encoder scaled to the least-squares fit of it
(as TopK). Defaults (lambda 0.03, warm-up 10%, 2.5x the base learning rate) were measured on planted features
(BENCHMARKS.md, "JumpReLU defaults").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.core.checks import check_number
from saelab.sae.base import SAE, SAEConfig, TrainContext, TrainOutput
from saelab.sae.losses import dense_activity, fraction_of_variance_unexplained, warmup_factor
from saelab.sae.registry import register

SPARSITY_LOSSES = ("l0", "tanh")


@dataclass
class JumpReLUConfig(SAEConfig):
    """sparsity_loss: "l0" (paper) or "tanh" (Anthropic). sparsity_coefficient: lambda, the penalty's weight
    against the FVU. sparsity_warmup_frac: fraction of steps over which lambda ramps up from 0. tanh_scale: c
    in tanh(c * z) ("tanh" only). bandwidth: eps of the straight-through estimator and init_threshold: the
    initial threshold, both in units of inputs at unit mean squared norm (x sqrt(d_in) on saelab's inputs).
    ste_to_input: also pass the straight-through terms to the pre-activations (Anthropic's estimator)."""

    architecture: str = "jumprelu"
    sparsity_loss: str = "l0"
    sparsity_coefficient: float = 0.03
    sparsity_warmup_frac: float = 0.1
    tanh_scale: float = 4.0
    bandwidth: float = 0.001
    init_threshold: float = 0.001
    ste_to_input: bool = False

    def validate(self) -> None:
        super().validate()
        if self.sparsity_loss not in SPARSITY_LOSSES:
            raise ValueError(
                f"sae.sparsity_loss={self.sparsity_loss!r} is not one of {list(SPARSITY_LOSSES)} "
                "(l0: the paper's penalty, tanh: Anthropic's)."
            )
        check_number("sae.sparsity_coefficient", self.sparsity_coefficient, low=0)
        check_number("sae.sparsity_warmup_frac", self.sparsity_warmup_frac, low=0, high=1)
        check_number("sae.tanh_scale", self.tanh_scale, low=0, low_open=True)
        check_number("sae.bandwidth", self.bandwidth, low=0, low_open=True)
        check_number("sae.init_threshold", self.init_threshold, low=0)


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel K(u) = 1 on -1/2 < u < 1/2, else 0 (in u's dtype)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUWithGate(torch.autograd.Function):
    """(pre [B, n], threshold [n], bandwidth) -> (z, gate), both [B, n]: z = ReLU(pre) * [pre > threshold] and
    gate = [pre > threshold], with the straight-through threshold gradients of the module docstring."""

    @staticmethod
    def forward(
        ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool = False
    ) -> tuple[Tensor, Tensor]:
        gate = pre > threshold
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        ctx.ste_to_input = ste_to_input
        ctx.set_materialize_grads(False)
        return pre.relu() * gate, gate.to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad_z: Tensor | None, grad_gate: Tensor | None) -> tuple[Tensor | None, ...]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = rectangle((pre - threshold) / eps) / eps  # K((pre - t) / eps) / eps
        grad_pre = torch.zeros_like(pre)
        straight = torch.zeros_like(pre)  # d / d threshold of the outputs, per entry, times -1
        if grad_z is not None:
            grad_pre += grad_z * ((pre > threshold) & (pre > 0))
            straight += grad_z * threshold * window
        if grad_gate is not None:
            straight += grad_gate * window
        if ctx.ste_to_input:  # both outputs depend on pre - threshold: pre takes minus the threshold's share
            grad_pre += straight
        return grad_pre, -straight.sum(dim=0), None, None


@register("jumprelu")
class JumpReLUSAE(SAE):
    config_class = JumpReLUConfig
    cfg: JumpReLUConfig
    unit_norm_decoder = True
    #: A step on a W-rank split of the batch equals the step on the whole batch (FVU on global statistics).
    data_parallel = True
    saelens_architecture = "jumprelu"
    saelens_reads = ("jumprelu",)
    dictionary_learning_class = "JumpReluAutoEncoder"
    dictionary_learning_trainer = "JumpReluTrainer"

    def create_parameters(self, dtype: torch.dtype) -> None:
        super().create_parameters(dtype)
        self.threshold = nn.Parameter(torch.zeros(self.d_sae, dtype=dtype))

    @property
    def input_unit(self) -> float:
        """sqrt(d_in): the paper's unit (inputs at unit mean squared norm) on the trainer's inputs."""
        return math.sqrt(self.d_in)

    @property
    def bandwidth(self) -> float:
        """eps on the trainer's input scale."""
        return self.cfg.bandwidth * self.input_unit

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Base init (unit decoder rows, tied encoder, zero biases); thresholds at init_threshold."""
        super().reset_parameters(generator)
        with torch.no_grad():
            self.threshold.fill_(self.cfg.init_threshold * self.input_unit)

    @torch.no_grad()
    def initialize_from_sample(self, x: Tensor) -> None:
        """b_dec = geometric median of x [N, d_in]; then the tied encoder (and b_enc) is scaled by the s > 0
        minimising ||(x - b_dec) - s * x_hat||^2 over the sample, x_hat the initial reconstruction (as TopK).

        With thresholds near 0 about half the latents fire on every row at init and their unit-norm rows
        overshoot x about n / (2 d_in) times; unscaled, the first steps go to undoing that (BENCHMARKS.md,
        "JumpReLU defaults").
        """
        super().initialize_from_sample(x)
        self.scale_encoder_to_fit(x, self.encode_rows(x) @ self.W_dec)

    def default_lr(self, batch_size: int) -> float:
        """2.5x the base rate: Adam moves a threshold by about lr a step, and thresholds start near 0 and must
        climb above the interference between features (BENCHMARKS.md, "JumpReLU defaults")."""
        return 2.5 * super().default_lr(batch_size)

    # ----------------------------------------------------------- inference
    def encode_rows(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> z [B, n] = ReLU(pre) * (pre > threshold)."""
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold)

    # ------------------------------------------------------------ training
    def sparsity_coefficient_at(self, step: int, total_steps: int) -> float:
        """lambda after the linear warm-up over the first sparsity_warmup_frac * total_steps steps."""
        return self.cfg.sparsity_coefficient * warmup_factor(step, total_steps, self.cfg.sparsity_warmup_frac)

    def sparsity_penalty(self, z: Tensor, gate: Tensor) -> Tensor:
        """Mean over rows of the per-row penalty, from codes z [B, n] and the gate [pre > threshold] [B, n]."""
        wide = torch.promote_types(z.dtype, torch.float32)  # exact counts under bf16 autocast
        if self.cfg.sparsity_loss == "tanh":
            return torch.tanh(self.cfg.tanh_scale * z).sum(dim=-1, dtype=wide).mean()
        return gate.sum(dim=-1, dtype=wide).mean()

    def training_forward(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        pre = self.pre_activations(x)
        z, gate = JumpReLUWithGate.apply(
            pre, self.threshold.to(pre.dtype), self.bandwidth, self.cfg.ste_to_input
        )
        x_hat = ctx.output(self.decode(z))
        fvu = fraction_of_variance_unexplained(ctx.target_for(x), x_hat)
        sparsity = self.sparsity_penalty(z, gate)
        loss = fvu + self.sparsity_coefficient_at(ctx.step, ctx.total_steps) * sparsity
        with torch.no_grad():
            fired, l0 = dense_activity(z > 0)
            metrics = {
                "fvu": fvu.detach(),
                "sparsity": sparsity.detach(),
                "threshold": self.threshold.mean().detach(),
            }
        return TrainOutput(loss=loss, x_hat=x_hat, fired=fired, l0=l0, metrics=metrics)

    # ------------------------------------------------------------ interop
    def dictionary_learning_extras(self) -> dict[str, Tensor]:
        """The per-latent threshold [n]."""
        return {"threshold": self.threshold.detach().cpu().contiguous()}

    @classmethod
    def config_from_dictionary_learning(
        cls, extras: dict[str, Tensor], trainer: dict[str, Any], where: str
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The threshold [n] (checked against d_sae when loaded)."""
        return {}, {"threshold": extras["threshold"]}

    def after_optimizer_step(self) -> None:
        """Unit-norm decoder rows, then thresholds projected to >= 0 (a negative one would pass nothing more
        at inference, where ReLU comes first, but would detach the threshold from its training signal)."""
        super().after_optimizer_step()
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)

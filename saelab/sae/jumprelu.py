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
After the TopK warm-up, latents the trainer counts as dead also feel a pre-activation loss, pre_act_coef *
mean over rows of sum_{i dead} ReLU(threshold_i - pre_i) ||W_dec,i|| (Anthropic's January 2025 pre-act loss,
which they apply to every latent; here to the dead ones only): a latent whose pre-activations stay below its
threshold gets no gradient from the FVU or the L0 term, and this pulls them up to it. On SmolLM2 it took the
dead latents from 25% to 4.5% at the same FVU (docs/variants/jumprelu.md).
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
from saelab.kernels import sparse_decode, topk_select
from saelab.parallel import global_batch
from saelab.sae.base import SAE, SAEConfig, TrainContext, TrainOutput
from saelab.sae.batchtopk import BatchTopKSAE
from saelab.sae.losses import (
    auxiliary_k,
    dead_pre_act_loss,
    dead_residual_loss,
    dense_activity,
    dense_auxk_reconstruction,
    fraction_of_variance_unexplained,
    sparse_activity,
)
from saelab.sae.registry import register
from saelab.sae.target_l0 import (
    CALIBRATION_BATCHES,
    SYMMETRIC,
    TARGET_TOLERANCE,
    TargetL0Controller,
    calibration_level,
    check_reachable,
    check_target_l0,
)

SPARSITY_LOSSES = ("l0", "tanh")


@dataclass
class JumpReLUConfig(SAEConfig):
    """sparsity_loss: "l0" (paper) or "tanh" (Anthropic). sparsity_coefficient: lambda, the penalty's weight
    against the FVU. sparsity_warmup_frac: fraction of steps over which lambda ramps up from 0. tanh_scale: c
    in tanh(c * z) ("tanh" only). bandwidth: eps of the straight-through estimator and init_threshold: the
    initial threshold, both in units of inputs at unit mean squared norm (x sqrt(d_in) on saelab's inputs).
    ste_to_input: also pass the straight-through terms to the pre-activations (Anthropic's estimator).
    pre_act_coef: weight of the pre-activation loss on dead latents (module docstring; 0 disables it)."""

    architecture: str = "jumprelu"
    target_l0: float | None = 32.0
    sparsity_loss: str = "l0"
    sparsity_coefficient: float = 0.03
    sparsity_warmup_frac: float = 0.1
    tanh_scale: float = 4.0
    bandwidth: float = 0.05
    init_threshold: float = 0.001
    ste_to_input: bool = False
    aux_k: int = 0
    aux_k_coef: float = 1.0 / 32.0
    topk_warmup_frac: float = 0.7
    pre_act_coef: float = 1e-5

    def validate(self) -> None:
        super().validate()
        if self.sparsity_loss not in SPARSITY_LOSSES:
            raise ValueError(
                f"sae.sparsity_loss={self.sparsity_loss!r} is not one of {list(SPARSITY_LOSSES)} "
                "(l0: the paper's penalty, tanh: Anthropic's)."
            )
        check_target_l0(self.target_l0)
        low_open = self.target_l0 is not None
        check_number("sae.sparsity_coefficient", self.sparsity_coefficient, low=0, low_open=low_open)
        check_number("sae.sparsity_warmup_frac", self.sparsity_warmup_frac, low=0, high=1)
        check_number("sae.tanh_scale", self.tanh_scale, low=0, low_open=True)
        check_number("sae.bandwidth", self.bandwidth, low=0, low_open=True)
        check_number("sae.init_threshold", self.init_threshold, low=0)
        check_number("sae.aux_k", self.aux_k, low=0, integer=True, hint="0 means d_in // 2.")
        check_number("sae.aux_k_coef", self.aux_k_coef, low=0, hint="0 disables AuxK.")
        check_number(
            "sae.topk_warmup_frac",
            self.topk_warmup_frac,
            low=0,
            high=1,
            hint="0: JumpReLU training throughout.",
        )
        check_number("sae.pre_act_coef", self.pre_act_coef, low=0, hint="0 disables the pre-activation loss.")


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

    def __init__(self, cfg: JumpReLUConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        self.sparsity_control = TargetL0Controller(
            cfg.target_l0, cfg.sparsity_coefficient, cfg.sparsity_warmup_frac, gains=SYMMETRIC
        )
        #: sum of the calibration's log c over the steps of its window so far (checkpointed with the trainer state)
        self.register_buffer("calibration_log_sum", torch.zeros((), dtype=torch.float32), persistent=False)
        #: the last step's L0 with every threshold at 0 (the most this encoder reaches), set by the calibration
        self.ceiling_l0: Tensor | None = None

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
        check_reachable(self.cfg.target_l0, self.d_sae)
        super().initialize_from_sample(x)
        if self.warmup_k is None:
            self.scale_encoder_to_fit(x, self.encode_rows(x) @ self.W_dec)
        else:  # the TopK warm-up's codes
            values, indices = topk_select(self.pre_activations(x), self.warmup_k)
            self.scale_encoder_to_fit(x, sparse_decode(values.relu(), indices, self.W_dec))

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
    @property
    def warmup_k(self) -> int | None:
        """k of the TopK warm-up (round(target_l0)), or None without one (no target, or topk_warmup_frac 0)."""
        if self.cfg.target_l0 is None or self.cfg.topk_warmup_frac == 0:
            return None
        return max(1, round(self.cfg.target_l0))

    @property
    def ddp_find_unused_parameters(self) -> bool:
        """The TopK warm-up leaves the thresholds out of the loss."""
        return self.warmup_k is not None

    def warmup_steps(self, ctx: TrainContext) -> int:
        """Steps of the TopK warm-up in this run (0 without one)."""
        return 0 if self.warmup_k is None else round(self.cfg.topk_warmup_frac * ctx.total_steps)

    def topk_forward(
        self, x: Tensor, pre: Tensor, k: int, ctx: TrainContext
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The TopK warm-up's pass on x [B, d_in] with pre-activations pre [B, n]: each row's k largest (ReLU),
        decoded sparsely (plus ctx's skip term; the FVU against ctx's target). Returns (x_hat [B, d_out], fvu,
        fired [n], l0)."""
        with torch.no_grad():
            indices = topk_select(pre.detach(), k)[1]
        values = pre.gather(1, indices).relu()
        x_hat = ctx.output(sparse_decode(values, indices, self.W_dec, self.b_dec))
        fired, l0 = sparse_activity(values.detach() > 0, indices, self.d_sae)
        return x_hat, fraction_of_variance_unexplained(ctx.target_for(x), x_hat), fired, l0

    @torch.no_grad()
    def start_thresholds(self, pre: Tensor, k: int) -> None:
        """End of the TopK warm-up: every threshold at the batch's cutoff for k latents per row (the B * k-th
        largest of pre [B, n] over the global batch), so the first JumpReLU step keeps L0 near k; training then
        moves each latent's threshold on its own."""
        self.threshold.fill_(float(BatchTopKSAE.batch_cutoff(pre, k).clamp_min(0)))

    def balancing_coefficient(self, fvu: Tensor, sparsity: Tensor) -> Tensor:
        """At the end of the TopK warm-up: the lambda at which the first JumpReLU step keeps the L0 where
        `start_thresholds` put it (a scalar tensor), or the controller's value when no lambda >= 0 does (the
        median below is <= 0: the FVU alone raises most thresholds, and the controller lowers lambda).

        Each threshold's gradient is g_i - lambda * p_i, with g_i the FVU's (scalar fvu) and p_i >= 0 the
        penalty's pull (scalar sparsity), both of the global batch; Adam moves threshold i by about lr against
        its sign, that is up when lambda > g_i / p_i. A rising threshold silences as many rows as cross it, about
        p_i (the L0 penalty's p_i counts the rows in its window), so the L0 holds at the median of g_i / p_i
        weighted by p_i: half the pull rises, half falls. The lambda that held the running L0 so far (the
        variant's start `sparsity_coefficient`) moves with the data by orders of magnitude (100x below the
        default on planted features), and the controller, which only sees the L0 a few steps later, would
        take many of the remaining steps to get there while the thresholds overshoot."""
        threshold_grads = [
            global_batch.mean(torch.autograd.grad(term, self.threshold, retain_graph=True)[0])
            for term in (fvu, sparsity)
        ]
        g, pull = threshold_grads[0], -threshold_grads[1]
        pulled = pull > 0
        ratio, weight = (g / pull.where(pulled, 1.0))[pulled], pull[pulled]
        order = ratio.argsort()
        cumulative = weight[order].cumsum(0)
        median = ratio[order][
            torch.searchsorted(cumulative, cumulative[-1:] / 2).clamp_max(ratio.numel() - 1)
        ]
        current = self.sparsity_control.log_coefficient.exp()
        return torch.where(median > 0, median, current).squeeze() if ratio.numel() else current

    def calibration_steps(self, ctx: TrainContext) -> int:
        """How many last steps of the run estimate the threshold calibration (0 without a target)."""
        if self.cfg.target_l0 is None:
            return 0
        return min(CALIBRATION_BATCHES, ctx.total_steps - self.warmup_steps(ctx))

    @torch.no_grad()
    def calibration_log_scale(self, pre: Tensor) -> Tensor:
        """log c for one batch (pre [B, n]): the one factor c > 0 on every threshold at which the global batch's
        L0 under the inference rule (z_i != 0 where pre_i > max(c * threshold_i, 0)) is target_l0: the
        `calibration_level` of log pre_i - log threshold_i (a scalar tensor; no host sync).

        The last `calibration_steps` of a run with a target average it and the last one scales the thresholds by
        the mean's exp, so the saved SAE's L0 is the target. The controller steers the running L0 while lr lets
        the thresholds move, but after the TopK warm-up the plant keeps moving (the FVU alone raises the
        thresholds of a TopK-trained encoder, whose marginal activations are noise) while lr decays to 0, which
        left the L0 10-40% off the target (planted data, SmolLM2: docs/variants.md). One common factor keeps each
        latent's threshold relative to the others; averaging over batches evens out one batch's L0 noise."""
        pre = pre.float()
        log_score = torch.where(pre > 0, pre.log() - self.threshold.float().log(), -math.inf)
        return calibration_level(log_score, self.cfg.target_l0)

    def missed_target_l0(self, l0: float) -> str | None:
        """The controller's warning (`TargetL0Controller.missed_target`); saturated when even thresholds at 0
        (the inference rule's floor: ReLU comes first) keep the last batch's L0 more than TARGET_TOLERANCE below
        the target, i.e. the encoder has too few positive pre-activations and no calibration can add more."""
        ceiling = None if self.ceiling_l0 is None else float(self.ceiling_l0)
        target = self.cfg.target_l0
        saturated = ceiling is not None and target is not None and ceiling < (1 - TARGET_TOLERANCE) * target
        evidence = (
            f"even every threshold at 0 gives only L0 {ceiling:.1f} (the encoder's positive pre-activations)"
        )
        return self.sparsity_control.missed_target(l0, evidence if saturated else None)

    def sparsity_penalty(self, z: Tensor, gate: Tensor) -> Tensor:
        """Mean over rows of the per-row penalty, from codes z [B, n] and the gate [pre > threshold] [B, n]."""
        wide = torch.promote_types(z.dtype, torch.float32)  # exact counts under bf16 autocast
        if self.cfg.sparsity_loss == "tanh":
            return torch.tanh(self.cfg.tanh_scale * z).sum(dim=-1, dtype=wide).mean()
        return gate.sum(dim=-1, dtype=wide).mean()

    def training_forward(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        pre = self.pre_activations(x)
        warmup = self.warmup_steps(ctx)
        if ctx.step < warmup:
            x_hat, fvu, fired, l0 = self.topk_forward(x, pre, self.warmup_k, ctx)
            loss, metrics = fvu, {"fvu": fvu.detach()}
        else:
            handoff = ctx.step == warmup and self.warmup_k is not None
            if handoff:
                self.start_thresholds(pre, self.warmup_k)
            calibration = self.calibration_steps(ctx)
            if ctx.step >= ctx.total_steps - calibration:
                self.calibration_log_sum.add_(self.calibration_log_scale(pre.detach()))
            calibrated = calibration > 0 and ctx.step == ctx.total_steps - 1
            if calibrated:
                scale = (self.calibration_log_sum / calibration).exp()
                with torch.no_grad():
                    self.threshold.mul_(scale.to(self.threshold.dtype))
                    self.ceiling_l0 = global_batch.mean((pre > 0).sum(dim=1, dtype=torch.float32).mean())
            z, gate = JumpReLUWithGate.apply(
                pre, self.threshold.to(pre.dtype), self.bandwidth, self.cfg.ste_to_input
            )
            x_hat = ctx.output(self.decode(z))
            fvu = fraction_of_variance_unexplained(ctx.target_for(x), x_hat)
            sparsity = self.sparsity_penalty(z, gate)
            if handoff:
                self.sparsity_control.restart(self.balancing_coefficient(fvu, sparsity))
            with torch.no_grad():
                fired, l0 = dense_activity(z > 0)
            coefficient = self.sparsity_control.coefficient(l0, ctx)
            loss = fvu + coefficient * sparsity
            metrics = {
                "fvu": fvu.detach(),
                "sparsity": sparsity.detach(),
                "sparsity_coefficient": torch.as_tensor(coefficient, dtype=torch.float32, device=x.device),
                "threshold": self.threshold.mean().detach(),
            }
            if calibrated:
                metrics["threshold_calibration"] = scale
            if self.cfg.pre_act_coef > 0 and ctx.any_dead:
                pre_act = dead_pre_act_loss(pre, self.threshold, self.W_dec, ctx.dead_mask)
                loss = loss + self.cfg.pre_act_coef * pre_act
                metrics["dead_pre_act"] = pre_act.detach()
        if self.cfg.aux_k_coef > 0 and ctx.any_dead:
            aux_k = auxiliary_k(self.cfg.aux_k, self.d_in, self.d_sae)
            residual_hat, n_dead = dense_auxk_reconstruction(pre, ctx.dead_mask, self.W_dec, aux_k)
            auxk = dead_residual_loss(ctx.target_for(x) - x_hat.detach(), residual_hat, n_dead, aux_k)
            loss = loss + self.cfg.aux_k_coef * auxk
            metrics["auxk"] = auxk.detach()
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

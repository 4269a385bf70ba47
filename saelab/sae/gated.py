"""Gated SAE (Rajamanoharan, Conmy, Smith, Lieberum, Varma, Kramár, Shah, Nanda 2024, "Improving Dictionary
Learning with Gated Sparse Autoencoders").

Two paths share the encoder directions W_enc [d_in, n] on the centred input u = x - b_dec:

    gate:       pi_gate = u @ W_enc + b_gate,                      active = [pi_gate > 0]
    magnitude:  pi_mag  = u @ (W_enc * exp(r_mag)) + b_mag,        z = active * ReLU(pi_mag)
    x_hat = z @ W_dec + b_dec

so which latents fire and how strongly are decided apart (an L1 penalty on the gate no longer shrinks the
magnitudes). The step function passes no gradient; the gate path is trained by the two other loss terms:

    loss = ||x - x_hat||^2 + lambda * ||ReLU(pi_gate)||_1 + ||x - (ReLU(pi_gate) @ sg(W_dec) + sg(b_dec))||^2

(sg: stop-gradient; the auxiliary term makes the gate's pre-activations themselves reconstruct x through the
frozen decoder, as in the paper). Squared errors are summed over d and averaged over rows, inputs scaled to
E||x|| = sqrt(d_in) by the trainer (the ReLU SAE's convention), decoder rows kept at unit norm (as in the paper
and dictionary_learning's GatedSAETrainer) so the L1 cannot be lowered by growing them. lambda ramps up
linearly over the first `l1_warmup_frac` of training (30%, as the ReLU SAE's: planted recovery on the tuning set
94% -> 99% against 5%) from 0 to `l1_coefficient`; by default it then adapts so that the running L0 reaches
`target_l0` (`saelab.sae.target_l0`, the ReLU SAE's asymmetric controller: an L1 on the gate silences latents as
a ReLU SAE's does); `target_l0: null` keeps it fixed (lambda 5 with a 5% ramp gave L0 9.8 on planted features,
98.6% recovered, BENCHMARKS.md "Gated SAE"). Init: tied unit-norm weights, r_mag and biases 0, b_dec = geometric
median of the first batch, then W_enc (with b_gate, b_mag) scaled by the least-squares scale of the initial
reconstruction, as TopK scales its encoder.

Dead latents: the L1 silences gates for good (a gate shut on every row gets no gradient), so latents the trainer
counts as dead also feel `pre_act_coef` times the mean over rows of sum_i ReLU(-pi_gate_i) ||W_dec,i||
(`saelab.sae.losses.dead_pre_act_loss`, as JumpReLU's with threshold 0), which pulls their gates back open. On the
ladder's d256 rung (900 steps) it took the dead latents from 59% to 19% and recovered 5 more points of the planted
features (docs/transcoders.md, "Gated SAEs").

Files: SAELens's `gated` (W_enc, W_dec, b_dec, b_gate, b_mag, r_mag) and dictionary_learning's
`GatedAutoEncoder` (encoder.weight, decoder.weight, decoder_bias, gate_bias, mag_bias, r_mag) compute the same
function and load and export both ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.core.checks import check_number
from saelab.sae.base import SAE, SAEConfig, TrainContext, TrainOutput
from saelab.sae.losses import dead_pre_act_loss, dense_activity, fraction_of_variance_unexplained
from saelab.sae.registry import register
from saelab.sae.target_l0 import TargetL0Controller, check_reachable, check_target_l0


@dataclass
class GatedConfig(SAEConfig):
    """target_l0: the L0 that lambda adapts to reach during training (`saelab.sae.target_l0`; None: lambda fixed at
    l1_coefficient). l1_coefficient: lambda, the weight of the gate's L1 penalty against the squared error, or its
    starting value with a target. l1_warmup_frac: fraction of steps over which lambda ramps up from 0.
    pre_act_coef: weight of the dead latents' pre-activation loss on the gate (module docstring; 0 disables it)."""

    architecture: str = "gated"
    target_l0: float | None = 32.0
    l1_coefficient: float = 5.0
    l1_warmup_frac: float = 0.3
    pre_act_coef: float = 0.01

    def validate(self) -> None:
        super().validate()
        check_target_l0(self.target_l0)
        check_number("sae.l1_coefficient", self.l1_coefficient, low=0, low_open=self.target_l0 is not None)
        check_number("sae.l1_warmup_frac", self.l1_warmup_frac, low=0, high=1)
        check_number("sae.pre_act_coef", self.pre_act_coef, low=0, hint="0 disables the pre-activation loss.")


@register("gated")
class GatedSAE(SAE):
    config_class = GatedConfig
    cfg: GatedConfig
    unit_norm_decoder = True
    #: Every loss term is a per-row mean, so the ranks' averaged gradients are the global batch's.
    data_parallel = True
    saelens_architecture = "gated"
    saelens_reads = ("gated",)
    dictionary_learning_class = "GatedAutoEncoder"
    dictionary_learning_trainer = "GatedSAETrainer"

    def __init__(self, cfg: GatedConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        self.sparsity_control = TargetL0Controller(cfg.target_l0, cfg.l1_coefficient, cfg.l1_warmup_frac)

    def create_parameters(self, dtype: torch.dtype) -> None:
        """W_enc [d_in, n], W_dec [n, d_in], b_dec [d_in], and per latent b_gate, b_mag, r_mag [n] (no b_enc)."""
        d, n = self.d_in, self.d_sae
        self.W_enc = nn.Parameter(torch.empty(d, n, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(n, d, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype))
        for name in ("b_gate", "b_mag", "r_mag"):
            setattr(self, name, nn.Parameter(torch.zeros(n, dtype=dtype)))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit decoder rows, tied encoder, every bias and r_mag zero."""
        self.tie_random_unit_rows(generator)
        with torch.no_grad():
            for name in ("b_dec", "b_gate", "b_mag", "r_mag"):
                getattr(self, name).zero_()

    @torch.no_grad()
    def initialize_from_sample(self, x: Tensor) -> None:
        """b_dec = geometric median of x [N, d_in]; then the codes are scaled by the least-squares s > 0 of the
        initial reconstruction of x - b_dec (`scale_codes`, as TopK scales its encoder). Checks first that
        target_l0 is reachable."""
        check_reachable(self.cfg.target_l0, self.d_sae)
        super().initialize_from_sample(x)
        self.scale_encoder_to_fit(x, self.encode_rows(x) @ self.W_dec)

    @torch.no_grad()
    def scale_codes(self, scale: float) -> None:
        """Multiply both paths' pre-activations, so every code, by `scale` > 0 (W_enc, b_gate, b_mag; the gate
        keeps its sign). Not through r_mag: Adam moves a log-scale by about lr a step, too slow to undo."""
        for tensor in (self.W_enc, self.b_gate, self.b_mag):
            tensor.mul_(scale)

    # ----------------------------------------------------------- inference
    def gate_pre_activations(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> pi_gate [B, n]."""
        return (x - self.input_bias) @ self.W_enc + self.b_gate

    def pre_activations(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> the magnitude path's pi_mag [B, n]."""
        return (x - self.input_bias) @ (self.W_enc * self.r_mag.exp()) + self.b_mag

    def encode_rows(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> z [B, n] = [pi_gate > 0] * ReLU(pi_mag)."""
        return (self.gate_pre_activations(x) > 0) * self.pre_activations(x).relu()

    # ------------------------------------------------------------ training
    def missed_target_l0(self, l0: float) -> str | None:
        """The controller's warning (`TargetL0Controller.missed_target_or_spent`)."""
        return self.sparsity_control.missed_target_or_spent(l0)

    def training_forward(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        centred = x - self.input_bias
        projected = centred @ self.W_enc
        gate_pre = projected + self.b_gate
        gate = gate_pre.relu()
        z = (gate_pre > 0) * (projected * self.r_mag.exp() + self.b_mag).relu()
        x_hat = ctx.output(self.decode(z))
        target = ctx.target_for(x)
        sq_error = (target - x_hat).pow(2).sum(dim=-1).mean()
        l1_penalty = gate.sum(dim=-1).mean()
        via_gate = gate @ self.W_dec.detach() + self.b_dec.detach()  # the frozen decoder (and skip term)
        if ctx.skip is not None:
            via_gate = via_gate + ctx.skip.detach()
        aux = (target - via_gate).pow(2).sum(dim=-1).mean()
        fired, l0 = dense_activity(z > 0)
        coefficient = self.sparsity_control.coefficient(l0, ctx)
        loss = sq_error + coefficient * l1_penalty + aux
        metrics = {
            "sq_error": sq_error.detach(),
            "l1_penalty": l1_penalty.detach(),
            "l1_coefficient": torch.as_tensor(coefficient, dtype=torch.float32, device=x.device),
            "gate_aux": aux.detach(),
            "fvu": fraction_of_variance_unexplained(target, x_hat.detach()),
        }
        if self.cfg.pre_act_coef > 0 and ctx.any_dead:
            pre_act = dead_pre_act_loss(gate_pre, 0.0, self.W_dec, ctx.dead_mask)
            loss = loss + self.cfg.pre_act_coef * pre_act
            metrics["dead_pre_act"] = pre_act.detach()
        return TrainOutput(loss=loss, x_hat=x_hat, fired=fired, l0=l0, metrics=metrics)

    # ------------------------------------------------------------ interop
    @classmethod
    def absorb_input_offset(cls, tensors: dict[str, Tensor], offset: Tensor) -> None:
        """Both paths' biases take the offset: b_gate += offset @ W_enc, b_mag += offset @ (W_enc * exp(r_mag))."""
        offset, w_enc = offset.double(), tensors["W_enc"].double()
        tensors["b_gate"] = tensors["b_gate"].double() + offset @ w_enc
        tensors["b_mag"] = tensors["b_mag"].double() + offset @ (w_enc * tensors["r_mag"].double().exp())

    def dictionary_learning_extras(self) -> dict[str, Tensor]:
        """GatedAutoEncoder's per-latent gate_bias, mag_bias and r_mag [n]."""
        tensors = {"gate_bias": self.b_gate, "mag_bias": self.b_mag, "r_mag": self.r_mag}
        return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}

    @classmethod
    def config_from_dictionary_learning(
        cls, extras: dict[str, Tensor], trainer: dict[str, Any], where: str
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """b_gate, b_mag and r_mag from GatedAutoEncoder's gate_bias, mag_bias and r_mag."""
        return {}, {"b_gate": extras["gate_bias"], "b_mag": extras["mag_bias"], "r_mag": extras["r_mag"]}

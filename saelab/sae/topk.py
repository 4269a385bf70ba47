"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

z keeps the k largest pre-activations per row (ReLU on the kept values). Loss = FVU + aux_k_coef * AuxK,
where AuxK fits the detached residual e = x - x_hat with the top `aux_k` pre-activations among dead
latents (decoded without b_dec), normalised by the residual's variance. Decoder rows are unit norm.

Training selects on detached pre-activations and attaches gradients through the kept codes only
(`saelab.kernels`), so everything after the encoder matmul costs O(B * k * d_in), plus AuxK's products over
the gathered dead latents (`saelab.kernels.auxk`). Init:
tied weights, b_dec = geometric median of the first batch, encoder scaled to the least-squares fit of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saelab.core.checks import check_number
from saelab.kernels import (
    SlotPlan,
    sparse_decode,
    sparse_decode_groups,
    sparse_encoder_values,
    topk_select,
)
from saelab.kernels.auxk import AuxSelection, gathered_auxk_decode, select_auxk
from saelab.sae.base import SAE, SAEConfig, SparseCodes, TrainContext, TrainOutput, adam_default_lr
from saelab.sae.losses import (
    auxiliary_k,
    dead_residual_loss,
    fraction_of_variance_unexplained,
    sparse_activity,
)
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
        check_number("sae.k", self.k, low=1, integer=True)
        if self.k > self.d_sae:
            raise ValueError(
                f"sae.k={self.k} must be in [1, sae.d_sae={self.d_sae}]; lower k or widen the SAE."
            )
        check_number("sae.aux_k", self.aux_k, low=0, integer=True, hint="0 means d_in // 2.")
        check_number("sae.aux_k_coef", self.aux_k_coef, low=0, hint="0 disables AuxK.")


def dictionary_learning_k(extras: dict[str, Tensor], trainer: dict[str, Any], where: str) -> int:
    """The `k` buffer of a dictionary_learning state dict, which its config's trainer.k (if any) must equal."""
    k = int(extras["k"])
    if trainer.get("k", k) != k:
        raise ValueError(f"trainer.k={trainer['k']} in the config but {where} has k={k}; fix one of the two.")
    return k


@register("topk")
class TopKSAE(SparseCodes, SAE):
    config_class = TopKConfig
    data_parallel = True
    saelens_architecture = "topk"
    saelens_reads = ("topk",)
    dictionary_learning_class = "AutoEncoderTopK"
    dictionary_learning_trainer = "TopKTrainer"
    required_fields = ("d_in", "d_sae", "k")
    unit_norm_decoder = True
    cfg: TopKConfig
    #: CPU workspace for `selection_pre_activations` (not a parameter or buffer: never saved or moved).
    _pre_buffer: Tensor | None = None

    @property
    def aux_k(self) -> int:
        return auxiliary_k(self.cfg.aux_k, self.d_in, self.d_sae)

    def default_lr(self, batch_size: int) -> float:
        """The base Adam rate (`adam_default_lr`), times max(1, 16 / k) below its d_in cap.

        With few latents per row (k < 16) the rate that recovers planted features in the fewest tokens is
        higher; from k 16 to 32 more rate blurs features at small d_in (BENCHMARKS.md "Default learning rate",
        d_in 64, k 4 to 32). The cap on lr * sqrt(d_in) still holds, so from d_in 256 (or 128 at k 8) on k
        changes nothing.
        """
        return adam_default_lr(self.d_in, self.d_sae, batch_size, max(1.0, 16 / self.cfg.k))

    def pre_activations(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> pre-activations [B, n], as one fused addmm for 2-D input."""
        if x.ndim != 2:
            return super().pre_activations(x)
        return torch.addmm(self.b_enc, x - self.input_bias, self.W_enc)

    @torch.no_grad()
    def initialize_from_sample(self, x: Tensor) -> None:
        """b_dec = geometric median of x [N, d_in]; then the tied encoder (and b_enc) is scaled by the s > 0
        minimising ||(x - b_dec) - s * x_hat||^2 over the sample, x_hat being the TopK reconstruction.

        A positive scale leaves every top-k choice unchanged and only sizes the codes: with unit-norm tied
        weights the k largest projections overshoot x (on planted features s is about 0.5 and the initial
        FVU halves), which otherwise costs the first few hundred steps of training.
        """
        super().initialize_from_sample(x)
        values, indices = self.select(self.pre_activations(x), self.cfg.k)
        self.scale_encoder_to_fit(x, self.decode_sparse_rows(values, indices, with_bias=False))

    @torch.no_grad()
    def selection_pre_activations(self, x: Tensor) -> Tensor:
        """Detached pre-activations [B, n] for training-time selection.

        On CPU (no autocast, not under torch.compile, default pre_activations) they are written into a
        [B, n] buffer kept between steps: a fresh tensor of that size costs page faults comparable to a
        third of the encoder matmul. The buffer is overwritten by the next call.
        """
        plain = type(self).pre_activations is TopKSAE.pre_activations
        if (
            x.device.type != "cpu"
            or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()
            or not plain
        ):
            return self.pre_activations(x)
        buffer = self._pre_buffer
        if buffer is None or buffer.shape != (x.shape[0], self.d_sae) or buffer.dtype != self.W_enc.dtype:
            buffer = self._pre_buffer = torch.empty(x.shape[0], self.d_sae, dtype=self.W_enc.dtype)
        return torch.addmm(self.b_enc, x - self.input_bias, self.W_enc, out=buffer)

    def select(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """pre [B, n] -> (values [B, k] >= 0, indices [B, k]).

        Contract used by training: each value is pre[b, indices[b, j]] or exactly 0, and gradients reach
        pre only through the nonzero values (as for ReLU after a per-row selection).
        """
        values, indices = topk_select(pre, k)
        return values.relu(), indices

    def encode_sparse_rows(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """x [B, d_in] -> (values [B, k], indices [B, k])."""
        return self.select(self.pre_activations(x), k or self.cfg.k)

    def decode_sparse_rows(self, values: Tensor, indices: Tensor, with_bias: bool = True) -> Tensor:
        """(values [B, k], indices [B, k]) -> x_hat [B, d_in], via an embedding bag with a sparse backward."""
        return sparse_decode(values, indices, self.W_dec, self.b_dec if with_bias else None)

    def encode_rows(self, x: Tensor) -> Tensor:
        values, indices = self.encode_sparse_rows(x)
        return torch.zeros(x.shape[0], self.d_sae, dtype=values.dtype, device=x.device).scatter_(
            1, indices, values
        )

    def dictionary_learning_extras(self) -> dict[str, Tensor]:
        """k, and the inference threshold a loaded AutoEncoderTopK carried (-1: none; saelab never uses it)."""
        threshold = float(self.cfg.metadata.get("inference_threshold", -1.0))
        return {"k": torch.tensor(self.cfg.k, dtype=torch.int32), "threshold": torch.tensor(threshold)}

    @classmethod
    def config_from_dictionary_learning(
        cls, extras: dict[str, Tensor], trainer: dict[str, Any], where: str
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """k (checked against the config's trainer.k); the threshold is kept as metadata `inference_threshold`."""
        k = dictionary_learning_k(extras, trainer, where)
        return {"k": k, "metadata": {"inference_threshold": float(extras["threshold"])}}, {}

    def training_forward(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        with torch.no_grad():
            pre = self.selection_pre_activations(x)
            values, indices = self.select(pre, self.cfg.k)
            aux = self.select_aux(pre, ctx)
            del pre
        return self.train_on_codes(x, values, indices, aux, ctx)

    def select_aux(self, pre: Tensor, ctx: TrainContext) -> AuxSelection | None:
        """AuxK's codes from the detached pre-activations [B, n], or None when AuxK is off or nothing is dead."""
        if self.cfg.aux_k_coef > 0 and ctx.any_dead:
            return select_auxk(pre, ctx.dead_mask, ctx.dead_latents, self.aux_k)
        return None

    def train_on_codes(
        self, x: Tensor, values: Tensor, indices: Tensor, aux: AuxSelection | None, ctx: TrainContext
    ) -> TrainOutput:
        """FVU (+ AuxK) of x [B, d_in] (of ctx's target, for a transcoder) from no-grad selected codes (values,
        indices [B, w]), with gradients attached through the sparse kernels: the training pass shared by TopK and
        BatchTopK."""
        width = values.shape[1]
        codes, indices, decoded = self.decode_code_groups(x, values, indices, (width,), aux)
        x_hat = ctx.output(decoded[:, 0] + self.b_dec)
        fvu = fraction_of_variance_unexplained(ctx.target_for(x), x_hat)
        return self.output_with_auxk(
            x, x_hat, fvu, {"fvu": fvu.detach()}, codes[:, :width], indices[:, :width], aux, decoded, ctx
        )

    def output_with_auxk(
        self,
        x: Tensor,
        x_hat: Tensor,
        loss: Tensor,
        metrics: dict[str, Tensor],
        codes: Tensor,
        indices: Tensor,
        aux: AuxSelection | None,
        decoded: Tensor,
        ctx: TrainContext,
    ) -> TrainOutput:
        """The step's TrainOutput: `loss` plus aux_k_coef times AuxK's residual loss (when `aux` is set; `decoded`
        [B, G', d] from `decode_code_groups`; the residual of ctx's target), and fired / L0 from the selected
        codes, indices [B, w]."""
        if aux is not None:
            residual = ctx.target_for(x) - x_hat.detach()
            auxk = dead_residual_loss(residual, self.auxk_decode(aux, x, decoded), aux.n_dead, self.aux_k)
            loss = loss + self.cfg.aux_k_coef * auxk
            metrics["auxk"] = auxk.detach()
        fired, l0 = sparse_activity(codes > 0, indices, self.d_sae)
        return TrainOutput(loss=loss, x_hat=x_hat, fired=fired, l0=l0, metrics=metrics)

    def decode_code_groups(
        self, x: Tensor, values: Tensor, indices: Tensor, widths: tuple[int, ...], aux: AuxSelection | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Attach gradients to no-grad selected codes (values, indices [B, W], W = sum(widths), laid out as
        consecutive column groups of the given widths) and decode each group without b_dec. Sparse AuxK codes
        join as a last group, so one sparse encoder backward serves both. Returns (codes [B, W'], indices
        [B, W'], decoded [B, G', d]); G' = G (+1 with sparse AuxK codes)."""
        if aux is not None and not aux.dense:
            values = torch.cat([values, aux.values.to(values.dtype)], dim=1)
            indices = torch.cat([indices, aux.indices], dim=1)
            widths = (*widths, aux.values.shape[1])
        plan = SlotPlan(indices, self.d_sae)  # one sort of the slots serves every sparse backward below
        handoff = aux.gradients if aux is not None else None  # dense AuxK's gradients join these backwards
        codes = sparse_encoder_values(
            values, indices, x, self.W_enc, self.b_enc, self.input_bias, plan, handoff
        )
        return codes, indices, sparse_decode_groups(codes, indices, self.W_dec, widths, plan, handoff)

    def auxk_decode(self, aux: AuxSelection, x: Tensor, decoded: Tensor) -> Tensor:
        """AuxK's residual reconstruction [B, d]: the dense product over the gathered dead latents, or the last
        column group of `decoded` [B, G', d] (sparse AuxK codes decoded with the others, `decode_code_groups`)."""
        if aux.dense:
            return gathered_auxk_decode(
                aux.codes, x, self.W_enc, self.input_bias, self.W_dec, aux.gradients, decoded
            )
        return decoded[:, -1]

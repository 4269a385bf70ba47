"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen, Nanda 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders"; Nabeshima 2024, "Matryoshka Sparse Autoencoders").

The latents are split into consecutive groups of sizes s_1..s_G (sum n); prefix g is the first
m_g = s_1 + ... + s_g latents. Selection is BatchTopK's over the whole dictionary (the batch's B * k largest
pre-activations), giving codes z [B, n]. Every prefix must reconstruct x on its own:

    x_hat_g = z[:, :m_g] @ W_dec[:m_g] + b_dec,    loss = (1/G) sum_g FVU(x, x_hat_g) + aux_k_coef * AuxK

FVU is batch-normalised with the global batch's statistics (as `fraction_of_variance_unexplained`), so a
data-parallel step equals the one-process step. The prefixes are fixed, as in Bussmann et al. and
dictionary_learning's MatryoshkaBatchTopKTrainer (Nabeshima samples random prefixes instead). Bussmann et al.
and SAELens (MatryoshkaBatchTopKTrainingSAE) sum the prefixes' squared errors; dictionary_learning takes the
mean over groups of group_weight_g * MSE_g (default weights 1/G, so sum / G^2). saelab takes the mean of the
FVUs: a constant factor from the sum (which Adam does not see), keeping the loss on the FVU scale so that
aux_k_coef weighs AuxK against it as in BatchTopK. AuxK fits the residual of the full dictionary
(x - x_hat_G), as in both (SAELens's per-level AuxK option is not offered).

Inference is BatchTopK's threshold over the whole dictionary (SAELens reads it as jumprelu); being per latent,
it makes `prefix(g)`, the first g groups as an SAE of their own, the nested SAE that training fitted.

Training decodes each group's codes separately with the sparse kernels: the selected codes are laid out group by
group (`codes_by_group`), one `sparse_decode_groups` call yields the G group decodes, and cumulative sums give
the prefix reconstructions. The cost is O(B * w' * d), w' the summed per-group widths against BatchTopK's width w
(measured in BENCHMARKS.md, "Matryoshka BatchTopK next to BatchTopK").
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from saelab.core.checks import check_number
from saelab.kernels.auxk import AuxSelection
from saelab.parallel import global_batch
from saelab.sae.base import TrainContext, TrainOutput
from saelab.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from saelab.sae.losses import at_least_float32
from saelab.sae.registry import register


def sizes_from_fractions(fractions: list[float], d_sae: int) -> list[int]:
    """Group sizes as dictionary_learning's trainer derives them: int(f * d_sae) for all groups but the last,
    which takes the remainder."""
    sizes = [int(f * d_sae) for f in fractions[:-1]]
    return [*sizes, d_sae - sum(sizes)]


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    """group_fractions: share of the latents in each nested group, smallest prefix first (sum 1).
    group_sizes: explicit sizes (sum d_sae); when set they replace group_fractions. Saved SAEs store both."""

    architecture: str = "matryoshka"
    group_fractions: list[float] = field(default_factory=lambda: [1 / 8, 1 / 8, 1 / 4, 1 / 2])
    group_sizes: list[int] = field(default_factory=list)

    def resolved_group_sizes(self) -> list[int]:
        """The group sizes for this config's d_sae: group_sizes if set, else from group_fractions."""
        if self.group_sizes:
            return list(self.group_sizes)
        return sizes_from_fractions(list(self.group_fractions), self.d_sae)

    def validate(self) -> None:
        super().validate()
        if self.group_sizes:
            for i, size in enumerate(self.group_sizes):
                check_number(f"sae.group_sizes[{i}]", size, low=1, integer=True)
            if sum(self.group_sizes) != self.d_sae:
                raise ValueError(
                    f"sae.group_sizes={list(self.group_sizes)} add up to {sum(self.group_sizes)}, but "
                    f"sae.d_sae={self.d_sae}; make them add up to d_sae (or clear group_sizes and set "
                    "sae.group_fractions)."
                )
            return
        if not self.group_fractions:
            raise ValueError("sae.group_fractions is empty; give at least one fraction (e.g. [1.0]).")
        for i, fraction in enumerate(self.group_fractions):
            check_number(f"sae.group_fractions[{i}]", fraction, low=0, high=1, low_open=True)
        if not math.isclose(sum(self.group_fractions), 1.0, rel_tol=1e-6):
            raise ValueError(
                f"sae.group_fractions={list(self.group_fractions)} add up to {sum(self.group_fractions)}; "
                "they must add up to 1."
            )
        sizes = self.resolved_group_sizes()
        if min(sizes) < 1:
            raise ValueError(
                f"sae.group_fractions={list(self.group_fractions)} give group sizes {sizes} at "
                f"sae.d_sae={self.d_sae}; every group needs at least one latent: widen the SAE or raise "
                "the small fractions."
            )


def codes_by_group(values: Tensor, indices: Tensor, starts: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Lay selected codes out group by group (no gradient).

    values [B, w] >= 0, indices [B, w]; starts [G - 1] the first latent of groups 2..G. Returns
    (values [B, W], indices [B, W], widths (w_1..w_G)), W = w_1 + ... + w_G: the w_g columns of group g hold
    each row's nonzero codes on group g's latents, then zeros (index 0); w_g is the largest such count in the
    batch (at least 1).
    One host sync reads the widths.
    """
    batch, width = values.shape
    groups = starts.numel() + 1
    group = torch.bucketize(indices, starts, right=True)
    group = torch.where(values > 0, group, groups)  # zero codes go to a discarded bucket
    counts = torch.zeros(batch, groups + 1, dtype=torch.long, device=values.device)
    counts.scatter_add_(1, group, torch.ones_like(group))
    widths = counts[:, :groups].amax(dim=0).clamp_min(1)
    total = int(widths.sum())
    offsets = torch.cat([widths.new_zeros(1), widths.cumsum(0)])  # [G + 1]; the discard bucket at `total`
    order = group.argsort(dim=1, stable=True)
    sorted_group = group.gather(1, order)
    first_of_group = (counts.cumsum(dim=1) - counts).gather(1, sorted_group)
    rank = torch.arange(width, device=values.device) - first_of_group
    column = offsets[sorted_group] + rank
    out_values = values.new_zeros(batch, total + width).scatter_(1, column, values.gather(1, order))
    out_indices = indices.new_zeros(batch, total + width).scatter_(1, column, indices.gather(1, order))
    return out_values[:, :total], out_indices[:, :total], tuple(widths.tolist())


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK whose nested prefixes of the dictionary each learn to reconstruct on their own."""

    config_class = MatryoshkaConfig
    cfg: MatryoshkaConfig
    required_fields = ("d_in", "d_sae", "k", "group_sizes")
    data_parallel: ClassVar[bool] = True
    dictionary_learning_class: ClassVar[str] = "MatryoshkaBatchTopKSAE"
    dictionary_learning_trainer: ClassVar[str] = "MatryoshkaBatchTopKTrainer"
    dictionary_learning_reads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: MatryoshkaConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        # The first latent of groups 2..G [G - 1], kept on the SAE's device (not saved: the config holds the sizes).
        ends = torch.tensor(self.group_sizes, dtype=torch.long).cumsum(0)
        self.register_buffer("group_starts", ends[:-1], persistent=False)

    @property
    def group_sizes(self) -> list[int]:
        """Sizes of the G nested groups, smallest prefix first (sum d_sae)."""
        return self.cfg.resolved_group_sizes()

    def config_dict(self) -> dict[str, Any]:
        """The base config with the resolved group sizes, so a load needs no d_sae arithmetic."""
        out = super().config_dict()
        out["group_sizes"] = self.group_sizes
        return out

    @torch.no_grad()
    def prefix(self, groups: int) -> MatryoshkaSAE:
        """The nested SAE of the first `groups` groups (m = their summed size latents): a new SAE with the first m
        encoder columns, decoder rows and biases and the same threshold. Its codes are this SAE's first m code
        columns and its reconstruction the prefix reconstruction training fitted (inference is per latent)."""
        sizes = self.group_sizes
        if not 1 <= groups <= len(sizes):
            raise ValueError(
                f"groups={groups} must be in [1, {len(sizes)}] (this SAE has {len(sizes)} groups)."
            )
        m = sum(sizes[:groups])
        cfg = dataclasses.replace(
            self.cfg,
            d_sae=m,
            k=min(self.cfg.k, m),
            group_sizes=sizes[:groups],
            group_fractions=[size / m for size in sizes[:groups]],
            metadata=copy.deepcopy(self.cfg.metadata),
        )
        small = type(self)(cfg).to(self.W_dec.device)
        small.W_enc.copy_(self.W_enc[:, :m])
        small.b_enc.copy_(self.b_enc[:m])
        small.W_dec.copy_(self.W_dec[:m])
        small.b_dec.copy_(self.b_dec)
        small.threshold.copy_(self.threshold)
        return small.train(self.training)

    # ------------------------------------------------------------ training
    def train_on_codes(
        self, x: Tensor, values: Tensor, indices: Tensor, aux: AuxSelection | None, ctx: TrainContext
    ) -> TrainOutput:
        """Mean prefix FVU (+ AuxK on the full dictionary's residual) of x [B, d_in] (of ctx's target, for a
        transcoder) from no-grad selected codes (values, indices [B, w]), gradients attached through the sparse
        kernels."""
        values, indices, widths = codes_by_group(values, indices, self.group_starts)
        groups, width = len(widths), values.shape[1]
        codes, indices, decoded = self.decode_code_groups(x, values, indices, widths, aux)  # [B, G (+1), d]
        prefixes = decoded[:, :groups].cumsum(dim=1) + self.b_dec  # x_hat of each prefix [B, G, d]
        if ctx.skip is not None:
            prefixes = prefixes + ctx.skip[:, None]
        target = ctx.target_for(x)
        denominator = global_batch.centred_sumsq(target).clamp_min(1e-12)
        wide = at_least_float32(target, prefixes)
        errors = (target[:, None].to(wide) - prefixes.to(wide)).pow(2).sum(dim=(0, 2))  # [G]
        prefix_fvu = global_batch.ranks() * errors / denominator
        x_hat = prefixes[:, -1]
        loss = prefix_fvu.mean()
        metrics = {
            "fvu": prefix_fvu[-1].detach(),
            "matryoshka_loss": loss.detach(),
            "fvu_first_prefix": prefix_fvu[0].detach(),
        }
        return self.output_with_auxk(
            x, x_hat, loss, metrics, codes[:, :width], indices[:, :width], aux, decoded, ctx
        )

    # ------------------------------------------------------------ interop
    def dictionary_learning_extras(self) -> dict[str, Tensor]:
        """BatchTopK's k and threshold, and the group_sizes buffer of dictionary_learning's MatryoshkaBatchTopKSAE."""
        return {
            **super().dictionary_learning_extras(),
            "group_sizes": torch.tensor(self.group_sizes, dtype=torch.int64),
        }

    def dictionary_learning_trainer_fields(self) -> dict[str, Any]:
        """`group_fractions`, as dictionary_learning's Matryoshka trainer records them: this config's fractions
        when they give the saved sizes, else each saved size's share of d_sae."""
        sizes = self.group_sizes
        fractions = list(self.cfg.group_fractions)
        if sizes_from_fractions(fractions, self.d_sae) != sizes:
            fractions = [size / self.d_sae for size in sizes]
        return {"group_fractions": fractions}

    @classmethod
    def config_from_dictionary_learning(
        cls, extras: dict[str, Tensor], trainer: dict[str, Any], where: str
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """BatchTopK's k and threshold; group_sizes from the state dict, group_fractions from the trainer config
        when it lists one per group (else the sizes' shares)."""
        fields, tensors = super().config_from_dictionary_learning(extras, trainer, where)
        sizes = fields.pop("metadata")["group_sizes"]
        fractions = trainer.get("group_fractions")
        if not (isinstance(fractions, list) and len(fractions) == len(sizes)):
            fractions = [size / sum(sizes) for size in sizes]
        return {**fields, "group_sizes": sizes, "group_fractions": [float(f) for f in fractions]}, tensors

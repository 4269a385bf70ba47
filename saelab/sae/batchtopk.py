"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, "BatchTopK Sparse Autoencoders"), a TopK option.

Training keeps the B * k largest pre-activations of the whole batch [B, n] (ReLU on the kept values), so
rows use k latents on average but each as many as it needs. Inference cannot depend on the batch, so it
uses a threshold: z = pre * (pre > threshold), where the threshold is a running estimate (exponential
moving average, decay `threshold_decay`) of the smallest positive kept value of each training batch. In
data-parallel training both the selection and the threshold use the global batch (`batch_cutoff`).
Loss, AuxK, unit-norm decoder, initialisation and the sparse training kernels are TopK's: a batch-level
selection is, row by row, a top-w selection padded with zeros (w = the largest row count in the batch).

TopK warm-up (`topk_warmup_frac`, saelab's default 0.8; 0 is the paper's BatchTopK throughout): the first steps keep
each row's own top k (TopK's selection), the rest the batch's top B * k. With one cutoff for the whole batch,
interference in rows where many features are active outranks small true activations in sparse rows, so the
batch-level objective favours latents that mix features: on planted features even the true dictionary reconstructs
worse under the batch cutoff than under per-row TopK (FVU 0.32 against 0.23 at k 6), and BatchTopK trained
throughout recovers a fraction of the features TopK does (dictionary_learning's BatchTopKTrainer does the same).
Per-row selection finds the features; the final batch-level phase (the learning rate decays over the last 20% by
default) fits the encoder to the batch cutoff that inference uses, and the threshold is estimated from that phase's
batches. docs/variants.md has the measurements, and the warm-up's cost on a language model's activations. The
threshold starts at the cutoff of the first batch (set by `initialize_from_sample`) so every checkpoint has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saelab.core.checks import check_number
from saelab.kernels import topk_select
from saelab.parallel import global_batch
from saelab.sae.base import TrainContext, TrainOutput
from saelab.sae.registry import register
from saelab.sae.topk import TopKConfig, TopKSAE, dictionary_learning_k


@dataclass
class BatchTopKConfig(TopKConfig):
    """k: mean active latents per row in training. threshold_decay: EMA decay of the inference threshold.
    topk_warmup_frac: fraction of the steps, from the start, that keep each row's top k before the batch-level
    selection (0: batch-level throughout)."""

    architecture: str = "batchtopk"
    threshold_decay: float = 0.9
    topk_warmup_frac: float = 0.8

    def validate(self) -> None:
        super().validate()
        check_number("sae.threshold_decay", self.threshold_decay, low=0, high=1, high_open=True)
        check_number(
            "sae.topk_warmup_frac", self.topk_warmup_frac, low=0, high=1, hint="0: batch-level throughout."
        )


#: Candidates per row for the batch cutoff, as a multiple of k (`BatchTopKSAE.select`; doubled when a row needs more).
CANDIDATE_FACTOR = 4


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    config_class = BatchTopKConfig
    cfg: BatchTopKConfig
    #: Inference is z = pre * (pre > t): SAELens's JumpReLU with threshold t on every latent (as SAELens
    #: itself saves an inference BatchTopK SAE).
    saelens_architecture = "jumprelu"
    saelens_reads = ()
    dictionary_learning_class = "BatchTopKSAE"
    dictionary_learning_trainer = "BatchTopKTrainer"
    #: Its inference rule is BatchTopK's; loaded as batchtopk (group sizes as metadata) unless a variant exports it.
    dictionary_learning_reads = ("MatryoshkaBatchTopKSAE",)
    unset_when_nan = frozenset({"threshold"})

    def __init__(self, cfg: BatchTopKConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        # NaN until the first training batch; saved with the weights.
        self.register_buffer("threshold", torch.full((), float("nan"), dtype=self.W_dec.dtype))

    @torch.no_grad()
    def initialize_from_sample(self, x: Tensor) -> None:
        """TopK's init (b_dec, least-squares encoder scale) on x [N, d_in], then the threshold at the sample's
        batch cutoff (the N * k-th largest pre-activation)."""
        super().initialize_from_sample(x)
        values, _ = self.select(self.pre_activations(x), self.cfg.k)
        self.update_threshold(values)

    def batch_level(self, ctx: TrainContext) -> bool:
        """Whether this step selects over the whole batch (after the TopK warm-up)."""
        return ctx.step >= round(self.cfg.topk_warmup_frac * ctx.total_steps)

    def select(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """pre [B, n] -> the batch's B*k largest entries as (values [B, w] >= 0, indices [B, w]): each row's
        kept entries, then zeros (w = the largest row count). One host sync (for w) in the usual case.

        Exact without a top-k over all B*n entries: the cutoff is taken among each row's top m candidates
        (m = CANDIDATE_FACTOR * k), which holds every entry above it unless some row keeps all m of its
        candidates; then m doubles (and the cutoff is taken again) until no row does or m = n."""
        n = pre.shape[1]
        m = min(n, CANDIDATE_FACTOR * k)
        while True:
            candidates, latents = topk_select(pre, m)  # [B, m] each
            cutoff = self.batch_cutoff(candidates, k)
            width = int(-global_batch.minimum(-(candidates >= cutoff).sum(dim=1).max()))  # max over ranks
            if width < m or m == n:
                break
            m = min(n, 2 * m)
        values, picked = candidates.topk(max(width, 1), dim=1, sorted=False)
        kept = torch.where(values >= cutoff, values, torch.zeros_like(values)).relu()
        return kept, latents.gather(1, picked)

    @staticmethod
    def batch_cutoff(pre: Tensor, k: int) -> Tensor:
        """The (B * k)-th largest entry of the batch, from this rank's rows pre [b, m] (all of a row's
        pre-activations or its top candidates; B = b, or W * b in data-parallel training). Each rank offers
        its own top B * k (the global top B * k may all lie on one rank); the cutoff is the (B * k)-th largest
        of what the W ranks offered."""
        count = pre.shape[0] * k * global_batch.ranks()
        flat = pre.reshape(-1)
        top = flat.topk(min(count, flat.numel()), sorted=False).values
        if global_batch.ranks() > 1:
            top = global_batch.gather(top).reshape(-1).topk(count, sorted=False).values
        return top.min()

    @torch.no_grad()
    def update_threshold(self, values: Tensor) -> None:
        """Fold the smallest positive kept value of this batch (the global batch in data-parallel training) into
        the running threshold (no host sync)."""
        smallest = global_batch.minimum(torch.where(values > 0, values, torch.inf).min())
        decay = self.cfg.threshold_decay
        blended = torch.where(
            self.threshold.isnan(), smallest, decay * self.threshold + (1 - decay) * smallest
        )
        self.threshold.copy_(torch.where(smallest.isfinite(), blended, self.threshold))

    # ------------------------------------------------------------ files
    def file_tensors(self) -> dict[str, Tensor]:
        """The state dict with the scalar threshold repeated per latent [n], as SAELens's JumpReLU reads it."""
        tensors = super().file_tensors()
        tensors["threshold"] = tensors["threshold"].expand(self.d_sae).contiguous()
        return tensors

    @classmethod
    def from_file_tensors(cls, tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
        """A per-latent threshold [n] (all equal, or all NaN before training) back to the scalar buffer."""
        threshold = tensors.get("threshold")
        if threshold is None or threshold.ndim == 0:
            return tensors
        first = threshold.reshape(-1)[:1]
        if not (threshold.isnan().all() or (threshold == first).all()):
            raise ValueError(
                f"{where}: a BatchTopK SAE has one threshold, but 'threshold' differs across latents; "
                "this file holds a JumpReLU SAE (set its saelab_architecture to 'jumprelu')."
            )
        return {**tensors, "threshold": first.reshape(())}

    def config_dict(self) -> dict[str, Any]:
        """The base config; before training has estimated the threshold, `architecture` is a sentence SAELens
        fails on, since SAELens would read the NaN threshold as "no latent ever fires" and return zero codes."""
        out = super().config_dict()
        if bool(self.threshold.isnan()):
            out["architecture"] = (
                f"{self.cfg.architecture} (untrained: no inference threshold yet, so SAELens cannot load it; "
                "train it first, or use saelab.load_sae)"
            )
        return out

    def dictionary_learning_extras(self) -> dict[str, Tensor]:
        """k and the scalar inference threshold (refused while training has not estimated it)."""
        threshold = float(self.threshold)
        if not threshold >= 0:
            raise ValueError(
                f"this {self.cfg.architecture} SAE has no usable inference threshold ({threshold}); train it before "
                "exporting."
            )
        return {"k": torch.tensor(self.cfg.k, dtype=torch.int32), "threshold": torch.tensor(threshold)}

    @classmethod
    def config_from_dictionary_learning(
        cls, extras: dict[str, Tensor], trainer: dict[str, Any], where: str
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """k and the threshold (a negative one was never estimated: refused); Matryoshka group sizes as metadata."""
        fields: dict[str, Any] = {"k": dictionary_learning_k(extras, trainer, where)}
        threshold = extras["threshold"]
        if not bool(threshold >= 0):
            raise ValueError(
                f"{where}: threshold={float(threshold)}: the {trainer.get('dict_class')} never estimated its "
                "inference threshold (dictionary_learning starts it at -1 and sets it after threshold_start_step), "
                "so it has no batch-independent encoder to load."
            )
        if "group_sizes" in extras:
            fields["metadata"] = {"group_sizes": [int(s) for s in extras["group_sizes"]]}
        return fields, {"threshold": threshold.reshape(())}

    # ----------------------------------------------------------- inference
    def encode_rows(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> z [B, n] = pre * (pre > threshold)."""
        if bool(self.threshold.isnan()):
            raise RuntimeError(
                "this BatchTopK SAE has no inference threshold yet (it is estimated during training); "
                "train it first, or load a trained one."
            )
        pre = self.pre_activations(x)
        return pre * (pre > self.threshold)

    def encode_sparse_rows(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """x [B, d_in] -> threshold codes as (values [B, w], indices [B, w]), w = the batch's largest row L0
        (k, if given, caps w); slots past a row's own L0 hold value 0."""
        z = self.encode_rows(x)
        width = max(int((z > 0).sum(dim=1).max()) if z.shape[0] else 0, 1)  # an empty batch: width 1
        values, indices = z.topk(min(width, k or width), dim=1, sorted=False)
        return values, indices

    # ------------------------------------------------------------ training
    def training_forward(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        with torch.no_grad():
            pre = self.pre_activations(x)
            if self.batch_level(ctx):
                values, indices = self.select(pre, self.cfg.k)
                self.update_threshold(values)
            else:
                values, indices = TopKSAE.select(self, pre, self.cfg.k)
            inference_fired = (pre > self.threshold).any(
                dim=0
            )  # what the saved SAE's threshold encoder fires
            aux = self.select_aux(pre, ctx)
            del pre
        out = self.train_on_codes(x, values, indices, aux, ctx)
        out.metrics["threshold"] = self.threshold.clone()
        out.inference_fired = inference_fired
        return out

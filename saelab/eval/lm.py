"""Downstream loss with the SAE spliced into a language model.

Per batch of tokens [B, T], three forward passes share one installed hook (`saelab.splice.hooks`):
clean, with the activation at the hook replaced by the SAE reconstruction, and zero-ablated. Averaged
over counted next-token predictions (float64 sums):
    ce_clean, ce_sae, ce_zero;  ce_loss_score = (ce_zero - ce_sae) / (ce_zero - ce_clean)
    kl_div = KL(p_clean || p_sae) = sum_v p_clean (log p_clean - log p_sae); kl_div_zero the same for the
    zero-ablated pass; kl_div_score = (kl_div_zero - kl_div) / kl_div_zero (SAEBench's)
Special tokens (BOS, EOS, pad, ...) are left untouched at the hook, and the prediction at position t is
counted only when neither token t nor the target t + 1 is special.

A transcoder reads its input at the hook and replaces the activation at its target hook; the hook activations
returned are the target's (y, y_hat), and a fourth pass mean-ablates the target (its mean over the batch's
substituted positions): ce_mean and ce_loss_score_mean = (ce_mean - ce_sae) / (ce_mean - ce_clean).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from saelab.metrics.codes import Codes, select_rows
from saelab.sae.base import SAE
from saelab.splice.hooks import spliced


@dataclass
class SplicedBatch:
    """The hook activations of the non-special positions of a batch: x, x_hat [N, d] and their codes."""

    x: Tensor
    x_hat: Tensor
    codes: Codes


def logits_of(output: Any) -> Tensor:
    """Logits [B, T, V] from a TransformerLens tensor output or a Hugging Face ModelOutput."""
    logits = output.logits if hasattr(output, "logits") else output
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        raise ValueError("the model must return logits [batch, pos, vocab] (or an output with .logits).")
    return logits


def special_mask(tokens: Tensor, special_token_ids: Sequence[int]) -> Tensor:
    """[B, T] bool, True at special tokens."""
    if not special_token_ids:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, torch.as_tensor(list(special_token_ids), device=tokens.device))


def next_token_log_probs(logits: Tensor) -> Tensor:
    """Log-probabilities [B, T-1, V] (float32) of the predictions at positions 0..T-2."""
    return logits[:, :-1].float().log_softmax(dim=-1)


def token_ce(log_probs: Tensor, tokens: Tensor) -> Tensor:
    """Cross-entropy [B, T-1] of each next-token prediction."""
    return -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)


class LMEvaluator:
    """Streams token batches through clean / spliced / zero-ablated passes; `compute()` gives the averages."""

    def __init__(
        self,
        model: nn.Module,
        sae: SAE,
        hook_name: str,
        special_token_ids: Sequence[int] = (),
        forward_kwargs: dict[str, Any] | None = None,
        target_hook: str | None = None,
    ):
        self.model, self.sae, self.hook_name = model, sae, hook_name
        self.target_hook = target_hook  # a transcoder's (None: its metadata's hook_name_out)
        self.special_token_ids = list(special_token_ids)
        self.forward_kwargs = forward_kwargs or {}
        self.sums = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_div": 0.0, "kl_div_zero": 0.0}
        if sae.is_transcoder:
            self.sums["ce_mean"] = 0.0
        self.predictions = 0

    def _run(self, tokens: Tensor) -> Tensor:
        return logits_of(self.model(tokens, **self.forward_kwargs))

    @torch.no_grad()
    def update(self, tokens: Tensor, max_positions: int | None = None) -> SplicedBatch:
        """Evaluate one batch of token ids [B, T]; returns the hook activations at non-special positions.

        max_positions: evaluate only the first this many non-special positions (row-major): only they are
        returned and only predictions made at them are counted (the last batch of a token budget).
        """
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be [batch, pos] with pos >= 2, got shape {tuple(tokens.shape)}.")
        special = special_mask(tokens, self.special_token_ids)
        evaluated = ~special
        if max_positions is not None:
            order = rearrange(evaluated, "b t -> (b t)").long().cumsum(0).reshape(evaluated.shape)
            evaluated = evaluated & (order <= max_positions)
        counted = evaluated[:, :-1] & ~special[:, 1:]
        with spliced(
            self.model, self.sae, self.hook_name, mode="clean", mask=~special, target_hook=self.target_hook
        ) as splice:
            clean = next_token_log_probs(self._run(tokens))
            x = splice.x
            splice.mode = "reconstruct"
            with_sae = next_token_log_probs(self._run(tokens))
            codes, x_hat = splice.codes, splice.x_hat
            self._add("ce_clean", token_ce(clean, tokens), counted)
            self._add("ce_sae", token_ce(with_sae, tokens), counted)
            kl = (clean.exp() * (clean - with_sae)).sum(dim=-1)
            self._add("kl_div", kl, counted)
            del with_sae
            splice.mode = "zero"
            zero = next_token_log_probs(self._run(tokens))
            self._add("ce_zero", token_ce(zero, tokens), counted)
            self._add("kl_div_zero", (clean.exp() * (clean - zero)).sum(dim=-1), counted)
            del zero, clean
            if "ce_mean" in self.sums:
                splice.mode = "mean"
                self._add("ce_mean", token_ce(next_token_log_probs(self._run(tokens)), tokens), counted)
        self.predictions += int(counted.sum())
        keep = rearrange(evaluated, "b t -> (b t)")
        return SplicedBatch(
            x=rearrange(x, "b t d -> (b t) d")[keep],
            x_hat=rearrange(x_hat, "b t d -> (b t) d")[keep],
            codes=select_rows(codes, keep),
        )

    def _add(self, name: str, values: Tensor, counted: Tensor) -> None:
        self.sums[name] += values.double()[counted].sum().item()

    def compute(self) -> dict[str, float]:
        """Mean CE (clean / SAE / zero-ablated), ce_loss_score, CE degradation and KL over counted predictions."""
        if self.predictions == 0:
            raise ValueError("no next-token predictions were counted (every token special, or no batches).")
        out = {k: v / self.predictions for k, v in self.sums.items()}
        gap = out["ce_zero"] - out["ce_clean"]
        out["ce_loss_score"] = (out["ce_zero"] - out["ce_sae"]) / gap if gap != 0 else float("nan")
        if "ce_mean" in out:
            mean_gap = out["ce_mean"] - out["ce_clean"]
            out["ce_loss_score_mean"] = (
                (out["ce_mean"] - out["ce_sae"]) / mean_gap if mean_gap else float("nan")
            )
        out["ce_degradation"] = out["ce_sae"] - out["ce_clean"]
        zero_kl = out["kl_div_zero"]
        out["kl_div_score"] = (zero_kl - out["kl_div"]) / zero_kl if zero_kl != 0 else float("nan")
        out["predictions"] = self.predictions
        return out

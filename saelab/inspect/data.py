"""What `saelab inspect` collects about every latent: a dataclass of CPU tensors, readable from notebooks.

Token positions are global token indices: context id * context_size + position, context 0 being the first
context read (`metadata["start_context"]` contexts into the text). Contexts are stored once (`context_ids`,
`context_tokens`), only those that some kept example or random window refers to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Example:
    """One activating example of a latent: its value at `position` of context `context_id`, and the window
    tokens[start : start + len(acts)] of that context with the latent's activation at each of them."""

    value: float
    context_id: int
    position: int
    start: int
    token_ids: list[int]
    acts: list[float]


@dataclass
class Band:
    """One activation interval [low, high) of a latent: its firing count there and a uniform sample of them."""

    low: float
    high: float
    count: int
    examples: list[Example]


@dataclass
class FeatureData:
    """Per-latent statistics and examples over `n_tokens` non-special tokens (see `collect_features`).

    fire_count [n] int64, act_sum [n] float64, act_max [n] float32 (0 for dead latents).
    hist_edges [bins + 1] float64 (log-spaced), hist_counts [n, bins] int64: firings by activation magnitude.
    top_value / top_token [n, n_top]: largest activations, descending (token -1: empty slot).
    band_scale [n]: S, a power of two above the latent's maximum; interval b is [b S / B, (b + 1) S / B).
    band_count [n, B]: firings per interval. band_value / band_token [n, B, per_band]: a uniform sample of
    the firings in each interval (random order). top_window [n, n_top, W] / band_window [n, B, per_band, W]
    float16, W = before + 1 + after: the latent's activation around each example (NaN outside its context).
    random_token [R] and random_latents (R int64 tensors): uniformly sampled token positions and the latents
    firing anywhere in their windows. cofiring_ids / cofiring_counts / cofiring_jaccard [n, m]: co-firing
    partners (-1: empty; Misra-Gries candidates) with exact counts of the tokens on which both are among the
    token's `cofiring_cap` strongest latents, and the Jaccard index count / (f_i + f_j - count), f =
    cofiring_fires [n] (firings among a token's strongest); a partner not listed co-fired at most
    cofiring_error [n] times. nearest_ids / nearest_cos [n, m]: nearest latents by decoder cosine.
    promoted_ids / promoted_logits and suppressed_ids / suppressed_logits [n, m]: output tokens whose logits
    the decoder direction raises / lowers most; logit_hist_range [n, 2] / logit_hist_counts [n, bins]: the
    histogram of its logit weights over the vocabulary (all None without an unembedding; logit_note says
    why or how they were computed). vocab: token id -> text for every id used.
    """

    d_sae: int
    hook_name: str
    context_size: int
    window_before: int
    window_after: int
    n_tokens: int
    n_contexts: int
    fire_count: Tensor
    act_sum: Tensor
    act_max: Tensor
    hist_edges: Tensor
    hist_counts: Tensor
    top_value: Tensor
    top_token: Tensor
    top_window: Tensor
    band_scale: Tensor
    band_count: Tensor
    band_value: Tensor
    band_token: Tensor
    band_window: Tensor
    random_token: Tensor
    random_latents: list[Tensor]
    cofiring_ids: Tensor
    cofiring_counts: Tensor
    cofiring_jaccard: Tensor
    cofiring_fires: Tensor
    cofiring_error: Tensor
    cofiring_cap: int
    nearest_ids: Tensor
    nearest_cos: Tensor
    promoted_ids: Tensor | None
    promoted_logits: Tensor | None
    suppressed_ids: Tensor | None
    suppressed_logits: Tensor | None
    logit_hist_range: Tensor | None
    logit_hist_counts: Tensor | None
    logit_note: str
    context_ids: Tensor
    context_tokens: Tensor
    vocab: dict[int, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def density(self) -> Tensor:
        """[n] float64: fraction of tokens on which each latent fires."""
        return self.fire_count.double() / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> Tensor:
        """[n] float64: mean activation over the tokens where the latent fires (NaN for dead latents)."""
        return self.act_sum / self.fire_count.double()

    @property
    def dead(self) -> Tensor:
        """[n] bool: never fired on the tokens read."""
        return self.fire_count == 0

    @property
    def max_cos(self) -> Tensor:
        """[n]: largest decoder cosine to another latent."""
        return self.nearest_cos[:, 0]

    def context(self, context_id: int) -> Tensor:
        """Token ids [context_size] of a stored context."""
        row = torch.searchsorted(self.context_ids, torch.tensor([context_id]))
        if row.item() >= self.context_ids.numel() or self.context_ids[row].item() != context_id:
            raise KeyError(f"context {context_id} is not stored (no kept example refers to it).")
        return self.context_tokens[row.item()]

    def examples(self, latent: int, kind: str = "top") -> list[Example]:
        """The latent's kept examples: kind "top" (by activation, descending) or "bands" (every interval's
        sample, by activation, descending)."""
        if kind not in ("top", "bands"):
            raise ValueError(f"kind={kind!r} must be 'top' or 'bands'.")
        self._check_latent(latent)
        if kind == "top":
            return self._examples(self.top_value[latent], self.top_token[latent], self.top_window[latent])
        found = [e for band in self.bands(latent) for e in band.examples]
        return sorted(found, key=lambda e: -e.value)

    def bands(self, latent: int) -> list[Band]:
        """The latent's activation intervals that hold firings, lowest first, each with its sample (by
        activation, descending)."""
        self._check_latent(latent)
        scale, bands = float(self.band_scale[latent]), self.band_count.shape[1]
        out = []
        for b in self.band_count[latent].nonzero().flatten().tolist():
            examples = self._examples(
                self.band_value[latent, b], self.band_token[latent, b], self.band_window[latent, b]
            )
            examples.sort(key=lambda e: -e.value)
            count = int(self.band_count[latent, b])
            out.append(Band(b * scale / bands, (b + 1) * scale / bands, count, examples))
        return out

    def _check_latent(self, latent: int) -> None:
        if not 0 <= latent < self.d_sae:
            raise IndexError(f"latent {latent} is out of range for d_sae={self.d_sae}.")

    def _examples(self, values: Tensor, tokens: Tensor, windows: Tensor) -> list[Example]:
        """Examples of one latent from its values / tokens [k] and windows [k, W] (token -1 skipped)."""
        out = []
        for value, token, window in zip(values, tokens, windows, strict=True):
            if token < 0:
                continue
            ctx, pos = divmod(int(token), self.context_size)
            start = max(pos - self.window_before, 0)
            stop = min(pos + self.window_after + 1, self.context_size)
            offset = start - (pos - self.window_before)
            acts = window[offset : offset + stop - start].float().tolist()
            ids = self.context(ctx)[start:stop].tolist()
            out.append(Example(float(value), ctx, pos, start, ids, acts))
        return out

    def token_text(self, token_id: int) -> str:
        """The token's text from the site's vocabulary, or `<id>` when it is not there."""
        return self.vocab.get(int(token_id), f"<{int(token_id)}>")

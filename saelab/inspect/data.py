"""What `saelab inspect` collects about every latent: a dataclass of CPU tensors, readable from notebooks.

Token positions are global token indices: context id * context_size + position. Contexts are stored once
(`context_ids`, `context_tokens`), only those that some kept example refers to.
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
class FeatureData:
    """Per-latent statistics and examples over `n_tokens` non-special tokens (see `collect_features`).

    fire_count [n] int64, act_sum [n] float64, act_max [n] float32 (0 for dead latents).
    hist_edges [bins + 1] float64 (log-spaced), hist_counts [n, bins] int64: firings by activation magnitude.
    top_value / top_token [n, n_top]: largest activations, descending (token -1: empty slot).
    sample_value / sample_token [n, n_samples]: a uniform random sample of the firings.
    top_window / sample_window [n, k, before + 1 + after] float16: the latent's activation around each example
    (NaN outside its context). cofiring_ids / cofiring_counts [n, m]: most co-firing latents (-1: empty),
    counts are lower bounds undercounting by at most cofiring_error [n]. nearest_ids / nearest_cos [n, m]:
    nearest latents by decoder cosine. promoted_ids / promoted_logits and suppressed_ids / suppressed_logits
    [n, m]: output tokens whose logits the decoder direction raises / lowers most (None without an
    unembedding; logit_note says why or how they were computed). vocab: token id -> text for every id used.
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
    sample_value: Tensor
    sample_token: Tensor
    sample_window: Tensor
    cofiring_ids: Tensor
    cofiring_counts: Tensor
    cofiring_error: Tensor
    cofiring_cap: int
    nearest_ids: Tensor
    nearest_cos: Tensor
    promoted_ids: Tensor | None
    promoted_logits: Tensor | None
    suppressed_ids: Tensor | None
    suppressed_logits: Tensor | None
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
        """The latent's kept examples: kind "top" (by activation, descending) or "samples" (by activation,
        descending, a uniform sample of its firings)."""
        if kind not in ("top", "samples"):
            raise ValueError(f"kind={kind!r} must be 'top' or 'samples'.")
        if not 0 <= latent < self.d_sae:
            raise IndexError(f"latent {latent} is out of range for d_sae={self.d_sae}.")
        values, tokens, windows = (
            (self.top_value, self.top_token, self.top_window)
            if kind == "top"
            else (self.sample_value, self.sample_token, self.sample_window)
        )
        out = []
        for value, token, window in zip(values[latent], tokens[latent], windows[latent], strict=True):
            if token < 0:
                continue
            ctx, pos = divmod(int(token), self.context_size)
            start = max(pos - self.window_before, 0)
            stop = min(pos + self.window_after + 1, self.context_size)
            offset = start - (pos - self.window_before)
            acts = window[offset : offset + stop - start].float().tolist()
            ids = self.context(ctx)[start:stop].tolist()
            out.append(Example(float(value), ctx, pos, start, ids, acts))
        if kind == "samples":
            out.sort(key=lambda e: -e.value)
        return out

    def token_text(self, token_id: int) -> str:
        return self.vocab.get(int(token_id), f"<{int(token_id)}>")

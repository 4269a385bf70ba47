"""Streaming dead-latent statistics, counted in tokens, and the latent-density histogram.

The trainer uses `DeadLatentTracker` for its dead window (AuxK); the evaluator uses it on held-out data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saelab.metrics.codes import Codes, fire_counts, n_rows


class DeadLatentTracker:
    """Per latent: tokens since it last fired and total fire counts. Dead = silent for >= `window` tokens.

    A latent that never fired counts tokens from the start of tracking, so it becomes dead after one window.
    Within a batch, firing on any row resets the latent's counter to 0 (batch-granular).
    """

    def __init__(self, d_sae: int, window: int, device: torch.device | str = "cpu"):
        if window <= 0:
            raise ValueError(f"dead-latent window must be a positive number of tokens, got {window}.")
        self.window = window
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.tokens_seen = 0

    @property
    def d_sae(self) -> int:
        """Number of latents tracked."""
        return self.fire_counts.shape[0]

    def update(self, fired: Tensor, n_tokens: int, counts: Tensor | None = None) -> None:
        """fired: [n] bool for this batch of n_tokens rows; counts: optional [n] fire counts in the batch."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired, 0)
        self.fire_counts += counts if counts is not None else fired.long()
        self.tokens_seen += n_tokens

    def update_codes(self, codes: Codes) -> None:
        """Count one batch of codes (dense [B, n] or sparse (values, indices) [B, k]); O(B*k) when sparse."""
        counts = fire_counts(codes, self.d_sae)
        self.update(counts > 0, n_rows(codes), counts)

    @property
    def dead_mask(self) -> Tensor:
        """[n] bool."""
        return self.tokens_since_fired >= self.window

    def dead_fraction(self) -> float:
        """Fraction of latents that have not fired within the window."""
        return self.dead_mask.float().mean().item()

    def reported_dead(self) -> tuple[float, int]:
        """(fraction of latents silent over the report window, that window in tokens) for a final report: the
        window, or every token seen when fewer (a run shorter than its window then reports the latents that
        never fired, where `dead_fraction` could count none)."""
        window = min(self.window, self.tokens_seen) if self.tokens_seen else self.window
        return (self.tokens_since_fired >= window).float().mean().item(), window

    def density(self) -> Tensor:
        """Fraction of tracked tokens on which each latent fired: [n] float64."""
        return self.fire_counts.double() / max(self.tokens_seen, 1)

    def state_dict(self) -> dict[str, object]:
        """Window, per-latent counters [d_sae] (on CPU) and tokens seen, for a checkpoint."""
        return {
            "window": self.window,
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "fire_counts": self.fire_counts.cpu(),
            "tokens_seen": self.tokens_seen,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore `state_dict()`'s output onto this tracker's device."""
        device = self.tokens_since_fired.device
        self.window = int(state["window"])
        self.tokens_since_fired = state["tokens_since_fired"].to(device)
        self.fire_counts = state["fire_counts"].to(device)
        self.tokens_seen = int(state["tokens_seen"])


def log10_density_histogram(
    density: Tensor, bins: int = 40, low: float = -8.0, high: float = 0.0
) -> dict[str, object]:
    """Histogram of log10(density) for latents that fired, on `bins` equal bins over [low, high].

    density: [n] in [0, 1]. Latents below 10**low are clamped into the first bin; latents that never fired
    (density 0) are reported separately as `never_fired`. Returns {"edges": [bins + 1], "counts": [bins],
    "never_fired": int}.
    """
    if not low < high:
        raise ValueError(f"histogram range needs low < high, got low={low}, high={high}.")
    fired = density[density > 0].double().cpu()
    logs = fired.log10().clamp(low, high)
    counts = torch.histc(logs, bins=bins, min=low, max=high) if logs.numel() else torch.zeros(bins)
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    return {
        "edges": edges.tolist(),
        "counts": [int(c) for c in counts.tolist()],
        "never_fired": int((density <= 0).sum()),
    }


def dead_latent_report(tracker: DeadLatentTracker, dense_threshold: float = 0.1) -> dict[str, object]:
    """Summary of a tracker: dead fraction over its window (or over every token seen, when fewer: see
    `DeadLatentTracker.reported_dead`), never-fired fraction, density quantiles and histogram.

    dense_threshold: latents firing on more than this fraction of tokens are counted as `dense_frac`.
    """
    density = tracker.density()
    alive = density[density > 0]
    quantiles = (
        {f"log10_density_q{int(q * 100)}": math.log10(alive.quantile(q).item()) for q in (0.1, 0.5, 0.9)}
        if alive.numel()
        else {}
    )
    dead, window = tracker.reported_dead()
    return {
        "tokens": tracker.tokens_seen,
        "window_tokens": window,
        "dead_frac": dead,
        "never_fired_frac": (density == 0).double().mean().item(),
        "dense_frac": (density > dense_threshold).double().mean().item(),
        **quantiles,
        "density_histogram": log10_density_histogram(density),
    }

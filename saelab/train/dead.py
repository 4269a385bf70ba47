"""Streaming dead-latent statistics, counted in tokens."""

from __future__ import annotations

import torch
from torch import Tensor


class DeadLatentTracker:
    """Per latent: tokens since it last fired and total fire counts. Dead = silent for >= `window` tokens.

    A latent that never fired counts tokens from the start of tracking, so it becomes dead after one window.
    """

    def __init__(self, d_sae: int, window: int, device: torch.device | str = "cpu"):
        self.window = window
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.tokens_seen = 0

    def update(self, fired: Tensor, n_tokens: int, counts: Tensor | None = None) -> None:
        """fired: [n] bool for this batch of n_tokens rows; counts: optional [n] fire counts in the batch."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired, 0)
        self.fire_counts += counts if counts is not None else fired.long()
        self.tokens_seen += n_tokens

    @property
    def dead_mask(self) -> Tensor:
        """[n] bool."""
        return self.tokens_since_fired >= self.window

    def dead_fraction(self) -> float:
        return self.dead_mask.float().mean().item()

    def state_dict(self) -> dict[str, object]:
        return {
            "window": self.window,
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "fire_counts": self.fire_counts.cpu(),
            "tokens_seen": self.tokens_seen,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        device = self.tokens_since_fired.device
        self.window = int(state["window"])
        self.tokens_since_fired = state["tokens_since_fired"].to(device)
        self.fire_counts = state["fire_counts"].to(device)
        self.tokens_seen = int(state["tokens_seen"])

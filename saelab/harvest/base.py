"""What every harvester is: token batches [B, T] in, per-token activations {hook: [B, T, d]} out."""

from __future__ import annotations

from typing import Protocol

import einops
import torch
from torch import Tensor


class Harvester(Protocol):
    """Runs a model on token ids and returns the activations at `hook_names` (several hooks in one pass)."""

    hook_names: list[str]
    device: torch.device

    def __call__(self, tokens: Tensor) -> dict[str, Tensor]:
        """tokens [B, T] int64 -> {hook_name: activations [B, T, d]} (trailing dims flattened into d)."""
        ...


def per_token(name: str, act: Tensor, tokens: Tensor) -> Tensor:
    """Flatten trailing dims of a [B, T, ...] activation to [B, T, d]; other layouts are an error."""
    if act.ndim < 2 or act.shape[:2] != tokens.shape:
        raise ValueError(
            f"hook {name!r} gives activations of shape {tuple(act.shape)}, not [batch, pos, ...] for tokens "
            f"{tuple(tokens.shape)}; only per-token activations (resid, mlp_out, attn z, ...) can be harvested."
        )
    if act.ndim == 2:
        return act.unsqueeze(-1)
    return einops.rearrange(act, "b t ... -> b t (...)")


def hook_widths(harvester: Harvester) -> dict[str, int]:
    """Activation width d of each hook, found by running the model on one short dummy sequence."""
    tokens = torch.zeros(1, 2, dtype=torch.long, device=harvester.device)
    return {name: act.shape[-1] for name, act in harvester(tokens).items()}

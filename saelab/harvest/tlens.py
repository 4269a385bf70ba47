"""Harvest from a TransformerLens HookedTransformer:
`run_with_cache(names_filter=hooks, stop_at_layer=L + 1)`, so blocks past the last hook are not run."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from saelab.harvest.base import per_token
from saelab.harvest.names import check_hook_names

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_EMBED = re.compile(r"^(hook_embed|hook_pos_embed|embed\.|pos_embed\.)")


def stop_layer(hook_names: list[str], n_layers: int) -> int | None:
    """The `stop_at_layer` that still runs every hook: 1 + the deepest block index; None for post-block hooks."""
    deepest = -1
    for name in hook_names:
        match = _BLOCK.match(name)
        if match:
            deepest = max(deepest, int(match.group(1)))
        elif not _EMBED.match(name):
            return None  # ln_final / unembed hooks need the whole model
    stop = deepest + 1
    return stop if stop < n_layers else None


class TransformerLensHarvester:
    """Activations at TransformerLens hook names, e.g. "blocks.6.hook_resid_post", several in one pass."""

    def __init__(self, model: Any, hook_names: list[str]):
        self.model = model
        self.hook_names = check_hook_names(hook_names, set(model.hook_dict), "TransformerLens hook point")
        self.stop_at_layer = stop_layer(self.hook_names, model.cfg.n_layers)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, tokens: Tensor) -> dict[str, Tensor]:
        """tokens [B, T] -> {hook: [B, T, d]} on the model's device."""
        tokens = tokens.to(self.device)
        _, cache = self.model.run_with_cache(
            tokens, names_filter=self.hook_names, stop_at_layer=self.stop_at_layer
        )
        return {name: per_token(name, cache[name], tokens) for name in self.hook_names}

"""The cheap evaluation the trainer runs every `trainer.eval_every` steps on its held-out batches."""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.metrics.codes import encode_codes, fire_counts, output_of
from saelab.metrics.reconstruction import ReconstructionStats
from saelab.sae.base import SAE


@torch.no_grad()
def heldout_metrics(sae: SAE, batches: list[Tensor], input_scale: float = 1.0) -> dict[str, float]:
    """FVU, explained variance, cosine, L0 and dead fraction (latents silent on every held-out row).

    batches: raw activations [B, d_in] each (a transcoder's [x | y] rows, scored on y); they are multiplied by
    `input_scale` (the trainer's normalisation) before encoding. The SAE's train/eval mode is restored afterwards.
    """
    if not batches:
        raise ValueError("held-out evaluation needs at least one batch.")
    was_training = sae.training
    sae.eval()
    try:
        stats = ReconstructionStats()
        counts = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.W_dec.device)
        for x in batches:
            x, target = sae.split_row(x.to(sae.W_dec.device, dtype=sae.W_dec.dtype) * input_scale)
            codes = encode_codes(sae, x)
            stats.update(target, output_of(sae, x, codes), codes)
            counts += fire_counts(codes, sae.d_sae)
    finally:
        sae.train(was_training)
    m = stats.compute()
    return {
        "heldout/fvu": m["fvu"],
        "heldout/explained_variance": m["explained_variance"],
        "heldout/cosine": m["cosine"],
        "heldout/l0": m["l0"],
        "heldout/dead_frac": (counts == 0).double().mean().item(),
    }

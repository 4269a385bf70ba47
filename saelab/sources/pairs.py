"""Planted (input, target) pairs for transcoders: the same sparse codes a drive both activations.

    x = a @ F + noise,        y = a @ G (+ x @ L^T)

F [n_features, d_in] are the synthetic source's planted features (unit rows, `input_features`), G
[n_features, d_out] an independent set of unit rows in the target space (`features`: what a transcoder's
decoder rows should recover), and L [d_out, d_in] an optional planted linear part (a random Gaussian matrix
scaled so ||x @ L^T|| is about `linear_scale` * ||x||), the part a skip transcoder's W_skip can take. The codes
a follow `SyntheticConfig` (structure, frequencies, magnitudes). Each batch is one tensor of rows [x | y]
[B, d_in + d_out], a pure function of (seed, batch index); F, G and L come from their own streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.core.checks import check_number
from saelab.core.seeds import generator
from saelab.sources.registry import register_source
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource


@dataclass
class PairsConfig(SyntheticConfig):
    """Planted pairs: SyntheticConfig's codes and input features, plus d_out (width of y) and linear_scale (size
    of the planted linear part L relative to x; 0: none)."""

    kind: str = "pairs"
    d_out: int = 64
    linear_scale: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_number("source.d_out", self.d_out, low=1, integer=True)
        check_number("source.linear_scale", self.linear_scale, low=0)


class PairsSource(SyntheticSource):
    """Rows [x | y] of planted pairs. `input_features` F [n, d_in], `features` G [n, d_out], `linear` L
    [d_out, d_in] (None when linear_scale is 0) are the ground truth."""

    def __init__(self, cfg: PairsConfig):
        super().__init__(cfg)
        self.cfg: PairsConfig = cfg
        self.d_out = cfg.d_out
        self.input_features = self.features
        targets = torch.randn(
            cfg.n_features, cfg.d_out, generator=generator(cfg.seed, "pairs.target_features")
        )
        self.features = targets / targets.norm(dim=1, keepdim=True)
        self.linear: Tensor | None = None
        if cfg.linear_scale > 0:
            gen = generator(cfg.seed, "pairs.linear")
            self.linear = torch.randn(cfg.d_out, cfg.d_in, generator=gen) * (
                cfg.linear_scale / math.sqrt(cfg.d_in)
            )

    def metadata(self) -> dict[str, object]:
        return {
            **super().metadata(),
            "source": "pairs",
            "d_out": self.cfg.d_out,
            "linear_scale": self.cfg.linear_scale,
        }

    def pair(self, index: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """Batch number `index` as (x [B, d_in], y [B, d_out])."""
        gen = generator(self.cfg.seed, "synthetic.batch", index)
        codes = self.sample_codes(batch_size, gen)
        x = codes @ self.input_features
        if self.cfg.noise_std > 0:
            x += self.cfg.noise_std * torch.randn(batch_size, self.d_in, generator=gen)
        y = codes @ self.features
        if self.linear is not None:
            y += x @ self.linear.T
        return x, y

    def batch(self, index: int, batch_size: int) -> Tensor:
        """Batch number `index`: rows [x | y] [batch_size, d_in + d_out]."""
        return torch.cat(self.pair(index, batch_size), dim=1)


@register_source("pairs", PairsConfig)
def _pairs(cfg: PairsConfig, device: torch.device) -> PairsSource:
    return PairsSource(cfg)

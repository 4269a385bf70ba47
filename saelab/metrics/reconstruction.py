"""Reconstruction quality, accumulated over a stream of batches in float64.

For rows x, x_hat [B, d] over all N streamed rows:
    mse = sum ||x - x_hat||^2 / (N d)
    fvu = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2        explained_variance = 1 - fvu
    cosine = mean cos(x, x_hat);  shrinkage = mean ||x_hat|| / ||x||
    relative_reconstruction_bias = E||x_hat||^2 / E<x, x_hat>  (1 = unbiased, < 1 = shrunk)
    l0 / l1 = mean number / absolute sum of nonzero codes per row
The total variance is merged across batches with Chan et al.'s pairwise update, so a large mean does not
cancel the variance the way sum ||x||^2 - N ||mean||^2 would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.metrics.codes import Codes, l0_per_row, l1_per_row

_EPS = 1e-12


class ReconstructionStats:
    """Streaming accumulator; `update(x, x_hat, codes)` per batch, `compute()` -> dict of floats."""

    def __init__(self) -> None:
        self.rows = 0
        self.code_rows = 0
        self.sums: dict[str, Tensor] = {}
        self.mean: Tensor | None = None  # [d] float64, running mean of x
        self.m2: Tensor | None = None  # scalar float64, running sum ||x - mean||^2

    def _add(self, name: str, value: Tensor) -> None:
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, codes: Codes | None = None) -> None:
        """x, x_hat: [B, d]; codes: the SAE codes of x (dense or sparse), for L0 / L1."""
        if x.shape != x_hat.shape or x.ndim != 2:
            raise ValueError(
                f"x and x_hat must both be [batch, d]; got {tuple(x.shape)} and {tuple(x_hat.shape)}."
            )
        if x.shape[0] == 0:
            return
        x64, xh64 = x.double(), x_hat.double()
        b = x.shape[0]
        batch_mean = x64.mean(dim=0)
        batch_m2 = (x64 - batch_mean).pow(2).sum()
        if self.mean is None:
            self.mean, self.m2 = batch_mean, batch_m2
        else:
            total = self.rows + b
            delta = batch_mean - self.mean
            self.m2 = self.m2 + batch_m2 + delta.pow(2).sum() * (self.rows * b / total)
            self.mean = self.mean + delta * (b / total)
        self.rows += b
        x_norm, xh_norm = x64.norm(dim=1), xh64.norm(dim=1)
        dot = (x64 * xh64).sum(dim=1)
        self._add("sse", (x64 - xh64).pow(2).sum())
        self._add("cosine", (dot / (x_norm * xh_norm).clamp_min(_EPS)).sum())
        self._add("shrinkage", (xh_norm / x_norm.clamp_min(_EPS)).sum())
        self._add("xhat_sq", xh_norm.pow(2).sum())
        self._add("dot", dot.sum())
        if codes is not None:
            self.code_rows += b
            self._add("l0", l0_per_row(codes).sum())
            self._add("l1", l1_per_row(codes).sum())

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen so far (raises if nothing was seen)."""
        if self.rows == 0 or self.mean is None or self.m2 is None:
            raise ValueError("no rows were accumulated; call update() with at least one non-empty batch.")
        s = {k: v.item() for k, v in self.sums.items()}
        n, d = self.rows, self.mean.shape[0]
        fvu = s["sse"] / max(self.m2.item(), _EPS)
        out = {
            "mse": s["sse"] / (n * d),
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "cosine": s["cosine"] / n,
            "shrinkage": s["shrinkage"] / n,
            "relative_reconstruction_bias": s["xhat_sq"] / s["dot"] if s["dot"] != 0 else float("nan"),
        }
        if self.code_rows:
            out["l0"] = s["l0"] / self.code_rows
            out["l1"] = s["l1"] / self.code_rows
        return out


def reconstruction_metrics(x: Tensor, x_hat: Tensor, codes: Codes | None = None) -> dict[str, float]:
    """All metrics for a single batch x, x_hat [B, d] (see the module docstring)."""
    stats = ReconstructionStats()
    stats.update(x, x_hat, codes)
    return stats.compute()

"""Planted-feature activations: known unit-norm directions mixed by sparse nonnegative codes, plus noise.

x = c @ F + noise, with F [n_features, d_in] unit rows and c [B, n_features] sparse (feature i active with
probability p_i, p_i following a power law summing to `mean_active`; magnitudes uniform in
[min_magnitude, max_magnitude]). Batches are a pure function of (seed, batch index), so a resumed run
sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SyntheticConfig:
    """Planted-feature data set. frequency_decay: p_i proportional to (i + 1) ** -frequency_decay."""

    kind: str = "synthetic"
    d_in: int = 64
    n_features: int = 512
    mean_active: float = 5.0
    frequency_decay: float = 0.5
    min_magnitude: float = 0.5
    max_magnitude: float = 1.5
    noise_std: float = 0.01
    seed: int = 0

    def validate(self) -> None:
        for name in ("d_in", "n_features"):
            if getattr(self, name) <= 0:
                raise ValueError(f"source.{name}={getattr(self, name)} must be a positive integer.")
        if not 0 < self.mean_active <= self.n_features:
            raise ValueError(
                f"source.mean_active={self.mean_active} must be in (0, n_features={self.n_features}]."
            )
        if not 0 <= self.min_magnitude <= self.max_magnitude:
            raise ValueError("source.min_magnitude must be >= 0 and <= source.max_magnitude.")
        if self.noise_std < 0:
            raise ValueError(f"source.noise_std={self.noise_std} must be >= 0.")


def power_law_frequencies(n: int, mean_active: float, decay: float) -> Tensor:
    """Per-feature firing probabilities [n], proportional to (i+1)^-decay, summing to mean_active, capped at 1."""
    raw = torch.arange(1, n + 1, dtype=torch.float64).pow(-decay)
    probs = raw * (mean_active / raw.sum())
    for _ in range(50):  # redistribute mass clipped at 1 so the sum stays mean_active
        clipped = probs.clamp(max=1.0)
        deficit = mean_active - clipped.sum()
        free = clipped < 1.0
        if deficit <= 1e-9 or not free.any():
            break
        probs = torch.where(free, clipped * (1 + deficit / clipped[free].sum()), clipped)
    return probs.clamp(max=1.0).float()


class SyntheticSource:
    """Activation source of planted features. `features` [n_features, d_in] are the ground truth."""

    def __init__(self, cfg: SyntheticConfig):
        cfg.validate()
        self.cfg = cfg
        self.d_in = cfg.d_in
        gen = torch.Generator().manual_seed(cfg.seed)
        dirs = torch.randn(cfg.n_features, cfg.d_in, generator=gen)
        self.features = dirs / dirs.norm(dim=1, keepdim=True)
        self.frequencies = power_law_frequencies(cfg.n_features, cfg.mean_active, cfg.frequency_decay)

    def metadata(self) -> dict[str, object]:
        return {"source": "synthetic", "n_features": self.cfg.n_features, "seed": self.cfg.seed}

    def sample_codes(self, batch_size: int, gen: torch.Generator) -> Tensor:
        """Sparse nonnegative codes [batch_size, n_features]."""
        cfg = self.cfg
        active = torch.rand(batch_size, cfg.n_features, generator=gen) < self.frequencies
        mags = cfg.min_magnitude + (cfg.max_magnitude - cfg.min_magnitude) * torch.rand(
            batch_size, cfg.n_features, generator=gen
        )
        return active * mags

    def batch(self, index: int, batch_size: int) -> Tensor:
        """Batch number `index`: x [batch_size, d_in], deterministic in (seed, index, batch_size)."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + index + 1)
        codes = self.sample_codes(batch_size, gen)
        x = codes @ self.features
        if self.cfg.noise_std > 0:
            x += self.cfg.noise_std * torch.randn(batch_size, self.d_in, generator=gen)
        return x

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[Tensor]:
        """Endless stream of batches starting at batch number `start_batch`."""
        index = start_batch
        while True:
            yield self.batch(index, batch_size)
            index += 1


def max_cosine_to(reference: Tensor, candidates: Tensor, chunk: int = 4096) -> Tensor:
    """For each reference row [R, d], its max cosine with any candidate row [C, d]; returns [R] (chunked)."""
    ref = torch.nn.functional.normalize(reference.detach().double(), dim=1)
    cand = torch.nn.functional.normalize(candidates.detach().double(), dim=1)
    best = torch.full((ref.shape[0],), -1.0, dtype=torch.float64)
    for start in range(0, cand.shape[0], chunk):
        sims = ref @ cand[start : start + chunk].T
        best = torch.maximum(best, sims.max(dim=1).values)
    return best


def recovery_metrics(true_features: Tensor, learned: Tensor, threshold: float = 0.9) -> dict[str, float]:
    """MMCS (mean over true features of the max cosine to a learned row) and the fraction >= threshold."""
    best = max_cosine_to(true_features, learned)
    return {"mmcs": best.mean().item(), "frac_recovered": (best >= threshold).double().mean().item()}

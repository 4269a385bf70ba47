"""Planted-feature activations: known unit-norm directions mixed by sparse nonnegative codes, plus noise.

x = c @ F + noise, with F [n_features, d_in] random unit rows and c [B, n_features] sparse and nonnegative.
Active magnitudes are uniform in [min_magnitude, max_magnitude], or (magnitudes="exponential") exponential
with the same mean, a heavy tail that gives every feature some strong, clean occurrences.
`structure` picks which features are active on a row:

- uniform: feature i independently with probability p_i, a power law summing to `mean_active`.
- mixed_sparsity: each row draws a count s uniformly from `sparsity_levels` and activates exactly s features
  chosen uniformly (the GBA paper's toy: 128 features in d_in=42, half the rows 3-sparse, half 20-sparse;
  see `gba_toy_config`).
- hierarchical: features are n_parents parents followed by n_children children per parent. Parents fire like
  uniform features (mean_active parents per row); an active parent switches on exactly one of its children,
  chosen uniformly, with probability child_prob. Children of a parent are mutually exclusive and never fire
  without it.

Batches are a pure function of (seed, batch index), so a resumed run sees exactly the batches the
uninterrupted run would have. Features and batches come from separate streams derived from `seed`
(`saelab.core.seeds`), unrelated to the SAE initialisation's stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor

from saelab.core.checks import check_number
from saelab.core.seeds import generator

STRUCTURES = ("uniform", "mixed_sparsity", "hierarchical")
MAGNITUDES = ("uniform", "exponential")


@dataclass
class SyntheticConfig:
    """Planted-feature data set (see the module docstring for `structure`).

    kind: the source kind (`source=synthetic`). d_in: width of each row. n_features: planted unit-norm feature
    directions. mean_active: expected active features per row ("uniform" structure). min_magnitude /
    max_magnitude: range of an active feature's coefficient. noise_std: Gaussian noise added to every value.
    seed: the data's seed (features and batches, each from its own derived stream). structure: "uniform",
    "mixed_sparsity" or "hierarchical".

    frequency_decay: p_i proportional to (i + 1) ** -frequency_decay (uniform features, hierarchical parents).
    magnitudes: "uniform" in [min_magnitude, max_magnitude] or "exponential" with mean (min + max) / 2.
    sparsity_levels: active-feature counts a mixed_sparsity row draws from. n_children / child_prob: the
    hierarchical layout (n_features must be a multiple of 1 + n_children).
    """

    kind: str = "synthetic"
    d_in: int = 64
    n_features: int = 512
    mean_active: float = 5.0
    frequency_decay: float = 0.5
    min_magnitude: float = 0.5
    max_magnitude: float = 1.5
    magnitudes: str = "uniform"
    noise_std: float = 0.01
    seed: int = 0
    structure: str = "uniform"
    sparsity_levels: list[int] = field(default_factory=lambda: [3, 20])
    n_children: int = 4
    child_prob: float = 0.75

    @property
    def n_parents(self) -> int:
        """Number of parent features of the hierarchical structure."""
        return self.n_features // (1 + self.n_children)

    def validate(self) -> None:
        """Raise ValueError naming the offending source field."""
        for name in ("d_in", "n_features"):
            check_number(f"source.{name}", getattr(self, name), low=1, integer=True)
        check_number("source.seed", self.seed, integer=True)
        for name in (
            "mean_active",
            "frequency_decay",
            "min_magnitude",
            "max_magnitude",
            "noise_std",
            "child_prob",
        ):
            check_number(f"source.{name}", getattr(self, name), low=0)
        if self.magnitudes not in MAGNITUDES:
            raise ValueError(f"source.magnitudes={self.magnitudes!r} must be one of {list(MAGNITUDES)}.")
        if self.structure not in STRUCTURES:
            raise ValueError(f"source.structure={self.structure!r} must be one of {list(STRUCTURES)}.")
        if self.structure == "mixed_sparsity":
            if not self.sparsity_levels:
                raise ValueError("source.sparsity_levels must be a non-empty list of active-feature counts.")
            for level in self.sparsity_levels:
                check_number("source.sparsity_levels[]", level, low=1, high=self.n_features, integer=True)
        elif self.structure == "hierarchical":
            check_number("source.n_children", self.n_children, low=1, integer=True)
            if self.n_features % (1 + self.n_children):
                raise ValueError(
                    f"source.n_features={self.n_features} must be a multiple of 1 + source.n_children "
                    f"(n_children={self.n_children}): each parent brings its children."
                )
            check_number("source.child_prob", self.child_prob, low=0, high=1)
        n_independent = self.n_parents if self.structure == "hierarchical" else self.n_features
        if self.structure != "mixed_sparsity":
            check_number(
                "source.mean_active",
                self.mean_active,
                low=0,
                high=n_independent,
                low_open=True,
                hint="It cannot exceed the number of independently firing features.",
            )
        if self.min_magnitude > self.max_magnitude:
            raise ValueError(
                f"source.min_magnitude={self.min_magnitude} must be <= source.max_magnitude={self.max_magnitude}."
            )


def gba_toy_config(seed: int = 0, noise_std: float = 0.01) -> SyntheticConfig:
    """Data set (b) of the recovery benchmark: the GBA paper's toy, with exponential magnitudes."""
    return SyntheticConfig(
        d_in=42,
        n_features=128,
        structure="mixed_sparsity",
        sparsity_levels=[3, 20],
        magnitudes="exponential",
        noise_std=noise_std,
        seed=seed,
    )


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
        dirs = torch.randn(cfg.n_features, cfg.d_in, generator=generator(cfg.seed, "synthetic.features"))
        self.features = dirs / dirs.norm(dim=1, keepdim=True)
        if cfg.structure == "hierarchical":
            parents = power_law_frequencies(cfg.n_parents, cfg.mean_active, cfg.frequency_decay)
            children = (parents * cfg.child_prob / cfg.n_children).repeat_interleave(cfg.n_children)
            self.frequencies = torch.cat([parents, children])
        elif cfg.structure == "mixed_sparsity":
            mean_count = sum(cfg.sparsity_levels) / len(cfg.sparsity_levels)
            self.frequencies = torch.full((cfg.n_features,), mean_count / cfg.n_features)
        else:
            self.frequencies = power_law_frequencies(cfg.n_features, cfg.mean_active, cfg.frequency_decay)

    def metadata(self) -> dict[str, object]:
        """What an SAE trained on this source records about it (kind, structure, feature count, seed, ...)."""
        return {
            "source": "synthetic",
            "structure": self.cfg.structure,
            "n_features": self.cfg.n_features,
            "seed": self.cfg.seed,
        }

    def sample_codes(self, batch_size: int, gen: torch.Generator) -> Tensor:
        """Sparse nonnegative codes [batch_size, n_features]; `frequencies` holds each feature's firing rate."""
        cfg = self.cfg
        if cfg.structure == "mixed_sparsity":
            active = self._mixed_sparsity_mask(batch_size, gen)
        elif cfg.structure == "hierarchical":
            active = self._hierarchical_mask(batch_size, gen)
        else:
            active = torch.rand(batch_size, cfg.n_features, generator=gen) < self.frequencies
        uniform = torch.rand(batch_size, cfg.n_features, generator=gen)
        if cfg.magnitudes == "exponential":
            mags = -0.5 * (cfg.min_magnitude + cfg.max_magnitude) * torch.log1p(-uniform)
        else:
            mags = cfg.min_magnitude + (cfg.max_magnitude - cfg.min_magnitude) * uniform
        return active * mags

    def _mixed_sparsity_mask(self, batch_size: int, gen: torch.Generator) -> Tensor:
        """[B, n] bool: each row exactly s active features, s drawn uniformly from sparsity_levels."""
        levels = torch.tensor(self.cfg.sparsity_levels)
        counts = levels[torch.randint(len(levels), (batch_size,), generator=gen)]
        ranks = torch.rand(batch_size, self.cfg.n_features, generator=gen).argsort(dim=1).argsort(dim=1)
        return ranks < counts[:, None]

    def _hierarchical_mask(self, batch_size: int, gen: torch.Generator) -> Tensor:
        """[B, n] bool: parents [B, P] independent, then at most one child [B, P * C] per active parent."""
        cfg = self.cfg
        n_parents, n_children = cfg.n_parents, cfg.n_children
        parents = torch.rand(batch_size, n_parents, generator=gen) < self.frequencies[:n_parents]
        with_child = parents & (torch.rand(batch_size, n_parents, generator=gen) < cfg.child_prob)
        which = torch.randint(n_children, (batch_size, n_parents), generator=gen)
        children = (which[..., None] == torch.arange(n_children)) & with_child[..., None]
        return torch.cat([parents, rearrange(children, "b p c -> b (p c)")], dim=1)

    def batch(self, index: int, batch_size: int) -> Tensor:
        """Batch number `index`: x [batch_size, d_in], deterministic in (seed, index, batch_size)."""
        gen = generator(self.cfg.seed, "synthetic.batch", index)
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

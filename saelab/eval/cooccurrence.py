"""Latent co-occurrence (phi coefficient) and whether latents that fire together also point the same way.

A fixed subset of m latents is tracked (an m x m count matrix, not n x n). After streaming:
phi_ij = (N n_ij - n_i n_j) / sqrt(n_i (N - n_i) n_j (N - n_j)), the Pearson correlation of the binary
firing indicators over N tokens. Spectral clustering of max(phi, 0) is compared with spherical k-means of
the same latents' decoder directions by adjusted mutual information, next to the AMI of shuffled
decoder labels (the chance baseline, about 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.core.seeds import derive_seed, generator
from saelab.eval.clustering import adjusted_mutual_information, spectral_clustering, spherical_kmeans
from saelab.metrics.codes import Codes


class CooccurrenceStats:
    """Streaming co-firing counts among `latents` [m] (indices into the SAE's n latents)."""

    def __init__(self, latents: Tensor, d_sae: int):
        if latents.ndim != 1 or latents.numel() < 2:
            raise ValueError("co-occurrence needs a 1-D tensor of at least 2 latent indices.")
        self.latents = latents.long()
        self.slot = torch.full((d_sae,), -1, dtype=torch.long, device=latents.device)
        self.slot[self.latents] = torch.arange(latents.numel(), device=latents.device)
        m = latents.numel()
        self.pair_counts = torch.zeros(m, m, dtype=torch.float64, device=latents.device)
        self.counts = torch.zeros(m, dtype=torch.float64, device=latents.device)
        self.tokens = 0

    @classmethod
    def random_subset(cls, d_sae: int, size: int, seed: int = 0, device: torch.device | str = "cpu"):
        """Track min(size, d_sae) latents drawn uniformly without replacement."""
        gen = generator(seed, "eval.cooccurrence_latents")
        chosen = torch.randperm(d_sae, generator=gen)[: min(size, d_sae)].sort().values
        return cls(chosen.to(device), d_sae)

    @torch.no_grad()
    def update(self, codes: Codes) -> None:
        """Add a batch of codes (dense [B, n] or sparse (values, indices) [B, k])."""
        if isinstance(codes, tuple):
            values, indices = codes
            slots = self.slot[indices]
            keep = (slots >= 0) & (values != 0)
            active = torch.zeros(values.shape[0], self.latents.numel() + 1, device=values.device)
            active.scatter_(1, torch.where(keep, slots, self.latents.numel()), 1.0)  # extra column = sink
            active = active[:, :-1]
        else:
            active = (codes[:, self.latents] != 0).float()
        self.pair_counts += (active.T @ active).double()
        self.counts += active.sum(dim=0).double()
        self.tokens += active.shape[0]

    def phi(self) -> Tensor:
        """Phi coefficients [m, m] (0 where a latent never or always fired)."""
        n, c = float(self.tokens), self.counts
        spread = c * (n - c)
        denom = (spread[:, None] * spread[None, :]).sqrt()
        num = n * self.pair_counts - c[:, None] * c[None, :]
        return torch.where(denom > 0, num / denom.clamp_min(1e-300), torch.zeros_like(num))


def cooccurrence_vs_geometry(
    stats: CooccurrenceStats,
    W_dec: Tensor,
    n_clusters: int = 32,
    min_fires: int = 5,
    n_shuffles: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """AMI between spectral clusters of max(phi, 0) and spherical k-means clusters of decoder rows.

    Only tracked latents that fired at least `min_fires` times take part; k = min(n_clusters, kept // 2).
    """
    keep = stats.counts >= min_fires
    kept = int(keep.sum())
    k = min(n_clusters, kept // 2)
    if k < 2:
        return {"n_latents": kept, "n_clusters": 0}
    affinity = stats.phi()[keep][:, keep].clamp_min(0.0).cpu()
    affinity.fill_diagonal_(0.0)
    cooc_labels = spectral_clustering(affinity, k, seed=derive_seed(seed, "eval.cooccurrence_clusters"))
    directions = W_dec.detach()[stats.latents[keep]].cpu()
    dec_labels = spherical_kmeans(directions, k, seed=derive_seed(seed, "eval.decoder_clusters"))
    gen = generator(seed, "eval.shuffles")
    shuffled = torch.tensor(
        [
            adjusted_mutual_information(cooc_labels, dec_labels[torch.randperm(kept, generator=gen)])
            for _ in range(n_shuffles)
        ],
        dtype=torch.float64,
    )
    off_diag = affinity.sum() / max(kept * (kept - 1), 1)
    return {
        "n_latents": kept,
        "n_clusters": k,
        "ami": adjusted_mutual_information(cooc_labels, dec_labels),
        "ami_shuffled_mean": shuffled.mean().item(),
        "ami_shuffled_std": shuffled.std().item() if n_shuffles > 1 else 0.0,
        "mean_positive_phi": off_diag.item(),
    }

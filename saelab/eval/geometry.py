"""Decoder geometry: nearest-neighbour cosines between latents (chunked) and the spectrum of cov(W_dec).

Decoder rows W_dec [n, d] are the latents' directions. Pairwise cosines are computed `chunk` rows at a time
([chunk, n] in memory, never [n, n]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class DecoderCosines:
    """max_cos [n]: each latent's largest cosine to another latent; nearest [n]: that latent's index.

    pairs [P, 2] (i < j) and pair_cos [P]: every pair with cosine >= the threshold, sorted by cosine, descending.
    """

    max_cos: Tensor
    nearest: Tensor
    pairs: Tensor
    pair_cos: Tensor


@torch.no_grad()
def decoder_cosines(
    W_dec: Tensor, threshold: float = 0.9, chunk: int = 4096, dtype: torch.dtype = torch.float32
) -> DecoderCosines:
    """Nearest-neighbour cosine per latent and all duplicate pairs above `threshold`, in [chunk, n] blocks."""
    n = W_dec.shape[0]
    if n < 2:
        raise ValueError(f"decoder cosines need at least 2 latents, got d_sae={n}.")
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}.")
    w = F.normalize(W_dec.detach().to(dtype), dim=1)
    max_cos, nearest, pairs, pair_cos = [], [], [], []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=w.device)
        sims = w[rows] @ w.T  # [c, n]
        sims[torch.arange(rows.numel(), device=w.device), rows] = -torch.inf  # exclude self
        best = sims.max(dim=1)
        max_cos.append(best.values)
        nearest.append(best.indices)
        upper = sims >= threshold
        upper &= torch.arange(n, device=w.device)[None, :] > rows[:, None]  # each pair once, i < j
        hit = upper.nonzero()
        pairs.append(torch.stack([rows[hit[:, 0]], hit[:, 1]], dim=1))
        pair_cos.append(sims[hit[:, 0], hit[:, 1]])
    all_pairs, all_cos = torch.cat(pairs), torch.cat(pair_cos)
    order = all_cos.argsort(descending=True)
    return DecoderCosines(torch.cat(max_cos), torch.cat(nearest), all_pairs[order], all_cos[order])


@torch.no_grad()
def decoder_spectrum(W_dec: Tensor) -> Tensor:
    """Eigenvalues of the covariance of the decoder rows (d x d, float64), sorted descending: [d]."""
    w = W_dec.detach().double()
    centred = w - w.mean(dim=0)
    cov = centred.T @ centred / max(w.shape[0] - 1, 1)
    return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0.0)


def power_law_slope(eigenvalues: Tensor, first_rank: int = 10, last_rank: int = 150) -> float:
    """Least-squares slope of log lambda_r against log r over ranks [first_rank, last_rank] (1-based).

    eigenvalues: [d] sorted descending. The range is clipped to the available positive eigenvalues;
    returns NaN when fewer than 3 ranks remain (e.g. d < first_rank + 2).
    """
    if not 1 <= first_rank < last_rank:
        raise ValueError(f"need 1 <= first_rank < last_rank, got {first_rank}, {last_rank}.")
    ranks = torch.arange(1, eigenvalues.numel() + 1, dtype=torch.float64)
    keep = (ranks >= first_rank) & (ranks <= last_rank) & (eigenvalues.double().cpu() > 0)
    if int(keep.sum()) < 3:
        return math.nan
    log_r = ranks[keep].log()
    log_l = eigenvalues.double().cpu()[keep].log()
    log_r_c = log_r - log_r.mean()
    return ((log_r_c * (log_l - log_l.mean())).sum() / log_r_c.pow(2).sum()).item()

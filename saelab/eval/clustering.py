"""Clustering tools in plain torch: k-means (k-means++ seeding), spectral clustering, adjusted mutual information.

- k-means: Lloyd iterations from k-means++ seeds, best of `n_init` restarts by inertia.
- Spectral clustering (Ng, Jordan & Weiss 2001): top-k eigenvectors of D^-1/2 A D^-1/2, rows normalised
  to unit length, then k-means.
- AMI (Vinh, Epps & Bailey 2010): (MI - E[MI]) / (mean(H_a, H_b) - E[MI]), E[MI] under the
  permutation (hypergeometric) model, natural logarithms, arithmetic-mean normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def kmeans(x: Tensor, k: int, n_init: int = 4, iters: int = 100, seed: int = 0) -> Tensor:
    """Cluster rows of x [m, p] into k groups; returns labels [m] long."""
    m = x.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"k-means needs 1 <= k <= number of points ({m}), got k={k}.")
    x = x.double()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best_labels, best_inertia = None, float("inf")
    for _ in range(n_init):
        centres = _kmeans_pp(x, k, gen)
        for _ in range(iters):
            labels = _sq_dist(x, centres).argmin(dim=1)
            onehot = F.one_hot(labels, k).to(x.dtype)  # [m, k]
            sums, counts = onehot.T @ x, onehot.sum(dim=0)
            empty = counts == 0
            new = sums / counts.clamp_min(1)[:, None]
            new[empty] = centres[empty]  # keep an emptied centre where it was
            if torch.allclose(new, centres):
                break
            centres = new
        labels = _sq_dist(x, centres).argmin(dim=1)
        inertia = (x - centres[labels]).pow(2).sum().item()
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def _sq_dist(x: Tensor, centres: Tensor) -> Tensor:
    """Squared Euclidean distances [m, k] between rows of x [m, p] and centres [k, p]."""
    return x.pow(2).sum(dim=1, keepdim=True) - 2 * x @ centres.T + centres.pow(2).sum(dim=1)[None, :]


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to squared distance."""
    m = x.shape[0]
    idx = [int(torch.randint(m, (1,), generator=gen))]
    dist = (x - x[idx[0]]).pow(2).sum(dim=1)
    for _ in range(1, k):
        probs = dist.cpu() if dist.sum() > 0 else torch.ones(m, dtype=torch.float64)
        nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
        idx.append(nxt)
        dist = torch.minimum(dist, (x - x[nxt]).pow(2).sum(dim=1))
    return x[idx].clone()


def spectral_clustering(affinity: Tensor, k: int, seed: int = 0) -> Tensor:
    """Cluster the nodes of a symmetric nonnegative affinity [m, m]; returns labels [m] long."""
    a = affinity.double()
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"affinity must be a square matrix, got shape {tuple(a.shape)}.")
    if (a < 0).any():
        raise ValueError("affinity must be nonnegative (clip negative correlations to 0 first).")
    a = (a + a.T) / 2
    inv_sqrt = a.sum(dim=1).clamp_min(1e-12).rsqrt()
    normalised = inv_sqrt[:, None] * a * inv_sqrt[None, :]
    _, vecs = torch.linalg.eigh(normalised)
    embedding = vecs[:, -k:]
    embedding = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return kmeans(embedding, k, seed=seed)


def spherical_kmeans(directions: Tensor, k: int, n_init: int = 4, iters: int = 100, seed: int = 0) -> Tensor:
    """Cluster directions [m, p] by cosine: unit rows, k-means++ seeds, centroids renormalised each step."""
    x = F.normalize(directions.double(), dim=1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best_labels, best_score = None, -float("inf")
    for _ in range(n_init):
        centres = _kmeans_pp(x, k, gen)
        for _ in range(iters):
            labels = (x @ centres.T).argmax(dim=1)
            sums = F.one_hot(labels, k).to(x.dtype).T @ x
            empty = sums.norm(dim=1) == 0
            new = F.normalize(sums, dim=1)
            new[empty] = centres[empty]
            if torch.allclose(new, centres):
                break
            centres = new
        sims = x @ centres.T
        labels = sims.argmax(dim=1)
        score = sims.max(dim=1).values.sum().item()
        if score > best_score:
            best_labels, best_score = labels, score
    return best_labels


def _entropy(counts: Tensor) -> float:
    p = counts[counts > 0].double() / counts.sum()
    return -(p * p.log()).sum().item()


def expected_mutual_information(a: Tensor, b: Tensor, n: int) -> float:
    """E[MI] between two labelings with cluster sizes a [R] and b [C] over n items, under random permutation."""
    a, b = a.double(), b.double()
    lg = torch.lgamma
    total = 0.0
    for ai in a.tolist():
        lo = torch.clamp(ai + b - n, min=1)  # [C]
        hi = torch.minimum(torch.full_like(b, ai), b)
        span = int((hi - lo).max().item()) + 1 if (hi >= lo).any() else 0
        if span <= 0:
            continue
        nij = lo[:, None] + torch.arange(span, dtype=torch.float64)[None, :]  # [C, span]
        valid = nij <= hi[:, None]
        nij = torch.where(valid, nij, torch.ones_like(nij))
        bj = b[:, None].expand_as(nij)
        log_p = (
            math.lgamma(ai + 1) + math.lgamma(n - ai + 1) - math.lgamma(n + 1)
            + lg(bj + 1) + lg(n - bj + 1)
            - lg(nij + 1) - lg(ai - nij + 1) - lg(bj - nij + 1) - lg(n - ai - bj + nij + 1)
        )  # fmt: skip
        term = nij / n * torch.log(n * nij / (ai * bj)) * log_p.exp()
        total += term[valid].sum().item()
    return total


def adjusted_mutual_information(labels_a: Tensor, labels_b: Tensor) -> float:
    """AMI of two labelings [m] (arbitrary integer labels); 1 for identical partitions, about 0 for independent."""
    if labels_a.shape != labels_b.shape or labels_a.ndim != 1:
        raise ValueError("labelings must be 1-D and the same length.")
    _, ia = labels_a.cpu().unique(return_inverse=True)
    _, ib = labels_b.cpu().unique(return_inverse=True)
    r, c, n = int(ia.max()) + 1, int(ib.max()) + 1, ia.numel()
    if r == c == 1 or (r == n and c == n):
        return 1.0
    table = torch.bincount(ia * c + ib, minlength=r * c).reshape(r, c).double()
    a, b = table.sum(dim=1), table.sum(dim=0)
    nz = table > 0
    mi = (table[nz] / n * (n * table[nz] / (a[:, None] * b[None, :])[nz]).log()).sum().item()
    emi = expected_mutual_information(a, b, n)
    denom = 0.5 * (_entropy(a) + _entropy(b)) - emi
    if abs(denom) < 1e-15:
        return 0.0
    return (mi - emi) / denom

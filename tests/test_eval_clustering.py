"""AMI vs brute-force permutation averages, spectral clustering and co-occurrence on planted structure."""

import itertools
import math

import numpy as np
import pytest
import torch

from saelab.eval.clustering import adjusted_mutual_information, kmeans, spectral_clustering, spherical_kmeans
from saelab.eval.cooccurrence import CooccurrenceStats, cooccurrence_vs_geometry
from saelab.metrics.codes import to_dense


def mutual_info(a: list[int], b: list[int]) -> float:
    n = len(a)
    joint: dict[tuple[int, int], int] = {}
    for pair in zip(a, b, strict=True):
        joint[pair] = joint.get(pair, 0) + 1
    ca = {x: a.count(x) for x in set(a)}
    cb = {y: b.count(y) for y in set(b)}
    return sum(c / n * math.log(n * c / (ca[x] * cb[y])) for (x, y), c in joint.items())


def entropy(a: list[int]) -> float:
    n = len(a)
    return -sum(a.count(x) / n * math.log(a.count(x) / n) for x in set(a))


@pytest.mark.parametrize(
    "a,b",
    [
        ([0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 2, 2]),
        ([0, 0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 0, 1, 2]),
        ([3, 1, 3, 1, 3, 1, 5], [0, 0, 0, 1, 1, 1, 1]),
    ],
)
def test_ami_matches_the_average_over_all_permutations(a, b):
    """E[MI] is the mean MI over every permutation of one labeling (7! = 5040 of them)."""
    emi = np.mean([mutual_info(a, [b[i] for i in perm]) for perm in itertools.permutations(range(len(b)))])
    want = (mutual_info(a, b) - emi) / (0.5 * (entropy(a) + entropy(b)) - emi)
    got = adjusted_mutual_information(torch.tensor(a), torch.tensor(b))
    assert got == pytest.approx(want, abs=1e-10)


def test_ami_is_one_for_relabelled_partitions_and_near_zero_for_independent_ones():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (400,), generator=gen)
    assert adjusted_mutual_information(labels, (labels * 7 + 3) % 6 + 10) == pytest.approx(1.0)
    other = torch.randint(0, 6, (400,), generator=gen)
    assert abs(adjusted_mutual_information(labels, other)) < 0.03


def planted_blocks(sizes: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    truth = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    same = (truth[:, None] == truth[None, :]).double()
    noise = torch.rand(len(truth), len(truth), generator=gen, dtype=torch.float64) * 0.05
    return same * 0.8 + (noise + noise.T) / 2, truth


def test_spectral_clustering_recovers_planted_blocks():
    affinity, truth = planted_blocks([12, 20, 7, 15], torch.Generator().manual_seed(1))
    labels = spectral_clustering(affinity, 4)
    assert adjusted_mutual_information(labels, truth) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="nonnegative"):
        spectral_clustering(affinity - 1.0, 4)


def test_kmeans_and_spherical_kmeans_find_separated_groups():
    gen = torch.Generator().manual_seed(2)
    centres = torch.randn(5, 10, generator=gen) * 5
    truth = torch.arange(5).repeat_interleave(30)
    points = centres[truth] + 0.1 * torch.randn(150, 10, generator=gen)
    assert adjusted_mutual_information(kmeans(points, 5), truth) == pytest.approx(1.0)
    directions = centres[truth] * torch.rand(150, 1, generator=gen) * 3  # same directions, random lengths
    assert adjusted_mutual_information(spherical_kmeans(directions, 5), truth) == pytest.approx(1.0)


def test_phi_equals_pearson_correlation_of_firing_indicators():
    gen = torch.Generator().manual_seed(3)
    n, k = 50, 4
    indices = torch.rand(300, n, generator=gen).argsort(dim=1)[:, :k]
    values = (torch.rand(300, k, generator=gen) - 0.3).clamp_min(0)
    subset = torch.tensor([0, 3, 4, 10, 22, 49])
    sparse, dense = CooccurrenceStats(subset, n), CooccurrenceStats(subset, n)
    for rows in torch.arange(300).split(70):
        sparse.update((values[rows], indices[rows]))
        dense.update(to_dense((values[rows], indices[rows]), n))
    fired = (to_dense((values, indices), n)[:, subset] != 0).double().numpy()
    want = np.corrcoef(fired, rowvar=False)
    np.testing.assert_allclose(sparse.phi().numpy(), want, atol=1e-12)
    np.testing.assert_allclose(dense.phi().numpy(), want, atol=1e-12)


def test_cooccurrence_clusters_agree_with_decoder_clusters_when_planted():
    """8 groups of 6 latents: a group fires together and its decoder rows share a direction."""
    gen = torch.Generator().manual_seed(4)
    groups, per, d, tokens = 8, 6, 32, 3000
    truth = torch.arange(groups).repeat_interleave(per)
    centres = torch.randn(groups, d, generator=gen)
    w_dec = centres[truth] + 0.3 * torch.randn(groups * per, d, generator=gen)
    group_on = torch.randint(0, groups, (tokens,), generator=gen)
    z = (
        (truth[None, :] == group_on[:, None]) & (torch.rand(tokens, groups * per, generator=gen) < 0.8)
    ).float()
    stats = CooccurrenceStats(torch.arange(groups * per), groups * per)
    stats.update(z)
    out = cooccurrence_vs_geometry(stats, w_dec, n_clusters=groups, n_shuffles=20)
    assert out["n_clusters"] == groups
    assert out["ami"] > 0.95
    assert abs(out["ami_shuffled_mean"]) < 0.05
    # with unrelated decoder rows the agreement drops to the shuffled level
    unrelated = cooccurrence_vs_geometry(
        stats, torch.randn(groups * per, d, generator=gen), n_clusters=groups
    )
    assert unrelated["ami"] < 0.3

"""Dead-latent tracker and density histogram vs slow per-row loops and numpy."""

import math

import numpy as np
import pytest
import torch

from saelab.metrics.codes import fire_counts, to_dense
from saelab.metrics.dead import DeadLatentTracker, dead_latent_report, log10_density_histogram


def random_sparse_codes(
    batch: int, n: int, k: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK-style codes: k distinct indices per row, some values exactly 0 (ReLU'd slots)."""
    indices = torch.rand(batch, n, generator=gen).argsort(dim=1)[:, :k]
    values = torch.rand(batch, k, generator=gen) - 0.2
    return values.clamp_min(0), indices


def test_fire_counts_sparse_and_dense_match_a_row_loop():
    gen = torch.Generator().manual_seed(0)
    values, indices = random_sparse_codes(50, 40, 6, gen)
    expected = np.zeros(40, dtype=np.int64)
    for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
        for v, i in zip(row_values, row_indices, strict=True):
            expected[i] += v != 0
    assert fire_counts((values, indices), 40).tolist() == expected.tolist()
    assert fire_counts(to_dense((values, indices), 40), 40).tolist() == expected.tolist()


def test_tracker_matches_a_slow_simulation_and_window():
    gen = torch.Generator().manual_seed(1)
    n, window = 30, 25
    sparse, dense = DeadLatentTracker(n, window), DeadLatentTracker(n, window)
    since = [0] * n  # slow reference: tokens since each latent last fired (batch granularity)
    counts = [0] * n
    for step in range(12):
        batch = 1 + step % 5
        values, indices = random_sparse_codes(batch, n, 3, gen)
        if step > 6:  # make latents 0..9 go silent for the last batches
            values = values.masked_fill(indices < 10, 0.0)
        sparse.update_codes((values, indices))
        dense.update_codes(to_dense((values, indices), n))
        fired = set()
        for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
            for v, i in zip(row_values, row_indices, strict=True):
                if v != 0:
                    fired.add(i)
                    counts[i] += 1
        since = [0 if i in fired else s + batch for i, s in enumerate(since)]
    for tracker in (sparse, dense):
        assert tracker.tokens_since_fired.tolist() == since
        assert tracker.fire_counts.tolist() == counts
        assert tracker.tokens_seen == sum(1 + s % 5 for s in range(12))
        assert tracker.dead_mask.tolist() == [s >= window for s in since]
        assert tracker.dead_fraction() == pytest.approx(sum(s >= window for s in since) / n)
    assert any(s >= window for s in since[:10])  # the silenced latents really are dead


def test_never_fired_latent_is_dead_after_one_window():
    tracker = DeadLatentTracker(4, window=10)
    z = torch.tensor([[1.0, 0.0, 0.0, 2.0]] * 4)
    tracker.update_codes(z)
    assert tracker.dead_mask.tolist() == [False] * 4
    tracker.update_codes(torch.cat([z] * 2))
    assert tracker.dead_mask.tolist() == [False, True, True, False]


def test_log10_density_histogram_matches_numpy():
    gen = torch.Generator().manual_seed(2)
    density = 10 ** (-6 * torch.rand(500, generator=gen, dtype=torch.float64))
    density[:17] = 0.0
    density[17:20] = 1e-12  # below the range: clamped into the first bin
    hist = log10_density_histogram(density, bins=24, low=-8.0, high=0.0)
    fired = density[density > 0].numpy()
    ref_counts, ref_edges = np.histogram(np.clip(np.log10(fired), -8, 0), bins=24, range=(-8, 0))
    assert hist["counts"] == ref_counts.tolist()
    assert np.allclose(hist["edges"], ref_edges)
    assert hist["never_fired"] == 17


def test_dead_latent_report_fractions():
    tracker = DeadLatentTracker(5, window=100)
    z = torch.zeros(40, 5)
    z[:, 0] = 1.0  # fires on every token: dense
    z[::10, 1] = 1.0  # density 0.1
    z[0, 2] = 1.0  # density 0.025
    tracker.update_codes(z)
    report = dead_latent_report(tracker, dense_threshold=0.5)
    assert report["never_fired_frac"] == pytest.approx(2 / 5)
    assert report["dense_frac"] == pytest.approx(1 / 5)
    # the window (100) is longer than the 40 tokens seen: dead means silent on all of them (latents 3 and 4)
    assert (report["dead_frac"], report["window_tokens"]) == (pytest.approx(2 / 5), 40)
    assert report["log10_density_q50"] == pytest.approx(math.log10(0.1))
    with pytest.raises(ValueError, match="window"):
        DeadLatentTracker(5, window=0)

"""Reconstruction metrics vs independent float64 numpy formulas."""

import numpy as np
import pytest
import torch

from saelab.metrics.reconstruction import ReconstructionStats, reconstruction_metrics


def reference(x: np.ndarray, x_hat: np.ndarray, z: np.ndarray) -> dict[str, float]:
    """Float64 formulas over the whole data set at once, written with per-row loops where natural."""
    x, x_hat, z = x.astype(np.float64), x_hat.astype(np.float64), z.astype(np.float64)
    sse = ((x - x_hat) ** 2).sum()
    total = ((x - x.mean(axis=0)) ** 2).sum()
    cos = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(x, x_hat, strict=True)]
    shrink = [np.linalg.norm(b) / np.linalg.norm(a) for a, b in zip(x, x_hat, strict=True)]
    return {
        "mse": sse / x.size,
        "fvu": sse / total,
        "explained_variance": 1 - sse / total,
        "cosine": float(np.mean(cos)),
        "shrinkage": float(np.mean(shrink)),
        "relative_reconstruction_bias": (x_hat**2).sum(axis=1).mean() / (x * x_hat).sum(axis=1).mean(),
        "l0": float(np.mean([(row != 0).sum() for row in z])),
        "l1": float(np.mean([np.abs(row).sum() for row in z])),
    }


def test_fvu_of_mean_is_one_and_of_x_is_zero():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=gen) * 3 + 5
    assert reconstruction_metrics(x, x.mean(dim=0).expand_as(x))["fvu"] == pytest.approx(1.0, abs=1e-6)
    perfect = reconstruction_metrics(x, x.clone())
    assert perfect["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert perfect["explained_variance"] == pytest.approx(1.0, abs=1e-12)
    assert perfect["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)


def test_streaming_metrics_match_float64_formulas_over_uneven_batches():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(517, 24, generator=gen) + 2.0
    z = torch.relu(torch.randn(517, 40, generator=gen) - 1.0)
    x_hat = 0.8 * x + 0.3 * torch.randn(517, 24, generator=gen)
    stats = ReconstructionStats()
    for start, stop in [(0, 1), (1, 100), (100, 333), (333, 517)]:
        stats.update(x[start:stop], x_hat[start:stop], z[start:stop])
    got = stats.compute()
    want = reference(x.numpy(), x_hat.numpy(), z.numpy())
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_sparse_codes_give_the_same_l0_l1_as_dense():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 8, generator=gen)
    values = torch.rand(64, 5, generator=gen) - 0.3
    values = values.clamp_min(0)
    indices = torch.rand(64, 30, generator=gen).argsort(dim=1)[:, :5]
    dense = torch.zeros(64, 30).scatter_(1, indices, values)
    sparse_m = reconstruction_metrics(x, 0.5 * x, (values, indices))
    want = reference(x.numpy(), 0.5 * x.numpy(), dense.numpy())
    assert sparse_m["l0"] == pytest.approx(want["l0"])
    assert sparse_m["l1"] == pytest.approx(want["l1"], rel=1e-6)
    assert sparse_m["relative_reconstruction_bias"] == pytest.approx(0.5, rel=1e-6)
    assert sparse_m["shrinkage"] == pytest.approx(0.5, rel=1e-6)


def test_total_variance_survives_a_large_mean():
    """sum ||x||^2 - N ||mean||^2 in float32 would lose the variance; the merged float64 update does not."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 8, generator=gen, dtype=torch.float64) + 1e6
    x_hat = x + 0.1 * torch.randn(4096, 8, generator=gen, dtype=torch.float64)
    stats = ReconstructionStats()
    for a, b in zip(x.split(1000), x_hat.split(1000), strict=True):
        stats.update(a, b)
    want = reference(x.numpy(), x_hat.numpy(), np.zeros((1, 1)))["fvu"]
    assert stats.compute()["fvu"] == pytest.approx(want, rel=1e-9)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="x and x_hat"):
        reconstruction_metrics(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="no rows"):
        ReconstructionStats().compute()

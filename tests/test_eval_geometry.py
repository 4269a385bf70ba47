"""Decoder geometry vs dense numpy computations and planted power laws."""

import math

import numpy as np
import pytest
import torch

from saelab.eval.geometry import decoder_cosines, decoder_spectrum, power_law_slope


def dense_cosines(w: np.ndarray) -> np.ndarray:
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return sims


def test_chunked_max_cosine_and_duplicates_equal_dense():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(103, 12, generator=gen, dtype=torch.float64)
    w[50] = 2.0 * w[3] + 0.01 * torch.randn(12, generator=gen, dtype=torch.float64)  # planted duplicates
    w[90] = -w[7]  # anti-parallel: not a duplicate
    w[101] = w[100] * 0.5
    sims = dense_cosines(w.numpy())
    for chunk in (7, 103, 4096):
        got = decoder_cosines(w, threshold=0.6, chunk=chunk, dtype=torch.float64)
        np.testing.assert_allclose(got.max_cos.numpy(), sims.max(axis=1), rtol=0, atol=1e-12)
        assert got.nearest.tolist() == sims.argmax(axis=1).tolist()
        i, j = np.nonzero(np.triu(sims >= 0.6, k=1))
        want = sorted(zip(i.tolist(), j.tolist(), strict=True))
        assert sorted(map(tuple, got.pairs.tolist())) == want
        np.testing.assert_allclose(got.pair_cos.numpy(), np.sort(sims[i, j])[::-1], atol=1e-12)
    assert (3, 50) in want and (100, 101) in want and (7, 90) not in want


def test_spectrum_is_the_eigenvalues_of_the_numpy_covariance():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(300, 20, generator=gen, dtype=torch.float64) * torch.linspace(
        0.1, 3, 20, dtype=torch.float64
    )
    want = np.sort(np.linalg.eigvalsh(np.cov(w.numpy(), rowvar=False)))[::-1]
    np.testing.assert_allclose(decoder_spectrum(w).numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.6, 1.0, 1.4])
def test_power_law_slope_of_a_planted_spectrum_is_recovered(alpha):
    """Rows G diag(r^-alpha/2) V^T with Gaussian G: cov eigenvalues ~ r^-alpha (plus sampling noise)."""
    gen = torch.Generator().manual_seed(2)
    n, d = 4096, 256
    g = torch.randn(n, d, generator=gen, dtype=torch.float64)
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    ranks = torch.arange(1, d + 1, dtype=torch.float64)
    w = (g * ranks.pow(-alpha / 2)) @ v.T + 3.0  # a shared offset must not matter (covariance is centred)
    assert power_law_slope(decoder_spectrum(w)) == pytest.approx(-alpha, abs=0.05)


def test_power_law_slope_is_exact_on_exact_power_law_and_nan_when_too_few_ranks():
    eig = torch.arange(1, 201, dtype=torch.float64).pow(-0.8)
    eig[:9] = 100.0  # outside the fit range: ignored
    eig[150:] = 1e-9
    assert power_law_slope(eig) == pytest.approx(-0.8, abs=1e-12)
    assert math.isnan(power_law_slope(torch.ones(11)))
    with pytest.raises(ValueError, match="first_rank"):
        power_law_slope(eig, first_rank=20, last_rank=10)

"""Matching-pursuit SAE: pursuit vs a plain-Python loop, gradients, revival term, scale folding, save/load, CLI."""

import pytest
import torch

from saelab import load_sae
from saelab.app.cli import main
from saelab.sae.base import TrainContext
from saelab.sae.mp import MatchingPursuitSAE, MPConfig


def make_sae(d_in=6, d_sae=10, k=4, gram="never", seed=0) -> MatchingPursuitSAE:
    torch.manual_seed(seed)
    sae = MatchingPursuitSAE(MPConfig(d_in=d_in, d_sae=d_sae, k=k, gram=gram, dtype="float64"))
    with torch.no_grad():
        sae.b_dec.normal_()
    return sae


def reference_pursuit(x, dictionary, b_dec, k):
    """Plain-Python matching pursuit, one row at a time: (codes [B][n], residuals [B][d], per-step norms)."""
    D = dictionary.tolist()
    n, d = len(D), len(D[0])
    codes, residuals, norms = [], [], []
    for row in x.tolist():
        r = [row[i] - float(b_dec[i]) for i in range(d)]
        z = [0.0] * n
        row_norms = [sum(v * v for v in r) ** 0.5]
        for _ in range(k):
            corr = [sum(r[i] * D[j][i] for i in range(d)) for j in range(n)]
            j = max(range(n), key=lambda a: corr[a])
            c = max(corr[j], 0.0)
            z[j] += c
            r = [r[i] - c * D[j][i] for i in range(d)]
            row_norms.append(sum(v * v for v in r) ** 0.5)
        codes.append(z)
        residuals.append(r)
        norms.append(row_norms)
    return torch.tensor(codes, dtype=torch.float64), torch.tensor(residuals, dtype=torch.float64), norms


@pytest.mark.parametrize("gram", ["never", "always"])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_pursuit_matches_plain_loop(gram, k):
    sae = make_sae(k=4, gram=gram)
    x = torch.randn(7, 6, dtype=torch.float64) * 2
    codes, residuals, _ = reference_pursuit(x, sae.W_dec.detach(), sae.b_dec.detach(), k)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x, k=k), codes, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sae(x, k=k), x - residuals, rtol=1e-10, atol=1e-10)
        values, indices = sae.encode_sparse(x, k=k)
        dense = torch.zeros(7, 10, dtype=torch.float64).scatter_add_(1, indices, values)
        torch.testing.assert_close(dense, codes, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sae.decode_sparse(values, indices), x - residuals, rtol=1e-10, atol=1e-10)


def test_residual_norm_never_grows_and_k_can_be_raised_at_inference():
    sae = make_sae(d_in=8, d_sae=24, k=4)
    x = torch.randn(16, 8, dtype=torch.float64) * 3
    _, _, norms = reference_pursuit(x, sae.W_dec.detach(), sae.b_dec.detach(), 12)
    with torch.no_grad():
        for k in range(1, 13):
            residual = (x - sae(x, k=k)).norm(dim=1)
            assert (residual <= torch.tensor([row[k - 1] for row in norms]) + 1e-12).all()
            torch.testing.assert_close(residual, torch.tensor([row[k] for row in norms], dtype=torch.float64))
    assert all(b <= a + 1e-12 for row in norms for a, b in zip(row, row[1:], strict=False))
    assert all(row[12] < row[0] for row in norms)


def test_repeated_atom_is_merged_in_sparse_codes():
    """Two atoms 120 degrees apart, x between them: each step leaves a residual positively correlated with
    the other atom, so pursuit alternates and picks each atom several times."""
    sae = MatchingPursuitSAE(MPConfig(d_in=2, d_sae=2, k=6, dtype="float64"))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2]], dtype=torch.float64))
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    codes, _, _ = reference_pursuit(x, sae.W_dec.detach(), sae.b_dec.detach(), 6)
    with torch.no_grad():
        values, indices = sae.encode_sparse(x)
    assert indices.shape == (1, 6) and len(set(indices[0].tolist())) == 2
    assert int((values != 0).sum()) == 2  # one nonzero slot per distinct atom
    torch.testing.assert_close(torch.zeros(1, 2, dtype=torch.float64).scatter_add_(1, indices, values), codes)


def test_gradients_are_those_of_the_pursuit_with_fixed_selection():
    """Finite differences of the implemented function (the argmax does not move under eps = 1e-6) equal autograd:
    gradients flow through the values and the residual chain."""
    sae = make_sae(d_in=5, d_sae=7, k=3)
    x = torch.randn(4, 5, dtype=torch.float64)

    def loss(dictionary, b_dec):
        x_hat = torch.func.functional_call(sae, {"W_dec": dictionary, "b_dec": b_dec}, (x,))
        return (x - x_hat).pow(2).sum(dim=1)

    D0, b0 = sae.W_dec.detach().clone(), sae.b_dec.detach().clone()
    assert torch.autograd.gradcheck(loss, (D0.requires_grad_(), b0.requires_grad_()), eps=1e-6, atol=1e-6)


def test_revival_term_matches_hand_computation_and_reaches_only_dead_atoms():
    sae = make_sae(d_in=6, d_sae=10, k=2)
    sae.cfg.aux_k = 3
    residual = torch.randn(5, 6, dtype=torch.float64)
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[1, 4, 6, 7, 9]] = True
    loss = sae.revival_loss(residual, dead)
    D = sae.W_dec.detach()
    rebuilt = torch.zeros_like(residual)
    for b in range(5):
        corr = {i: float(residual[b] @ D[i]) for i in range(10) if dead[i]}
        for i in sorted(corr, key=corr.get, reverse=True)[:3]:
            rebuilt[b] += max(corr[i], 0.0) * D[i]
    expected = (residual - rebuilt).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    torch.testing.assert_close(loss, expected)  # 5 dead >= aux_k = 3: no down-scaling
    loss.backward()
    touched = sae.W_dec.grad.abs().sum(dim=1) > 0
    assert touched[dead].any() and not touched[~dead].any()


def test_training_forward_reports_codes_and_revives_dead_atoms():
    sae = make_sae(d_in=6, d_sae=10, k=3)
    x = torch.randn(32, 6, dtype=torch.float64)
    dead = torch.zeros(10, dtype=torch.bool)
    dead[:5] = True
    out = sae.training_forward(x, TrainContext(step=0, total_steps=10, dead_mask=dead, any_dead=True))
    z = sae.encode(x).detach()
    torch.testing.assert_close(out.l0, (z > 0).sum(dim=1).double().mean().to(out.l0.dtype))
    assert torch.equal(out.fired, (z > 0).any(dim=0))
    assert "revival" in out.metrics
    out.loss.backward()
    assert sae.W_dec.grad[:5].abs().sum() > 0


def test_fold_input_scale_gives_raw_input_equivalence():
    sae = make_sae(d_in=6, d_sae=10, k=4)
    x = torch.randn(9, 6, dtype=torch.float64)
    with torch.no_grad():
        trained = sae(3.5 * x), sae.encode(3.5 * x)
        sae.fold_input_scale(3.5)
        torch.testing.assert_close(sae(x), trained[0] / 3.5)
        torch.testing.assert_close(sae.encode(x), trained[1] / 3.5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="sae.k"):
        MPConfig(d_in=4, d_sae=8, k=0).validate()
    with pytest.raises(ValueError, match="sae.gram"):
        MPConfig(d_in=4, d_sae=8, gram="sometimes").validate()


def test_saves_loads_and_trains_from_the_cli(tmp_path):
    main([
        "train", "sae=mp", "sae.k=4", "sae.expansion_factor=4", "source.d_in=16", "source.n_features=32",
        "trainer.total_tokens=8192", "trainer.batch_size=512", "trainer.device=cpu", "logging.progress=false",
        f"hydra.run.dir={tmp_path}",
    ])  # fmt: skip
    sae = load_sae(tmp_path / "sae")
    assert isinstance(sae, MatchingPursuitSAE) and sorted(sae.state_dict()) == ["W_dec", "b_dec"]
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64), rtol=0, atol=1e-5)
    sae.save(tmp_path / "again")
    again = load_sae(tmp_path / "again")
    x = torch.randn(8, 16)
    torch.testing.assert_close(again(x), sae(x))

"""Planted-feature data sets (mixed sparsity, hierarchical) and feature recovery on the GBA paper's toy."""

import pytest
import torch

from saelab.sae.gba import GBAConfig, GroupBiasAdaptationSAE
from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource, gba_toy_config, recovery_metrics
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer


def active_counts(source: SyntheticSource, rows: int) -> torch.Tensor:
    codes = source.sample_codes(rows, torch.Generator().manual_seed(5))
    return codes > 0


def test_gba_toy_rows_are_exactly_3_or_20_sparse_half_and_half():
    source = SyntheticSource(gba_toy_config())
    assert source.features.shape == (128, 42)
    active = active_counts(source, 20000)
    counts = active.sum(dim=1)
    assert set(counts.unique().tolist()) == {3, 20}
    assert abs((counts == 3).double().mean().item() - 0.5) < 0.02  # binomial sd 0.0035
    torch.testing.assert_close(
        active.double().mean(0), torch.full((128,), 11.5 / 128, dtype=torch.float64), atol=0.01, rtol=0
    )
    codes = source.sample_codes(20000, torch.Generator().manual_seed(6))
    assert codes[codes > 0].mean().item() == pytest.approx(1.0, abs=0.02)  # exponential, mean (0.5 + 1.5) / 2
    assert codes[codes > 0].std().item() == pytest.approx(1.0, abs=0.03)


def test_hierarchical_children_are_exclusive_and_need_their_parent():
    cfg = SyntheticConfig(
        d_in=32, n_features=60, structure="hierarchical", n_children=3, child_prob=0.6, mean_active=2
    )
    source = SyntheticSource(cfg)
    active = active_counts(source, 30000)
    parents, children = active[:, :15], active[:, 15:].reshape(-1, 15, 3)
    assert children.sum(dim=2).max() == 1  # at most one child per parent per row
    assert not (children.any(dim=2) & ~parents).any()  # never a child without its parent
    frac_with_child = (children.any(dim=2).sum() / parents.sum()).item()
    assert frac_with_child == pytest.approx(0.6, abs=0.01)
    torch.testing.assert_close(active.double().mean(0), source.frequencies.double(), atol=0.012, rtol=0)
    assert parents.sum(dim=1).double().mean().item() == pytest.approx(2.0, abs=0.03)


def test_batches_are_a_pure_function_of_seed_and_index():
    for cfg in (gba_toy_config(seed=3), SyntheticConfig(structure="hierarchical", n_features=100, seed=3)):
        a, b = SyntheticSource(cfg), SyntheticSource(cfg)
        stream = a.batches(64, start_batch=5)
        assert torch.equal(next(stream), b.batch(5, 64)) and torch.equal(next(stream), b.batch(6, 64))
        assert not torch.equal(a.batch(5, 64), a.batch(7, 64))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"structure": "tree"}, "source.structure"),
        ({"structure": "mixed_sparsity", "sparsity_levels": [0, 3]}, "source.sparsity_levels"),
        ({"structure": "hierarchical", "n_features": 62, "n_children": 3}, "source.n_features"),
        (
            {"structure": "hierarchical", "n_features": 60, "n_children": 3, "child_prob": 1.5},
            "source.child_prob",
        ),
        ({"magnitudes": "gaussian"}, "source.magnitudes"),
    ],
)
def test_bad_synthetic_config_names_the_field(fields, field):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**fields).validate()


def train(make_sae, source, steps=2000, batch_size=512):
    torch.manual_seed(1234)  # the SAE initialisation (independent of the data streams, saelab.core.seeds)
    cfg = TrainerConfig(total_tokens=steps * batch_size, batch_size=batch_size, device="cpu")
    return Trainer(make_sae(), cfg).fit(source).sae


@pytest.mark.slow
def test_gba_recovers_the_toy_features_and_beats_topk_k30():
    """The GBA paper's toy (128 features in d=42, half the rows 3-sparse, half 20-sparse): with default settings
    and the same budget, GBA recovers >= 93% of the features at cosine >= 0.9; TopK with k=30 does not.
    Across initialisations GBA recovers 94.5-98.4% here (five inits, 2026-11-30; BENCHMARKS.md): the former
    >= 95% bound held for one draw of the data and init, not for the method."""
    source = SyntheticSource(gba_toy_config())
    gba = train(lambda: GroupBiasAdaptationSAE(GBAConfig(d_in=42, d_sae=512)), source)
    topk = train(lambda: TopKSAE(TopKConfig(d_in=42, d_sae=512, k=30)), source)
    gba_rec = recovery_metrics(source.features, gba.W_dec.detach())
    topk_rec = recovery_metrics(source.features, topk.W_dec.detach())
    assert gba_rec["frac_recovered"] >= 0.93, gba_rec
    assert gba_rec["frac_recovered"] > topk_rec["frac_recovered"] + 0.3, (gba_rec, topk_rec)
    assert gba_rec["mmcs"] > topk_rec["mmcs"]

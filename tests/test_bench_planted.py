"""The planted-data benchmarks' diagnostics: variant settings on the ladder (`bench_scale.py --saelab-variants
ARCH:field=value`), recovery by frequency quarter, and `bench_recovery.py --start-at-planted`."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_recovery  # noqa: E402
import bench_scale  # noqa: E402

TINY = bench_scale.Rung(d_in=16, features=64, active=3, latents=128, k=4, batch=64, steps=3)


def test_variant_settings_are_read_as_yaml_and_malformed_ones_name_the_form():
    assert bench_scale.parse_variant_settings("topk") == ("topk", {})
    arch, settings = bench_scale.parse_variant_settings(
        "matryoshka:group_fractions=[0.5, 0.5];aux_k_coef=0.5"
    )
    assert arch == "matryoshka"
    assert settings == {"group_fractions": [0.5, 0.5], "aux_k_coef": 0.5}
    with pytest.raises(SystemExit, match="field=value"):
        bench_scale.parse_variant_settings("matryoshka:group_fractions")


def ladder_variant(arch: str, settings: dict) -> bench_scale.SaelabVariant:
    """A ladder run of `arch` with `settings`, trained for TINY's steps on its planted batches."""
    data = bench_scale.PlantedData(TINY, 5, torch.device("cpu"))
    torch.manual_seed(0)
    run = bench_scale.SaelabVariant(
        TINY, data.batch(0), torch.device("cpu"), {"architecture": arch, "seed": 7, "settings": settings}
    )
    for step in range(TINY.steps):
        run.step(data.batch(step))
    run.finish()
    return run


def test_one_group_matryoshka_trains_as_batchtopk_so_the_settings_reach_the_sae():
    """With group_fractions [1.0] the Matryoshka loss is BatchTopK's: the same weights after the same steps (the
    ladder's "one group" rows), while the default groups train differently."""
    reference = ladder_variant("batchtopk", {})
    one_group = ladder_variant("matryoshka", {"group_fractions": [1.0]})
    nested = ladder_variant("matryoshka", {})
    assert one_group.sae.cfg.group_fractions == [1.0]
    torch.testing.assert_close(one_group.sae.W_dec, reference.sae.W_dec, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(nested.sae.W_dec, reference.sae.W_dec, atol=1e-4)


class FixedDecoder(bench_scale.Library):
    """A run whose decoder rows are given; it encodes nothing (x_hat = 0)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def encode(self, x):
        return torch.zeros(x.shape[0], 1), torch.zeros(x.shape[0], 1, dtype=torch.long)

    def decode(self, values, indices):
        return torch.zeros(values.shape[0], TINY.d_in)

    def decoder(self):
        return self.rows


def test_recovery_by_frequency_quarter_counts_each_quarter_of_the_planted_features():
    data = bench_scale.PlantedData(TINY, 5, torch.device("cpu"))
    assert bool((data.frequencies[:-1] >= data.frequencies[1:]).all())  # most frequent first
    quarter = TINY.features // 4
    kept = torch.cat([data.features[:quarter], data.features[2 * quarter : 3 * quarter][::2]])
    rows = torch.cat([kept, torch.randn(8, TINY.d_in, generator=torch.Generator().manual_seed(1))])
    result = bench_scale.evaluate(FixedDecoder(rows), data, data.held_out(TINY.batch))
    assert result["recovered_by_frequency_quarter"] == pytest.approx([1.0, 0.0, 0.5, 0.0], abs=1 / quarter)
    assert result["recovered"] == pytest.approx(1.5 / 4, abs=1 / TINY.features)


@pytest.mark.parametrize("arch", ["topk", "relu", "gated"])
def test_planting_sets_directions_and_keeps_each_norm_and_the_other_latents(arch):
    features = F.normalize(
        torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    )
    sae = bench_recovery.build(arch, 16, 64, 4, 3)
    dec_norms, enc_norms = sae.W_dec.norm(dim=1).clone(), sae.W_enc.norm(dim=0).clone()
    rest_dec, rest_enc = sae.W_dec[40:].clone(), sae.W_enc[:, 40:].clone()
    bench_recovery.plant_dictionary(sae, features.float())
    cos_dec = F.cosine_similarity(sae.W_dec[:40].double(), features, dim=1)
    cos_enc = F.cosine_similarity(sae.W_enc[:, :40].T.double(), features, dim=1)
    torch.testing.assert_close(cos_dec, torch.ones(40, dtype=torch.float64))
    torch.testing.assert_close(cos_enc, torch.ones(40, dtype=torch.float64))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), dec_norms)
    torch.testing.assert_close(sae.W_enc.norm(dim=0), enc_norms)
    assert torch.equal(sae.W_dec[40:], rest_dec) and torch.equal(sae.W_enc[:, 40:], rest_enc)
    with pytest.raises(SystemExit, match="d_sae >= the 80 planted features"):
        bench_recovery.plant_dictionary(sae, torch.cat([features, features]).float())

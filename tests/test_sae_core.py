"""The SAE core: TopK and ReLU maths against float64 references, the registry, config errors, save/load."""

from __future__ import annotations

import json

import pytest
import torch

import saelab
from saelab.sae.base import TrainContext
from saelab.sae.registry import build_sae
from saelab.sae.relu import ReLUConfig
from saelab.sae.topk import TopKConfig


def random_sae(cfg, seed: int = 0):
    """An SAE with every parameter random (biases included), so no term of a formula is trivially zero."""
    torch.manual_seed(seed)
    sae = build_sae(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if sae.unit_norm_decoder:
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    return sae


def no_dead(n: int) -> TrainContext:
    return TrainContext(step=0, total_steps=10, dead_mask=torch.zeros(n, dtype=torch.bool), any_dead=False)


def test_parameter_names_and_shapes_follow_the_row_vector_convention():
    sae = build_sae(TopKConfig(d_in=12, d_sae=40, k=3))
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes == {"W_enc": (12, 40), "b_enc": (40,), "W_dec": (40, 12), "b_dec": (12,)}


def test_topk_encode_decode_match_a_per_row_float64_loop():
    sae = random_sae(TopKConfig(d_in=10, d_sae=30, k=4))
    x = torch.randn(6, 10)
    z = sae.encode(x).detach()
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    for row in range(6):
        pre = [float((x[row].double() - b_dec) @ W_enc[:, i] + b_enc[i]) for i in range(30)]
        keep = sorted(range(30), key=lambda i: pre[i], reverse=True)[:4]
        expected = torch.zeros(30, dtype=torch.float64)
        for i in keep:
            expected[i] = max(pre[i], 0.0)
        torch.testing.assert_close(z[row].double(), expected, atol=1e-5, rtol=1e-5)
        x_hat = sum(expected[i] * W_dec[i] for i in range(30)) + b_dec
        torch.testing.assert_close(sae(x[row : row + 1])[0].detach().double(), x_hat, atol=1e-5, rtol=1e-5)


def test_topk_loss_is_fvu_plus_auxk_over_32_from_dead_latents_only():
    sae = random_sae(TopKConfig(d_in=8, d_sae=24, k=3, aux_k=5), seed=1)
    x = torch.randn(16, 8)
    dead = torch.zeros(24, dtype=torch.bool)
    dead[torch.arange(0, 24, 3)] = True  # 8 dead latents
    out = sae.training_forward(x, TrainContext(step=0, total_steps=10, dead_mask=dead, any_dead=True))

    xd = x.double()
    pre = (xd - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
    top = pre.topk(3, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    x_hat = z @ sae.W_dec.double() + sae.b_dec.double()
    fvu = (xd - x_hat).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum()
    residual = xd - x_hat
    dead_pre = pre.masked_fill(~dead, float("-inf")).topk(5, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, dead_pre.indices, dead_pre.values.relu())
    residual_hat = z_aux @ sae.W_dec.double()  # no b_dec
    auxk = (residual - residual_hat).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    expected = fvu + auxk / 32  # 8 dead >= aux_k = 5, so the AuxK term has full weight

    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert out.metrics["fvu"].item() == pytest.approx(fvu.item(), rel=1e-4)
    assert out.l0.item() == pytest.approx((z > 0).sum(1).double().mean().item())
    torch.testing.assert_close(out.fired, (z > 0).any(0))


def test_topk_decoder_gradient_parallel_to_rows_is_removed_and_rows_stay_unit_norm():
    sae = random_sae(TopKConfig(d_in=8, d_sae=24, k=3), seed=2)
    x = torch.randn(32, 8)
    sae.training_forward(x, no_dead(24)).loss.backward()
    assert sae.W_dec.grad.abs().sum() > 0
    sae.before_optimizer_step()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert parallel.abs().max().item() < 1e-6
    torch.optim.SGD(sae.parameters(), lr=0.5).step()
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(24))


def test_relu_loss_is_summed_mse_plus_decoder_norm_weighted_l1_with_lambda_warmup():
    cfg = ReLUConfig(
        d_in=8, d_sae=20, l1_coefficient=3.0, l1_warmup_frac=0.5, target_l0=None
    )  # a fixed lambda
    sae = random_sae(cfg, seed=3)
    x = torch.randn(10, 8)
    xd = x.double()
    z = ((xd - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()).clamp_min(0)
    x_hat = z @ sae.W_dec.double() + sae.b_dec.double()
    mse = (xd - x_hat).pow(2).sum(dim=1).mean()
    l1 = (z * sae.W_dec.double().norm(dim=1)).sum(dim=1).mean()
    for step, lam in [(0, 3.0 * 1 / 50), (24, 3.0 * 25 / 50), (49, 3.0), (99, 3.0)]:
        ctx = TrainContext(
            step=step, total_steps=100, dead_mask=torch.zeros(20, dtype=torch.bool), any_dead=False
        )
        out = sae.training_forward(x, ctx)
        assert out.loss.item() == pytest.approx((mse + lam * l1).item(), rel=1e-5)


def test_relu_init_has_decoder_rows_of_norm_0_1_and_a_tied_encoder():
    torch.manual_seed(0)
    sae = build_sae(ReLUConfig(d_in=16, d_sae=64))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((64,), 0.1))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert sae.b_enc.abs().sum() == 0 and sae.b_dec.abs().sum() == 0


def test_geometric_median_initialises_b_dec_against_weiszfeld_in_float64():
    torch.manual_seed(0)
    x = torch.randn(200, 5) + torch.tensor([3.0, -1.0, 0.0, 2.0, 1.0])
    x[:20] += 50.0  # outliers pull the mean, not the median
    sae = build_sae(TopKConfig(d_in=5, d_sae=10, k=2))
    sae.initialize_from_sample(x)
    median = x.double().mean(0)
    for _ in range(500):
        w = 1 / (x.double() - median).norm(dim=1)
        median = (w[:, None] * x.double()).sum(0) / w.sum()
    torch.testing.assert_close(sae.b_dec.double(), median, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (TopKConfig(d_in=8, d_sae=16, k=17), "sae.k"),
        (TopKConfig(d_in=8, d_sae=16, k=0), "sae.k"),
        (TopKConfig(d_in=8, d_sae=16, k=4, aux_k_coef=-1.0), "sae.aux_k_coef"),
        (ReLUConfig(d_in=8, d_sae=16, l1_coefficient=-1.0), "sae.l1_coefficient"),
        (TopKConfig(d_in=0, d_sae=16), "sae.d_in"),
        (TopKConfig(d_in=8, d_sae=16, k=4, dtype="float8"), "sae.dtype"),
    ],
)
def test_bad_sae_config_names_the_field(cfg, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build_sae(cfg)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match="topk") as err:
        build_sae(TopKConfig(architecture="sparse-magic", d_in=8, d_sae=16))
    assert "sparse-magic" in str(err.value)


def test_wrong_d_in_is_refused_at_resolve_and_at_call_time():
    with pytest.raises(ValueError, match=r"sae\.d_in=32.*size 64"):
        TopKConfig(d_in=32).resolved(64)
    sae = build_sae(TopKConfig(d_in=8, d_sae=16, k=2))
    with pytest.raises(ValueError, match="d_in=8"):
        sae(torch.randn(3, 9))


@pytest.mark.parametrize("cfg", [TopKConfig(d_in=8, d_sae=32, k=4), ReLUConfig(d_in=8, d_sae=32)])
def test_save_load_round_trip_gives_identical_codes(tmp_path, cfg):
    sae = random_sae(cfg, seed=4)
    sae.cfg.metadata = {"hook_name": "blocks.3.hook_resid_post"}
    sae.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["d_sae"] == 32
    loaded = saelab.load_sae(tmp_path / "sae")
    x = torch.randn(20, 8)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))
    assert loaded.cfg.metadata["hook_name"] == "blocks.3.hook_resid_post"


def test_a_failed_save_leaves_nothing_behind_and_keeps_the_old_directory(tmp_path, monkeypatch):
    sae = random_sae(TopKConfig(d_in=8, d_sae=16, k=2))
    sae.save(tmp_path / "sae")
    before = (tmp_path / "sae" / "sae_weights.safetensors").read_bytes()

    def broken_config_dict():
        raise RuntimeError("disk full")

    monkeypatch.setattr(sae, "config_dict", broken_config_dict)
    with pytest.raises(RuntimeError, match="disk full"):
        sae.save(tmp_path / "sae")
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]
    assert (tmp_path / "sae" / "sae_weights.safetensors").read_bytes() == before


def test_unreadable_weights_name_the_file(tmp_path):
    sae = random_sae(TopKConfig(d_in=8, d_sae=16, k=2))
    sae.save(tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ValueError, match="sae_weights.safetensors"):
        saelab.load_sae(tmp_path / "sae")

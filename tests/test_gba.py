"""Group Bias Adaptation SAE: forward pass and bias-adaptation rule against hand computations, initialisation,
optimizer exclusion of the biases, scale folding, save/load, CLI."""

import math

import pytest
import torch

from saelab import load_sae
from saelab.app.cli import main
from saelab.sae.base import TrainContext
from saelab.sae.gba import GBAConfig, GroupBiasAdaptationSAE
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer


def make_sae(activation="relu", d_in=5, d_sae=12, seed=0, **kw) -> GroupBiasAdaptationSAE:
    torch.manual_seed(seed)
    cfg = GBAConfig(d_in=d_in, d_sae=d_sae, activation=activation, dtype="float64", **kw)
    sae = GroupBiasAdaptationSAE(cfg)
    with torch.no_grad():
        sae.b_enc.uniform_(-1.0, 0.0)
        sae.out_scale.uniform_(0.5, 2.0)
        sae.b_dec.normal_()
    return sae


def context() -> TrainContext:
    return TrainContext(step=0, total_steps=100, dead_mask=torch.zeros(12, dtype=torch.bool), any_dead=False)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_forward_matches_the_paper_formula_term_by_term(activation):
    """f(x) = sum_m a_m w_m phi(w_m . (x - b_pre) + b_m) + b_pre, summed neuron by neuron in Python."""
    sae = make_sae(activation)
    x = torch.randn(6, 5, dtype=torch.float64) * 2
    w, a, b, b_pre = (t.detach().tolist() for t in (sae.W_enc.T, sae.out_scale, sae.b_enc, sae.b_dec))
    expected = []
    for row in x.tolist():
        out = list(b_pre)
        for m in range(12):
            proj = sum(w[m][i] * (row[i] - b_pre[i]) for i in range(5))
            u = proj + b[m]
            phi = max(u, 0.0) if activation == "relu" else (proj if u > 0 else 0.0)
            out = [out[i] + a[m] * w[m][i] * phi for i in range(5)]
        expected.append(out)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), torch.tensor(expected, dtype=torch.float64))
        z = sae.encode(x)
        torch.testing.assert_close(z @ sae.W_dec + sae.b_dec, sae(x))  # the saelab layout's formula
    torch.testing.assert_close(sae.W_enc.norm(dim=0), torch.ones(12, dtype=torch.float64))


def hand_rule(pre_batches, bias, targets, groups, gamma, floor, dead_freq, input_norm):
    """The GBA update applied neuron by neuron to the stored pre-activations [rows][M] of one window."""
    rows = [r for batch in pre_batches for r in batch.tolist()]
    n = len(bias)
    freq = [sum(r[m] > 0 for r in rows) / len(rows) for m in range(n)]
    peak = [max(r[m] for r in rows) for m in range(n)]
    positive = [p for p in peak if p > 0]
    overall = sum(positive) / len(positive) if positive else input_norm
    new = []
    for m in range(n):
        mates = [peak[j] for j in range(n) if groups[j] == groups[m] and peak[j] > 0]
        group_peak = sum(mates) / len(mates) if mates else overall
        if freq[m] > targets[m]:
            new.append(max(bias[m] - gamma * peak[m], floor))
        elif freq[m] < dead_freq:
            new.append(min(bias[m] + gamma * group_peak, 0.0))
        else:
            new.append(bias[m])
    return new, freq


def test_bias_rule_matches_hand_update_after_exactly_update_every_steps():
    sae = make_sae(
        n_groups=3, target_freq_max=0.5, target_freq_min=0.05, update_every=3, bias_lr=0.1, bias_floor=0.3
    )
    with torch.no_grad():  # a spread of biases: some neurons fire often, some never (two whole groups' worth)
        sae.b_enc.copy_(torch.tensor([0.0, -0.2, -0.5, -4.0, -0.1, -9.0, -9.0, -9.0, 0.0, -0.3, -9.0, -1.0]))
        sae.input_norm.fill_(2.0)
    groups = [m * 3 // 12 for m in range(12)]
    targets = [0.5 * 0.1 ** (g / 2) for g in groups]
    assert sae.target_freq.tolist() == pytest.approx(targets)
    batches = [torch.randn(40, 5, dtype=torch.float64) for _ in range(3)]
    stored, before = [], sae.b_enc.detach().clone()
    for i, x in enumerate(batches):
        with torch.no_grad():
            stored.append((x - sae.b_dec) @ sae.W_enc + sae.b_enc)  # pre-activations, computed independently
        sae.training_forward(x, context())
        sae.after_optimizer_step()
        if i < 2:
            assert torch.equal(sae.b_enc, before), "biases must only move every update_every steps"
    expected, freq = hand_rule(stored, before.tolist(), targets, groups, 0.1, -0.3 * 2.0, 1e-6, 2.0)
    assert any(f > t for f, t in zip(freq, targets, strict=True))
    assert any(f == 0 for f in freq) and any(0 < f <= t for f, t in zip(freq, targets, strict=True))
    torch.testing.assert_close(sae.b_enc, torch.tensor(expected, dtype=torch.float64))
    assert -0.6 in expected  # a lowered bias stopped at the floor -bias_floor * input_norm
    assert sae.window_batches == 0 and int(sae.window_rows) == 0  # a new window starts


def test_biases_get_no_gradient_and_are_not_in_the_optimizer():
    sae = make_sae()
    params = [p for group in sae.optimizer_param_groups() for p in group["params"]]
    assert all(p is not sae.b_enc for p in params)
    assert {id(p) for p in params} == {id(sae.W_enc), id(sae.out_scale), id(sae.b_dec)}
    out = sae.training_forward(torch.randn(8, 5, dtype=torch.float64), context())
    out.loss.backward()
    assert sae.b_enc.grad is None and sae.W_enc.grad is not None


def test_b_pre_is_learned_through_the_decoder_only():
    """d loss / d b_pre = sum over rows of d loss / d x_hat: the encoder's (x - b_pre) passes no gradient."""
    sae = make_sae()
    x = torch.randn(10, 5, dtype=torch.float64)
    x_hat = sae.decode(sae.encode(x))
    x_hat.retain_grad()
    ((x - x_hat) ** 2).sum().backward()
    torch.testing.assert_close(sae.b_dec.grad, x_hat.grad.sum(dim=0))
    assert sae.W_enc.grad.abs().sum() > 0


def test_initialisation_puts_every_neuron_at_its_group_target_frequency():
    torch.manual_seed(1)
    sae = GroupBiasAdaptationSAE(
        GBAConfig(d_in=8, d_sae=40, n_groups=4, target_freq_max=0.2, target_freq_min=0.01)
    )
    x = torch.randn(1000, 8) * 3 + 1
    sae.initialize_from_sample(x)
    fires = (sae.pre_activations(x) > 0).sum(dim=0)
    for m in range(40):
        target = 0.2 * (0.01 / 0.2) ** ((m * 4 // 40) / 3)
        assert int(fires[m]) == math.floor(target * 1000)  # the neuron's (1 - p_k) quantile of the sample
    centered = x - sae.b_dec
    assert float(sae.input_norm) == pytest.approx(centered.norm(dim=1).mean().item(), rel=1e-5)
    assert sae.out_scale.min() > 0 and torch.equal(sae.out_scale, sae.out_scale[:1].expand(40))


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_fold_input_scale_gives_raw_input_equivalence(activation):
    sae = make_sae(activation)
    x = torch.randn(9, 5, dtype=torch.float64)
    with torch.no_grad():
        trained = sae(2.5 * x)
        sae.fold_input_scale(2.5)
        torch.testing.assert_close(sae(x), trained / 2.5)


def test_trainer_keeps_unit_weights_and_adapts_biases_only_by_the_rule():
    torch.manual_seed(0)
    sae = GroupBiasAdaptationSAE(GBAConfig(d_in=16, d_sae=64, update_every=5))
    trainer = Trainer(sae, TrainerConfig(total_tokens=20 * 256, batch_size=256, device="cpu"))
    result = trainer.fit(SyntheticSource(SyntheticConfig(d_in=16, n_features=32, mean_active=3)))
    torch.testing.assert_close(trainer.sae.W_enc.norm(dim=0), torch.ones(64), rtol=0, atol=1e-5)
    assert (trainer.sae.b_enc <= 0).all()
    assert not trainer.sae.b_enc.requires_grad
    assert result.sae.cfg.metadata["input_scale_folded"] == pytest.approx(trainer.input_scale)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="sae.activation"):
        GBAConfig(d_in=4, d_sae=8, activation="gelu").validate()
    with pytest.raises(ValueError, match="sae.dead_freq"):
        GBAConfig(d_in=4, d_sae=16, dead_freq=0.5).validate()
    with pytest.raises(ValueError, match="sae.n_groups"):
        GBAConfig(d_in=4, d_sae=8, n_groups=9).validate()


def test_saves_loads_and_trains_from_the_cli(tmp_path):
    main([
        "train", "sae=gba", "sae.activation=jumprelu", "sae.expansion_factor=4", "source.d_in=16",
        "source.n_features=32", "trainer.total_tokens=8192", "trainer.batch_size=512", "trainer.device=cpu",
        "logging.progress=false", f"hydra.run.dir={tmp_path}",
    ])  # fmt: skip
    sae = load_sae(tmp_path / "sae")
    assert isinstance(sae, GroupBiasAdaptationSAE) and sae.cfg.activation == "jumprelu"
    assert sorted(sae.state_dict()) == ["W_enc", "b_dec", "b_enc", "input_norm", "out_scale"]
    sae.save(tmp_path / "again")
    x = torch.randn(8, 16)
    torch.testing.assert_close(load_sae(tmp_path / "again")(x), sae(x))

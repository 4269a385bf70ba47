"""JumpReLU training: straight-through gradients against float64 formulas written from the paper, the
inference rule and saved files against SAELens, and recovery of planted features.

References: Rajamanoharan et al. 2024, eqs. for the pseudo-derivatives of JumpReLU and of the Heaviside step
with the rectangle kernel; SAELens's `JumpReLUSAE.encode` (ReLU, then the threshold mask).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from saelab import load_sae
from saelab.sae.jumprelu import JumpReLUConfig, JumpReLUSAE, JumpReLUWithGate
from saelab.sae.registry import build_sae
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource, recovery_metrics
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

if importlib.util.find_spec("sae_lens") is None:
    sae_lens = None
else:
    import sae_lens

needs_saelens = pytest.mark.skipif(
    sae_lens is None, reason="sae-lens is not installed (pip install -e '.[dev]')"
)
D_IN, D_SAE = 8, 24


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def rect(u: float) -> float:
    return 1.0 if -0.5 < u < 0.5 else 0.0


def planted_pre(gen: torch.Generator, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pre [6, 5] and threshold [5] (float64) with entries inside and outside the kernel window on both sides
    of the threshold, none on a window edge, plus negative pre-activations."""
    threshold = torch.tensor([0.3, 0.0, 1.2, 0.05, 0.7], dtype=torch.float64)
    offsets = torch.tensor([-0.4, -0.2, 0.1, 0.45, 2.0, -3.0], dtype=torch.float64)  # in units of eps
    pre = (
        threshold
        + offsets[:, None] * eps
        + 0.01 * eps * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    )
    return pre, threshold


@pytest.mark.parametrize("to_input", [False, True])
def test_ste_gradients_match_the_papers_pseudo_derivatives(gen, to_input):
    """to_input=False: the paper's estimator (threshold only); True: Anthropic's, where pre also receives the
    kernel term with the opposite sign (both outputs depend on pre - threshold)."""
    eps = 0.1
    pre, threshold = planted_pre(gen, eps)
    g_z = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    g_gate = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    p, t = pre.clone().requires_grad_(), threshold.clone().requires_grad_()
    z, gate = JumpReLUWithGate.apply(p, t, eps, to_input)
    ((z * g_z).sum() + (gate * g_gate).sum()).backward()

    want_z = torch.zeros_like(pre)
    want_gate = torch.zeros_like(pre)
    want_dpre = torch.zeros_like(pre)
    want_dt = torch.zeros_like(threshold)
    for b in range(pre.shape[0]):
        for i in range(pre.shape[1]):
            u, th = float(pre[b, i]), float(threshold[i])
            on = u > th
            want_z[b, i] = max(u, 0.0) if on else 0.0
            want_gate[b, i] = 1.0 if on else 0.0
            want_dpre[b, i] = g_z[b, i] if (on and u > 0) else 0.0  # the Heaviside passes nothing to pre
            k = rect((u - th) / eps)
            d_threshold = g_z[b, i] * (-(th / eps) * k) + g_gate[b, i] * (-(1 / eps) * k)
            want_dt[i] += d_threshold
            if to_input:
                want_dpre[b, i] -= d_threshold
    assert want_dt.abs().min() > 0  # every latent has entries inside the window
    torch.testing.assert_close(z, want_z, rtol=0, atol=0)
    torch.testing.assert_close(gate, want_gate, rtol=0, atol=0)
    torch.testing.assert_close(p.grad, want_dpre, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t.grad, want_dt, rtol=1e-12, atol=1e-12)


@needs_saelens
@pytest.mark.parametrize("to_input", [False, True])
def test_ste_gradients_equal_saelens_estimators(gen, to_input):
    """SAELens's JumpReLU / Step autograd functions agree (ste_to_input False: DeepMind's, True: Anthropic's)."""
    from sae_lens.saes.jumprelu_sae import JumpReLU, Step

    eps = 0.1
    pre, threshold = planted_pre(gen, eps)
    g_z, g_gate = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)
    grads = []
    for fn in ("ours", "theirs"):
        p, t = pre.clone().requires_grad_(), threshold.clone().requires_grad_()
        if fn == "ours":
            z, gate = JumpReLUWithGate.apply(p, t, eps, to_input)
        else:
            z, gate = JumpReLU.apply(p, t, eps, to_input), Step.apply(p, t, eps, to_input)
        ((z * g_z).sum() + (gate * g_gate).sum()).backward()
        grads.append((p.grad, t.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-12)


def training_sae(gen: torch.Generator, **fields) -> JumpReLUSAE:
    """A float64 SAE with random weights and thresholds near typical pre-activations."""
    cfg = JumpReLUConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64", bandwidth=0.05, target_l0=None, **fields)
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        sae.threshold.copy_(torch.rand(D_SAE, generator=gen, dtype=torch.float64) * 0.8)
    return sae


@pytest.mark.parametrize("penalty", ["l0", "tanh"])
def test_loss_gradients_match_a_float64_formula(gen, penalty):
    """d loss / d threshold and d loss / d b_enc of the full training loss (FVU + lambda * penalty),
    written out by hand: FVU = sum ||x - x_hat||^2 / D, D = sum ||x - mean x||^2."""
    from saelab.sae.base import TrainContext

    lam, c = 0.3, 2.0
    sae = training_sae(gen, sparsity_loss=penalty, sparsity_coefficient=lam, tanh_scale=c)
    x = torch.randn(32, D_IN, generator=gen, dtype=torch.float64) * 1.5
    ctx = TrainContext(step=0, total_steps=10, dead_mask=torch.zeros(D_SAE, dtype=torch.bool), any_dead=False)
    out = sae.training_forward(x, ctx)
    out.loss.backward()

    with torch.no_grad():
        W_enc, b_enc, W_dec, b_dec, th = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold)
        eps = sae.bandwidth
        assert math.isclose(eps, 0.05 * math.sqrt(D_IN))
        pre = (x - b_dec) @ W_enc + b_enc
        on = (pre > th).double()
        z = pre.clamp_min(0) * on
        x_hat = z @ W_dec + b_dec
        denom = (x - x.mean(0)).pow(2).sum()
        B = x.shape[0]
        dz = -2 * (x - x_hat) @ W_dec.T / denom  # d FVU / d z  [B, n]
        if penalty == "tanh":
            dz = dz + lam / B * c * (1 - torch.tanh(c * z) ** 2)
        window = (((pre - th) / eps).abs() < 0.5).double() / eps
        d_threshold = (dz * -th * window).sum(0)
        if penalty == "l0":
            d_threshold = d_threshold + lam / B * (-window).sum(0)
        d_pre = dz * on * (pre > 0)
        want_loss = (x - x_hat).pow(2).sum() / denom + lam * (
            on.sum(1).mean() if penalty == "l0" else torch.tanh(c * z).sum(1).mean()
        )
    assert window.sum() > 0  # some pre-activations fall inside the kernel window
    torch.testing.assert_close(out.loss.detach(), want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sae.threshold.grad, d_threshold, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sae.b_enc.grad, d_pre.sum(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.l0, (z > 0).double().sum(1).mean().float())


def test_dead_pre_act_loss_and_its_gradients_match_a_float64_formula(gen):
    """With dead latents the loss gains c * mean_b sum_{i dead} ReLU(threshold_i - pre_bi) ||W_dec,i||: its value
    and its share of d loss / d threshold and d loss / d b_enc, against the same training step without it."""
    from saelab.sae.base import TrainContext

    c = 0.7
    x = torch.randn(32, D_IN, generator=gen, dtype=torch.float64) * 1.5
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    runs = []
    for coef in (0.0, c):
        sae = training_sae(torch.Generator().manual_seed(5), pre_act_coef=coef, aux_k_coef=0.0)
        out = sae.training_forward(x, TrainContext(step=0, total_steps=10, dead_mask=dead, any_dead=True))
        out.loss.backward()
        runs.append((sae, out))
    (plain, plain_out), (sae, out) = runs
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        norms = sae.W_dec.norm(dim=1)
        below = (
            sae.threshold > pre
        ).double() * dead  # [B, n]: rows where a dead latent sits below its threshold
        want = (
            sum(
                max(float(sae.threshold[i] - pre[b, i]), 0.0) * float(norms[i])
                for b in range(x.shape[0])
                for i in range(D_SAE)
                if dead[i]
            )
            / x.shape[0]
        )
        B = x.shape[0]
    assert 0 < below.sum() < below.numel()
    torch.testing.assert_close(out.metrics["dead_pre_act"], torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(out.loss.detach(), plain_out.loss.detach() + c * want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sae.threshold.grad - plain.threshold.grad, c / B * (below * norms).sum(0))
    torch.testing.assert_close(sae.b_enc.grad - plain.b_enc.grad, -c / B * (below * norms).sum(0))


def test_the_pre_act_loss_revives_latents_whose_threshold_is_out_of_reach():
    """16 latents start with thresholds above all their pre-activations by more than the STE kernel reaches, so
    the FVU and the L0 term never move them (nor AuxK, off here): without the pre-act loss none of them fires in
    the whole run, with the default most fire again (whether they then stay alive is up to the FVU and the L0 term: here the other
    latents already cover the planted features)."""
    source = SyntheticSource(SOURCE)
    revived = {}
    for coef in (0.0, JumpReLUConfig.pre_act_coef):
        cfg = JumpReLUConfig(d_in=SOURCE.d_in, d_sae=128, target_l0=None, pre_act_coef=coef, aux_k_coef=0.0)
        sae = build_sae(cfg, torch.Generator().manual_seed(4))
        trainer = Trainer(
            sae, TrainerConfig(total_tokens=1500 * 128, batch_size=128, device="cpu", dead_window_tokens=2560)
        )
        trainer.prepare(source.batch(0, 128))
        with torch.no_grad():
            pre = sae.pre_activations(source.batch(1, 32768) * trainer.input_scale)
            sae.threshold[:16] = pre[:, :16].max(dim=0).values + 0.6  # the STE kernel's half-width is 0.14
        fired = torch.zeros(16, dtype=torch.bool)
        for step in range(1500):
            fired |= trainer.train_step(source.batch(step, 128)).fired[:16]
            trainer.periodic_checks()
        revived[coef] = int(fired.sum())
    assert revived[0.0] == 0
    assert revived[JumpReLUConfig.pre_act_coef] >= 12


def test_a_fixed_sparsity_coefficient_warms_up_linearly():
    from saelab.sae.base import TrainContext

    cfg = JumpReLUConfig(d_in=4, d_sae=8, sparsity_coefficient=2.0, sparsity_warmup_frac=0.1, target_l0=None)
    sae = JumpReLUSAE(cfg)
    for step, want in ((0, 0.2), (4, 1.0), (9, 2.0), (50, 2.0)):
        ctx = TrainContext(step, 100, torch.zeros(8, dtype=torch.bool), any_dead=False)
        got = sae.sparsity_control.coefficient(torch.tensor(3.0), ctx)  # no target: the L0 is ignored
        assert got == pytest.approx(want)


def test_threshold_starts_at_init_threshold_in_the_papers_units():
    sae = JumpReLUSAE(JumpReLUConfig(d_in=16, d_sae=8, init_threshold=0.002))
    # inputs at E||x|| = sqrt(16) are 4x the paper's unit-mean-squared-norm inputs
    torch.testing.assert_close(sae.threshold.detach(), torch.full((8,), 0.008))


def test_init_scales_the_encoder_to_the_least_squares_fit(gen):
    """After the data-dependent init, the reconstruction (without b_dec) of the centred sample needs no further
    positive rescaling: d/ds ||c - s x_hat||^2 = 0 at s = 1 (threshold 0, so the scale cannot move a gate)."""
    cfg = JumpReLUConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64", init_threshold=0.0, target_l0=None)
    sae = JumpReLUSAE(cfg)
    x = torch.randn(256, D_IN, generator=gen, dtype=torch.float64) + 2.0
    before = sae.W_enc.detach().clone()
    sae.initialize_from_sample(x)
    centred = x - sae.b_dec
    x_hat = sae.encode(x) @ sae.W_dec
    assert not torch.allclose(sae.W_enc, before)
    torch.testing.assert_close((centred * x_hat).sum(), x_hat.pow(2).sum(), rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sparsity_loss", "l1"),
        ("sparsity_coefficient", -1.0),
        ("bandwidth", 0.0),
        ("sparsity_warmup_frac", 2.0),
        ("target_l0", 0.0),
        ("topk_warmup_frac", 1.5),
    ],
)
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"sae.{field}"):
        JumpReLUSAE(JumpReLUConfig(d_in=4, d_sae=8, **{field: value}))


def test_inference_rule_is_relu_then_threshold(gen):
    sae = training_sae(gen)
    with torch.no_grad():
        sae.threshold[:4] = -0.2  # a negative threshold must still not pass negative pre-activations
    x = torch.randn(50, D_IN, generator=gen, dtype=torch.float64)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    want = torch.where((pre > sae.threshold) & (pre > 0), pre, torch.zeros_like(pre))
    z = sae.encode(x).detach()
    assert (z > 0).any() and (z == 0).any()
    torch.testing.assert_close(z, want, rtol=0, atol=0)


# ------------------------------------------------------------------ training on planted features
SOURCE = SyntheticConfig(d_in=32, n_features=64, mean_active=3.0, seed=3)


@pytest.fixture(scope="module")
def trained() -> tuple[JumpReLUSAE, SyntheticSource]:
    """The defaults (TopK warm-up, target-L0 controller, lr) at target L0 4 on planted features (3 active per
    row): a short CPU run (one thread, as the benchmarks: on a loaded 2-core machine more threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        source = SyntheticSource(SOURCE)
        cfg = JumpReLUConfig(d_in=SOURCE.d_in, d_sae=256, target_l0=4)
        sae = build_sae(cfg, torch.Generator().manual_seed(11))
        cfg = TrainerConfig(total_tokens=2500 * 256, batch_size=256, device="cpu", log_every=500)
        return Trainer(sae, cfg).fit(source).sae, source
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_training_recovers_planted_features(trained):
    sae, source = trained
    metrics = recovery_metrics(source.features, sae.W_dec.detach())
    x = source.batch(10**7, 4096)
    z = sae.encode(x).detach()
    fvu = ((x - sae.decode(z)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    l0 = (z > 0).sum(1).double().mean().item()
    assert metrics["frac_recovered"] >= 0.95, metrics  # 100% with this seed
    assert 2 <= l0 <= 6, l0  # 3 features active per row on average
    assert fvu < 0.15, fvu
    assert (sae.threshold > 0).all() and sae.threshold.std() > 0  # thresholds learned per latent


@needs_saelens
@pytest.mark.slow
def test_saved_trained_sae_loads_in_saelens_with_the_same_codes(trained, tmp_path):
    sae, source = trained
    sae.save(tmp_path / "jr")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "jr")
    assert type(theirs).__name__ == "JumpReLUSAE"
    back = load_sae(tmp_path / "jr")
    assert type(back) is JumpReLUSAE and torch.equal(back.threshold, sae.threshold)
    x = source.batch(10**7 + 1, 512)
    with torch.no_grad():
        z = sae.encode(x)
        assert (z > 0).any()
        torch.testing.assert_close(theirs.encode(x), z, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(back.encode(x), z, rtol=0, atol=0)
        torch.testing.assert_close(theirs.decode(z), sae.decode(z), rtol=1e-6, atol=1e-6)


def test_yaml_holds_the_config_defaults():
    """`sae=jumprelu` on the command line trains with the measured defaults of the dataclass."""
    from pathlib import Path

    from omegaconf import OmegaConf

    import saelab

    yaml = OmegaConf.to_container(
        OmegaConf.load(Path(saelab.__file__).parent / "configs" / "sae" / "jumprelu.yaml")
    )
    yaml.pop("defaults")
    defaults = JumpReLUConfig()
    assert yaml == {name: getattr(defaults, name) for name in yaml}
    assert set(yaml) >= {"sparsity_loss", "sparsity_coefficient", "sparsity_warmup_frac", "bandwidth"}

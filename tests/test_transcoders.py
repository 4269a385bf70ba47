"""Transcoders (saelab.sae.transcoder): every transcodable variant's training pass against a float64 autograd
reference written here, the data-dependent init, folding, files, refusals, and training on planted pairs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import Tensor

from saelab import load_sae
from saelab.app.cli import main
from saelab.core.seeds import generator
from saelab.sae import build_sae, get_sae_class
from saelab.sae.base import TrainContext
from saelab.sae.transcoder import TRANSCODABLE, resolve_for_data, transcoder_class
from saelab.sources.pairs import PairsConfig, PairsSource
from saelab.sources.synthetic import recovery_metrics
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

D_IN, D_OUT, N, K, B = 6, 5, 24, 3, 32
VARIANTS = sorted(cls.architecture for cls in TRANSCODABLE)
CASES = [(v, skip) for v in VARIANTS for skip in (False, True)]


def make(variant: str, skip: bool, **fields) -> torch.nn.Module:
    """A float64 transcoder with random parameters, input bias and target scale (a trained-looking state)."""
    cls = transcoder_class(variant, skip)
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    extra = {"k": K} if "k" in names else {}
    if variant == "jumprelu":
        extra["bandwidth"] = 0.3  # wide enough that the straight-through window holds some entries
    if "target_l0" in names:  # the fixed coefficient the references transcribe, not the target-L0 controller
        extra["target_l0"] = None
    if "topk_warmup_frac" in names:  # the paper's selection from the first step, not the per-row TopK warm-up
        extra["topk_warmup_frac"] = 0.0
    cfg = cls.config_class(d_in=D_IN, d_sae=N, d_out=D_OUT, dtype="float64", **extra, **fields)
    torch.manual_seed(3)
    sae = cls(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.rand_like(p) * 0.5 if name == "threshold" else torch.randn_like(p) * 0.4)
        sae.b_in.normal_()
        sae.target_scale.fill_(1.3)
    return sae


def rows(seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D_IN + D_OUT, generator=g, dtype=torch.float64) * 2


def fvu(y: Tensor, y_hat: Tensor) -> Tensor:
    return (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()


class Heaviside(torch.autograd.Function):
    """H(pre - t) with JumpReLU's straight-through threshold gradient -(1/eps) K((pre - t) / eps)."""

    @staticmethod
    def forward(ctx, pre: Tensor, t: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, t)
        ctx.eps = eps
        return (pre > t).double()

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, t = ctx.saved_tensors
        window = ((pre - t).abs() < ctx.eps / 2).double() / ctx.eps
        return None, -(grad * window).sum(0), None


def reference_loss(sae, data: Tensor, step: int, total: int) -> Tensor:
    """The variant's loss, by its paper's formula in float64 autograd, on y (times target_scale) predicted from x."""
    p = dict(sae.named_parameters())
    if sae.is_transcoder:
        x, y = data[:, :D_IN], data[:, D_IN:] * sae.target_scale
        u, variant = x - sae.b_in, sae.plain_class.architecture
    else:  # the SAE itself: y is x, centred by b_dec
        x = y = data[:, :D_IN]
        u, variant = x - p["b_dec"], sae.cfg.architecture
    skip = x @ p["W_skip"].T if "W_skip" in p else torch.zeros(())
    if variant == "gated":
        gate = u @ p["W_enc"] + p["b_gate"]
        z = (gate > 0) * (u @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"]).relu()
        y_hat = z @ p["W_dec"] + p["b_dec"] + skip
        via = gate.relu() @ p["W_dec"].detach() + p["b_dec"].detach() + skip.detach()
        lam = sae.cfg.l1_coefficient * min(1.0, (step + 1) / (sae.cfg.l1_warmup_frac * total))
        sq = (y - y_hat).pow(2).sum(1).mean()
        return sq + lam * gate.relu().sum(1).mean() + (y - via).pow(2).sum(1).mean()
    pre = u @ p["W_enc"] + p["b_enc"]
    if variant == "relu":
        z = pre.relu()
        y_hat = z @ p["W_dec"] + p["b_dec"] + skip
        lam = sae.cfg.l1_coefficient * min(1.0, (step + 1) / (sae.cfg.l1_warmup_frac * total))
        return (y - y_hat).pow(2).sum(1).mean() + lam * (z * p["W_dec"].norm(dim=1)).sum(1).mean()
    if variant == "jumprelu":
        eps = sae.cfg.bandwidth * math.sqrt(D_IN)
        gate = Heaviside.apply(
            pre, p["threshold"], eps
        )  # d z / d threshold := threshold * d gate / d threshold
        z = pre.relu() * (pre > p["threshold"]) + p["threshold"].detach() * (gate - gate.detach())
        y_hat = z @ p["W_dec"] + p["b_dec"] + skip
        lam = sae.cfg.sparsity_coefficient * min(1.0, (step + 1) / (sae.cfg.sparsity_warmup_frac * total))
        return fvu(y, y_hat) + lam * gate.sum(1).mean()
    if variant == "topk":
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, pre.topk(K, dim=1).indices, True)
    else:  # batchtopk, matryoshka: the batch's B * K largest
        keep = pre >= pre.flatten().topk(B * K).values.min()
    z = pre.relu() * keep
    if variant != "matryoshka":
        return fvu(y, z @ p["W_dec"] + p["b_dec"] + skip)
    ends = torch.tensor(sae.group_sizes).cumsum(0).tolist()
    return torch.stack([fvu(y, z[:, :m] @ p["W_dec"][:m] + p["b_dec"] + skip) for m in ends]).mean()


@pytest.mark.parametrize(("variant", "skip"), CASES)
def test_training_pass_equals_the_float64_reference(variant, skip):
    """Loss and every parameter's gradient of the transcoder's training pass (the variant's own code with its
    target and skip term) equal the paper formula applied to (x, y) in float64 autograd."""
    sae = make(variant, skip)
    data = rows()
    ctx = TrainContext(step=2, total_steps=10, dead_mask=torch.zeros(N, dtype=torch.bool), any_dead=False)
    got = sae.training_forward(data, ctx)
    params = dict(sae.named_parameters())
    got_grads = dict(zip(params, torch.autograd.grad(got.loss, list(params.values())), strict=True))
    want = reference_loss(sae, data, 2, 10)
    want_grads = dict(zip(params, torch.autograd.grad(want, list(params.values())), strict=True))
    assert float(got.loss) == pytest.approx(float(want), rel=1e-10)
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-9, atol=1e-11, msg=f"{variant} {name}")
        assert float(g.abs().sum()) > 0 or name == "threshold" and variant != "jumprelu", name  # all trained


def test_gated_sae_training_pass_equals_the_float64_reference():
    """The gated SAE itself (Rajamanoharan et al.'s three terms on x)."""
    from saelab.sae.gated import GatedConfig, GatedSAE

    torch.manual_seed(4)
    sae = GatedSAE(GatedConfig(d_in=D_IN, d_sae=N, dtype="float64", target_l0=None))  # the fixed lambda
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.4)
    data = rows(4)
    ctx = TrainContext(step=0, total_steps=100, dead_mask=torch.zeros(N, dtype=torch.bool), any_dead=False)
    got = sae.training_forward(data[:, :D_IN], ctx)
    want = reference_loss(sae, data, 0, 100)
    assert float(got.loss) == pytest.approx(float(want), rel=1e-10)
    params = list(sae.parameters())
    for g, w in zip(torch.autograd.grad(got.loss, params), torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_gated_dead_latents_pre_act_term_equals_the_float64_reference():
    """With dead latents the gated loss gains pre_act_coef * mean_b sum_{i dead} ReLU(-pi_gate_bi) ||W_dec,i||,
    written out here with a loop over rows and latents; loss and every gradient match."""
    from saelab.sae.gated import GatedConfig, GatedSAE

    torch.manual_seed(4)
    c = 0.3
    sae = GatedSAE(GatedConfig(d_in=D_IN, d_sae=N, dtype="float64", target_l0=None, pre_act_coef=c))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.4)
    data = rows(4)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[1::4] = True
    got = sae.training_forward(
        data[:, :D_IN], TrainContext(step=0, total_steps=100, dead_mask=dead, any_dead=True)
    )
    x = data[:, :D_IN]
    gate_pre = (x - sae.b_dec) @ sae.W_enc + sae.b_gate
    term = (
        sum(
            (-gate_pre[b, i]).clamp_min(0) * sae.W_dec[i].norm()
            for b in range(x.shape[0])
            for i in range(N)
            if dead[i]
        )
        / x.shape[0]
    )
    want = reference_loss(sae, data, 0, 100) + c * term
    assert float(term) > 0
    assert float(got.metrics["dead_pre_act"]) == pytest.approx(float(term), rel=1e-10)
    assert float(got.loss) == pytest.approx(float(want), rel=1e-10)
    params = list(sae.parameters())
    for g, w in zip(torch.autograd.grad(got.loss, params), torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_auxk_fits_the_residual_of_the_target():
    """TopK's AuxK on a transcoder: dead latents' codes of x, decoded, fit y's residual after the prediction."""
    sae = make("topk", True)
    data = rows(1)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[:10] = True
    ctx = TrainContext(step=0, total_steps=10, dead_mask=dead, any_dead=True)
    got = sae.training_forward(data, ctx)
    p = dict(sae.named_parameters())
    x, y = data[:, :D_IN], data[:, D_IN:] * sae.target_scale
    pre = (x - sae.b_in) @ p["W_enc"] + p["b_enc"]
    z = pre.relu() * torch.zeros_like(pre, dtype=torch.bool).scatter_(1, pre.topk(K, dim=1).indices, True)
    y_hat = z @ p["W_dec"] + p["b_dec"] + x @ p["W_skip"].T
    aux_k = D_IN // 2
    dead_pre = pre.masked_fill(~dead, -torch.inf)
    codes = torch.zeros_like(pre).scatter(
        1, dead_pre.topk(aux_k, dim=1).indices, dead_pre.topk(aux_k, dim=1).values
    )
    residual = y - y_hat.detach()
    auxk = min(10 / aux_k, 1.0) * fvu(residual, codes.relu() @ p["W_dec"])
    want = fvu(y, y_hat) + sae.cfg.aux_k_coef * auxk
    assert float(got.metrics["auxk"]) == pytest.approx(float(auxk), rel=1e-10)
    assert float(got.loss) == pytest.approx(float(want), rel=1e-10)
    for (name, param), g in zip(p.items(), torch.autograd.grad(want, list(p.values())), strict=True):
        torch.testing.assert_close(torch.autograd.grad(got.loss, param, retain_graph=True)[0], g, msg=name)


def test_forward_and_files_are_the_raw_pair_map(tmp_path):
    """forward(x) = codes @ W_dec + b_dec + x @ W_skip^T; after folding the trainer's scale s the transcoder maps
    raw x to raw y: f_raw(x) = f_train(s x) / (s * target_scale); saved files hold no b_in and reload equal."""
    sae = make("jumprelu", True).eval()
    x = rows(2)[:, :D_IN]
    with torch.no_grad():
        pre = (x - sae.b_in) @ sae.W_enc + sae.b_enc
        z = pre.relu() * (pre > sae.threshold)
        torch.testing.assert_close(sae(x), z @ sae.W_dec + sae.b_dec + x @ sae.W_skip.T)
        torch.testing.assert_close(sae.decode(sae.encode(x)), z @ sae.W_dec + sae.b_dec)  # no skip term
        s = 0.7
        train_space = sae(s * x) / (s * 1.3)
        sae.fold_input_scale(s)
        assert float(sae.target_scale) == 1.0
        torch.testing.assert_close(sae(x), train_space)
    folder = sae.save(tmp_path / "tc")
    with open(folder / "cfg.json") as f:
        assert json.load(f)["apply_b_dec_to_input"] is False
    back = load_sae(folder)
    assert float(back.b_in.abs().sum()) == 0.0 and type(back) is type(sae)
    with torch.no_grad():
        torch.testing.assert_close(back(x), sae(x))


@pytest.mark.parametrize("skip_init", ["lstsq", "zero"])
def test_init_from_the_first_batch(skip_init):
    """target_scale = sqrt(d_out) / mean ||y||; b_in the geometric median of x (its optimality condition);
    W_skip the least-squares fit of y on x (normal equations) or zero; b_dec the median of the residual."""
    sae = make("topk", True, skip_init=skip_init)
    data = rows(3)
    sae.initialize_from_sample(data)
    x, y = data[:, :D_IN], data[:, D_IN:]
    scale = math.sqrt(D_OUT) / float(y.norm(dim=1).mean())
    assert float(sae.target_scale) == pytest.approx(scale, rel=1e-12)
    y = y * scale
    unit = (x - sae.b_in) / (x - sae.b_in).norm(dim=1, keepdim=True)
    assert float(unit.sum(0).norm()) < 1e-4 * B  # the sum of unit vectors to the median vanishes
    if skip_init == "zero":
        assert float(sae.W_skip.abs().sum()) == 0.0
    else:
        xc, yc = x - x.mean(0), y - y.mean(0)
        normal = xc.T @ (yc - xc @ sae.W_skip.T)
        assert float(normal.abs().max()) < 1e-4
    residual = y - x @ sae.W_skip.T - sae.b_dec
    assert float((residual / residual.norm(dim=1, keepdim=True)).sum(0).norm()) < 1e-4 * B


def test_refusals_name_why():
    for name in ("mp_transcoder", "gba_skip_transcoder"):
        with pytest.raises(ValueError, match=r"is not available: .*(matching pursuit|group bias adaptation)"):
            get_sae_class(name)
    cfg = transcoder_class("topk").config_class(k=4)
    with pytest.raises(ValueError, match=r"is a transcoder: .*Set source\.target_hook"):
        resolve_for_data(cfg, 16, None)
    with pytest.raises(ValueError, match=r"yields \(input, target\) pairs but .*sae=topk_transcoder"):
        resolve_for_data(get_sae_class("topk").config_class(k=4), 16, 12)
    assert resolve_for_data(cfg, 16, 12).d_out == 12
    with pytest.raises(ValueError, match=r"sae\.d_out=3 but the source's target activations have width 12"):
        resolve_for_data(dataclasses.replace(cfg, d_out=3), 16, 12)
    with pytest.raises(ValueError, match=r"sae\.skip_init='ones' must be one of"):
        transcoder_class("relu", True).config_class(d_in=4, d_sae=8, d_out=3, skip_init="ones").validate()


def test_planted_pairs_are_x_and_y_of_the_same_codes():
    """x = a F + noise, y = a G + x L^T: with the codes drawn again from the batch's stream both are rebuilt."""
    source = PairsSource(
        PairsConfig(d_in=8, d_out=6, n_features=20, mean_active=3, noise_std=0.0, linear_scale=0.5)
    )
    batch = source.batch(4, 50)
    assert batch.shape == (50, 14) and source.linear is not None
    x, y = batch[:, :8], batch[:, 8:]
    from saelab.core.seeds import generator

    codes = source.sample_codes(50, generator(0, "synthetic.batch", 4))
    torch.testing.assert_close(x, codes @ source.input_features)
    torch.testing.assert_close(y, codes @ source.features + x @ source.linear.T)
    assert torch.allclose(source.features.norm(dim=1), torch.ones(20))
    assert source.metadata()["source"] == "pairs"


def test_a_transcoder_recovers_planted_pairs():
    """Trained on planted pairs, a TopK transcoder predicts y (FVU on held-out pairs) and its decoder rows find
    the target features G; its untrained start does neither."""
    source = PairsSource(
        PairsConfig(d_in=16, d_out=12, n_features=32, mean_active=2, min_magnitude=1.0, max_magnitude=2.0)
    )
    cfg = resolve_for_data(transcoder_class("topk").config_class(d_sae=64, k=4), 16, 12)
    sae = build_sae(cfg, generator(0, "sae.init"))
    untrained = recovery_metrics(source.features, sae.W_dec.detach())
    result = Trainer(sae, TrainerConfig(total_tokens=200 * 256, batch_size=256, device="cpu")).fit(source)
    x, y = source.pair(10**6, 2000)
    with torch.no_grad():
        held_out = float(fvu(y.double(), result.sae(x).double()))
    found = recovery_metrics(source.features, result.sae.W_dec.detach())
    assert held_out < 0.4 and found["mmcs"] > 0.8 > 0.7 > untrained["mmcs"]


def test_train_and_eval_a_transcoder_from_the_command_line(tmp_path):
    """`saelab train sae=relu_skip_transcoder source=pairs` writes a transcoder whose summary has both
    recoveries, and `saelab eval` scores its prediction of y on held-out pairs."""
    run = tmp_path / "run"
    main([
        "train", "sae=relu_skip_transcoder", "source=pairs", "source.d_in=16", "source.d_out=12",
        "source.n_features=32", "trainer.total_tokens=8192", "trainer.batch_size=512", "trainer.device=cpu",
        "logging.progress=false", f"hydra.run.dir={run}",
    ])  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert {"mmcs", "encoder_mmcs", "fvu"} <= set(summary)
    sae = load_sae(run)
    assert type(sae) is transcoder_class("relu", True) and (sae.d_in, sae.d_out) == (16, 12)
    main([
        "eval", f"sae={run}", "source=pairs", "source.d_in=16", "source.d_out=12", "source.n_features=32",
        "eval.total_tokens=2048", "eval.batch_size=512", "eval.plots=false", "logging.progress=false",
        f"output_dir={tmp_path / 'eval'}", f"hydra.run.dir={tmp_path / 'evalrun'}",
    ])  # fmt: skip
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    start = report["data"]["start_batch"]
    assert report["data"]["held_out"] is True and start >= 16  # past the 16 training batches
    source = PairsSource(PairsConfig(d_in=16, d_out=12, n_features=32))
    x, y = (torch.cat(t) for t in zip(*(source.pair(b, 512) for b in range(start, start + 4)), strict=True))
    with torch.no_grad():
        want = float(fvu(y.double(), sae(x).double()))
    assert report["reconstruction"]["fvu"] == pytest.approx(want, rel=1e-5)
    assert {"recovery", "recovery_encoder"} <= set(report)


def test_a_plain_synthetic_source_is_refused_for_a_transcoder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "sae=topk_transcoder", "trainer.device=cpu", f"hydra.run.dir={tmp_path}"])
    assert "source.kind='synthetic' yields single activations" in capsys.readouterr().err
    assert not (tmp_path / "sae").exists()

"""BatchTopK SAE: batch-level selection and the inference threshold against hand computations, save/load, CLI."""

import pytest
import torch

from saelab import load_sae
from saelab.app.cli import main
from saelab.sae.base import TrainContext
from saelab.sae.batchtopk import BatchTopKConfig, BatchTopKSAE


def make_sae(k=3, decay=0.9, seed=0, warmup=0.0) -> BatchTopKSAE:
    torch.manual_seed(seed)
    cfg = BatchTopKConfig(
        d_in=6, d_sae=20, k=k, threshold_decay=decay, dtype="float64", topk_warmup_frac=warmup
    )
    sae = BatchTopKSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.3)
        sae.b_dec.normal_()
    return sae


def context(dead=None, step=0) -> TrainContext:
    dead = torch.zeros(20, dtype=torch.bool) if dead is None else dead
    return TrainContext(step=step, total_steps=100, dead_mask=dead, any_dead=bool(dead.any()))


def reference_batch_codes(sae, x, k):
    """Dense codes keeping the B*k largest pre-activations of the whole batch (sorted in Python), ReLU'd."""
    with torch.no_grad():
        pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).tolist()
    entries = sorted(((v, b, i) for b, row in enumerate(pre) for i, v in enumerate(row)), reverse=True)
    z = torch.zeros(len(pre), len(pre[0]), dtype=torch.float64)
    for v, b, i in entries[: len(pre) * k]:
        z[b, i] = max(v, 0.0)
    return z


def test_training_keeps_the_batch_top_b_times_k_and_decodes_them():
    sae = make_sae(k=3)
    x = torch.randn(8, 6, dtype=torch.float64) * 2
    z = reference_batch_codes(sae, x, 3)
    assert len(set((z > 0).sum(dim=1).tolist())) > 1  # rows really use different numbers of latents
    out = sae.training_forward(x, context())
    torch.testing.assert_close(out.x_hat, z @ sae.W_dec.detach() + sae.b_dec.detach())
    torch.testing.assert_close(out.l0, (z > 0).sum(dim=1).double().mean().to(out.l0.dtype))
    assert torch.equal(out.fired, (z > 0).any(dim=0))
    out.loss.backward()  # gradients reach the encoder only through kept latents
    assert torch.equal(sae.W_enc.grad.abs().sum(dim=0) > 0, (z > 0).any(dim=0))


def test_topk_warmup_keeps_each_rows_top_k_then_the_batch_top():
    """topk_warmup_frac 0.3 of 100 steps: steps 0-29 keep each row's k largest (sorted in Python), from step 30
    the batch's B*k largest; the threshold moves only in the batch-level steps."""
    sae = make_sae(k=3, warmup=0.3)
    sae.threshold.fill_(0.25)
    x = torch.randn(8, 6, dtype=torch.float64) * 2
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    rows = torch.zeros_like(pre)
    for b, row in enumerate(pre.tolist()):
        for i in sorted(range(20), key=lambda i: -row[i])[:3]:
            rows[b, i] = max(row[i], 0.0)
    out = sae.training_forward(x, context(step=29))
    torch.testing.assert_close(out.x_hat, rows @ sae.W_dec.detach() + sae.b_dec.detach())
    assert float(sae.threshold) == 0.25
    out = sae.training_forward(x, context(step=30))
    batch = reference_batch_codes(sae, x, 3)
    torch.testing.assert_close(out.x_hat, batch @ sae.W_dec.detach() + sae.b_dec.detach())
    assert float(sae.threshold) == pytest.approx(0.9 * 0.25 + 0.1 * batch[batch > 0].min().item(), rel=1e-12)


def test_init_sets_the_threshold_at_the_samples_batch_cutoff():
    """After the data-dependent init every checkpoint has a threshold: the N * k-th largest pre-activation of
    the sample (computed after the init's encoder scaling)."""
    sae = make_sae(k=2)
    x = torch.randn(30, 6, dtype=torch.float64) + 1.0
    sae.initialize_from_sample(x)
    with torch.no_grad():
        pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).reshape(-1)
    assert float(sae.threshold) == pytest.approx(
        pre.sort(descending=True).values[30 * 2 - 1].item(), rel=1e-12
    )


@pytest.mark.parametrize("heavy", [12, 40])
def test_selection_is_exact_when_one_row_holds_much_of_the_batch_top(heavy):
    """Row 0 holds `heavy` of the batch's largest entries, more than the 4k candidates a row first offers:
    12 (one doubling of the candidates suffices) or 40 (all B * k = 32 kept entries lie in row 0, candidates
    grow to the whole row). The kept set must still be the batch's exact top B * k (sorted in Python)."""
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(16, 64, generator=g, dtype=torch.float64)
    pre[0, :heavy] += 10.0
    sae = BatchTopKSAE(BatchTopKConfig(d_in=4, d_sae=64, k=2, dtype="float64"))
    values, indices = sae.select(pre.clone(), 2)
    entries = sorted(
        ((v, b, i) for b, row in enumerate(pre.tolist()) for i, v in enumerate(row)), reverse=True
    )
    expected = torch.zeros_like(pre)
    for v, b, i in entries[:32]:
        expected[b, i] = max(v, 0.0)
    got = torch.zeros_like(pre).scatter_(1, indices, values)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert values.shape[1] == (32 if heavy == 40 else (expected > 0).sum(dim=1).max().item())


def test_threshold_is_the_running_average_of_the_smallest_kept_value():
    sae = make_sae(k=3, decay=0.9)
    assert torch.isnan(sae.threshold)
    batches = [torch.randn(8, 6, dtype=torch.float64) * 2 for _ in range(3)]
    expected = None
    for x in batches:
        z = reference_batch_codes(sae, x, 3)
        smallest = z[z > 0].min().item()
        expected = smallest if expected is None else 0.9 * expected + 0.1 * smallest
        sae.training_forward(x, context())
    assert float(sae.threshold) == pytest.approx(expected, rel=1e-12)


def test_inference_uses_the_threshold_not_the_batch():
    sae = make_sae()
    x = torch.randn(5, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="threshold"):
        sae.encode(x)
    sae.threshold.fill_(0.4)
    with torch.no_grad():
        pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).tolist()
        expected = torch.tensor([[v if v > 0.4 else 0.0 for v in row] for row in pre], dtype=torch.float64)
        torch.testing.assert_close(sae.encode(x), expected)
        torch.testing.assert_close(
            sae.encode(x[:1]), expected[:1]
        )  # a row's codes do not depend on the batch
        torch.testing.assert_close(sae(x), expected @ sae.W_dec + sae.b_dec)
        values, indices = sae.encode_sparse(x)
        dense = torch.zeros(5, 20, dtype=torch.float64).scatter_add_(1, indices, values)
        torch.testing.assert_close(dense, expected)


def test_fold_input_scale_keeps_codes_so_the_threshold_still_applies():
    sae = make_sae()
    sae.threshold.fill_(0.3)
    x = torch.randn(7, 6, dtype=torch.float64)
    with torch.no_grad():
        codes, x_hat = sae.encode(4.0 * x), sae(4.0 * x)
        sae.fold_input_scale(4.0)
        torch.testing.assert_close(sae.encode(x), codes)
        torch.testing.assert_close(sae(x), x_hat / 4.0)


def test_auxk_reaches_dead_latents():
    sae = make_sae()
    dead = torch.zeros(20, dtype=torch.bool)
    dead[10:] = True
    out = sae.training_forward(torch.randn(16, 6, dtype=torch.float64), context(dead))
    assert "auxk" in out.metrics and out.metrics["auxk"] > 0
    out.loss.backward()
    assert sae.W_dec.grad[10:].abs().sum() > 0


def test_saves_loads_and_trains_from_the_cli(tmp_path):
    main([
        "train", "sae=batchtopk", "sae.k=4", "sae.expansion_factor=4", "source.d_in=16", "source.n_features=32",
        "trainer.total_tokens=8192", "trainer.batch_size=512", "trainer.device=cpu", "logging.progress=false",
        f"hydra.run.dir={tmp_path}",
    ])  # fmt: skip
    sae = load_sae(tmp_path / "sae")
    assert isinstance(sae, BatchTopKSAE) and float(sae.threshold) > 0
    sae.save(tmp_path / "again")
    again = load_sae(tmp_path / "again")
    assert float(again.threshold) == float(sae.threshold)
    x = torch.randn(8, 16)
    torch.testing.assert_close(again(x), sae(x))
    with pytest.raises(ValueError, match="threshold_decay"):
        BatchTopKConfig(d_in=4, d_sae=8, k=2, threshold_decay=1.0).validate()


def test_summary_figures_are_those_of_the_saved_threshold_encoder(tmp_path):
    """The saved SAE encodes with its threshold, not the batch top-(B * k) of training (whose L0 is exactly k):
    summary.json's fvu and l0 are the saved SAE's on the run's last batch, recomputed here in float64 from the
    saved files."""
    import json

    from safetensors.torch import load_file

    from saelab.sources.synthetic import SyntheticConfig, SyntheticSource

    main([
        "train", "sae=batchtopk", "sae.k=4", "sae.expansion_factor=4", "source.d_in=16", "source.n_features=32",
        "trainer.total_tokens=4096", "trainer.batch_size=512", "trainer.device=cpu", "logging.progress=false",
        f"hydra.run.dir={tmp_path}",
    ])  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    w = {k: v.double() for k, v in load_file(str(tmp_path / "sae" / "sae_weights.safetensors")).items()}
    last = summary["steps"] - 1  # no held-out batches: training read batches 0 .. steps - 1
    x = SyntheticSource(SyntheticConfig(d_in=16, n_features=32)).batch(last, 512).double()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    z = pre * (pre > w["threshold"])
    x_hat = z @ w["W_dec"] + w["b_dec"]
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert summary["l0"] == pytest.approx((z != 0).sum(1).double().mean().item(), rel=1e-6)
    assert summary["l0"] != 4.0  # the training rule's figure would be exactly k
    assert summary["fvu"] == pytest.approx(fvu.item(), rel=1e-4)


def test_reported_dead_fraction_is_that_of_the_saved_threshold_encoder():
    """TrainResult.dead_fraction (summary.json's dead_frac) counts latents the saved SAE's threshold encoder leaves
    silent over the dead window, not the training selection's. Per-row selection throughout (topk_warmup_frac 1)
    with a rate too small to move the weights keeps the threshold where the init left it (here twice the first
    batch's cutoff); the reference replays the window's batches through the saved SAE (float64 pre-activations)."""
    from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
    from saelab.train.config import TrainerConfig
    from saelab.train.trainer import Trainer

    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=64, mean_active=3, seed=4))
    torch.manual_seed(0)
    sae = BatchTopKSAE(BatchTopKConfig(d_in=16, d_sae=128, k=4, topk_warmup_frac=1.0))
    initialize = sae.initialize_from_sample

    def initialize_then_raise_the_threshold(x: torch.Tensor) -> None:
        """Twice the first batch's cutoff: the threshold encoder silences latents that per-row top k selects."""
        initialize(x)
        with torch.no_grad():
            sae.threshold.mul_(2.0)

    sae.initialize_from_sample = initialize_then_raise_the_threshold
    cfg = TrainerConfig(
        total_tokens=12 * 256,
        batch_size=256,
        lr=1e-12,
        dead_window_tokens=4 * 256,
        device="cpu",
        log_every=100,
    )
    trainer = Trainer(sae, cfg)
    result = trainer.fit(source)
    saved = {k: v.double() for k, v in result.sae.state_dict().items()}
    fired = torch.zeros(128, dtype=torch.bool)
    for step in range(8, 12):  # the window: the last 4 batches (no held-out batches, so batch index = step)
        x = source.batch(step, 256).double()
        pre = (x - saved["b_dec"]) @ saved["W_enc"] + saved["b_enc"]
        fired |= (pre > saved["threshold"]).any(dim=0)
    want = 1.0 - fired.double().mean().item()
    assert result.dead_fraction == pytest.approx(want, abs=1 / 128 + 1e-9)
    assert result.final_metrics["dead_frac"] == result.dead_fraction
    training_rule, _ = trainer.tracker.reported_dead()  # what the summary reported before
    assert abs(training_rule - want) > 0.1, (training_rule, want)

"""Trainer defaults: bf16 autocast on CUDA only ("auto")."""

from __future__ import annotations

import pytest
import torch

from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer, resolve_autocast


def test_autocast_default_is_auto_and_off_on_cpu() -> None:
    cfg = TrainerConfig(total_tokens=64, batch_size=32, device="cpu")
    assert cfg.autocast_dtype == "auto"
    trainer = Trainer(TopKSAE(TopKConfig(d_in=8, d_sae=16, k=2)), cfg)
    assert trainer.autocast_dtype is None


def test_auto_autocast_is_bf16_on_cuda_for_float32_weights_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    cuda = torch.device("cuda")
    assert resolve_autocast("auto", cuda, torch.float32) is torch.bfloat16
    assert resolve_autocast("auto", cuda, torch.float64) is None  # float64 SAEs keep their precision
    assert resolve_autocast("none", cuda, torch.float32) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_autocast("auto", cuda, torch.float32) is None  # e.g. pre-Ampere GPUs
    assert resolve_autocast("auto", torch.device("cpu"), torch.float32) is None
    assert resolve_autocast("bfloat16", torch.device("cpu"), torch.float32) is torch.bfloat16


def test_autocast_choices_are_validated() -> None:
    with pytest.raises(ValueError, match="trainer.autocast_dtype='fp8' must be one of"):
        TrainerConfig(autocast_dtype="fp8").validate()


def test_dead_report_names_its_window_and_carries_the_heldout_figure(tmp_path) -> None:  # noqa: ANN001
    """The trainer's dead fraction is over its dead window; the summary says so and adds the held-out one."""
    from saelab.app.train_job import summary_line, write_summary
    from saelab.sources.synthetic import SyntheticConfig, SyntheticSource

    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=32, mean_active=2, seed=3))
    torch.manual_seed(11)
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=64, k=2))
    cfg = TrainerConfig(
        total_tokens=20 * 64,
        batch_size=64,
        device="cpu",
        dead_window_tokens=5 * 64,
        eval_every=10,
        log_every=5,
    )
    trainer = Trainer(sae, cfg)
    result = trainer.fit(source)
    silent = trainer.tracker.tokens_since_fired >= 5 * 64
    assert result.dead_window_tokens == 5 * 64
    assert result.dead_fraction == pytest.approx(silent.double().mean().item())
    summary = write_summary(tmp_path / "summary.json", result, source, {})
    assert summary["dead_window_tokens"] == 320
    assert summary["heldout/dead_frac"] == result.eval_history[-1]["heldout/dead_frac"]
    assert "silent for the last 320 tokens" in summary_line(summary, tmp_path)


def test_a_run_shorter_than_its_dead_window_reports_latents_silent_over_the_whole_run(tmp_path) -> None:  # noqa: ANN001
    """8 batches of 64 against a 10-batch window: no latent can be silent for the window, so the report's
    window is the 512 tokens seen, and its dead fraction counts the latents that never fired."""
    from saelab.app.train_job import summary_line, write_summary
    from saelab.sources.synthetic import SyntheticConfig, SyntheticSource

    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=8, mean_active=1, seed=3))
    torch.manual_seed(11)
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=256, k=1))
    cfg = TrainerConfig(total_tokens=8 * 64, batch_size=64, device="cpu", dead_window_tokens=10 * 64)
    trainer = Trainer(sae, cfg)
    result = trainer.fit(source)
    never_fired = (trainer.tracker.fire_counts == 0).double().mean().item()
    assert never_fired > 0.5  # 256 latents, 64 single-latent codes a batch: most never fire
    assert trainer.tracker.dead_fraction() == 0.0  # what the 640-token window alone would claim
    assert (result.dead_window_tokens, result.dead_fraction) == (512, pytest.approx(never_fired))
    assert result.sae.cfg.metadata["final_metrics"]["dead_frac"] == pytest.approx(never_fired)
    summary = write_summary(tmp_path / "summary.json", result, source, {})
    assert "silent for the last 512 tokens" in summary_line(summary, tmp_path)

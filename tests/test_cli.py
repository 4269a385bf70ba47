"""`saelab train` from the command line: the default offline job, overrides, wandb offline, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import saelab
from saelab.app.cli import main
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource, recovery_metrics

SMALL = [
    "source.d_in=16",
    "source.n_features=48",
    "source.mean_active=3",
    "sae.d_sae=64",
    "sae.k=4",
    "trainer.total_tokens=16384",
    "trainer.batch_size=512",
    "trainer.device=cpu",
    "logging.progress=false",
]


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    """`saelab ...` in a fresh interpreter (so Hydra's error handling and exit codes are the real ones)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    code = "import sys; from saelab.app.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_train_writes_an_sae_and_a_summary_that_match_the_planted_truth(tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["train", *SMALL, f"hydra.run.dir={run_dir}"])
    assert (run_dir / "sae" / "cfg.json").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    sae = saelab.load_sae(run_dir)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (16, 64, 4)
    # The summary's recovery figures are those of the saved decoder against the source's planted features.
    truth = SyntheticSource(SyntheticConfig(d_in=16, n_features=48, mean_active=3)).features
    expected = recovery_metrics(truth, sae.W_dec.detach())
    assert summary["mmcs"] == pytest.approx(expected["mmcs"], rel=1e-5)
    assert summary["tokens"] == 16384 and summary["steps"] == 32
    assert summary["config"]["sae"]["k"] == 4
    # base_lr is the rule's rate at this shape: d_in factor min(sqrt(16/64) * (16/k = 4), 32/sqrt(16)) = 2, width
    # 64 <= 4096 latents, batch 512; `lr` is the last scheduled rate, 0 at the end of the decay.
    assert summary["base_lr"] == pytest.approx(4e-3 * 2 * math.sqrt(512 / 4096), rel=1e-9)
    assert summary["lr"] == pytest.approx(0.0, abs=1e-12)
    assert f"saved {run_dir / 'sae'}" in capsys.readouterr().out


def test_overrides_reach_the_trained_sae_and_its_config(tmp_path):
    run_dir = tmp_path / "relu"
    main(["train", "sae=relu", "sae.l1_coefficient=0.25", *SMALL[:3], "sae.d_sae=32", *SMALL[5:],
          f"hydra.run.dir={run_dir}"])  # fmt: skip
    cfg = json.loads((run_dir / "sae" / "cfg.json").read_text())
    assert (cfg["saelab_architecture"], cfg["d_sae"], cfg["l1_coefficient"]) == ("relu", 32, 0.25)
    assert cfg["architecture"] == "standard"  # SAELens's name for the same SAE


def test_wandb_offline_logs_without_an_account(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "")
    run_dir = tmp_path / "wandb_run"
    main(["train", *SMALL, "logging=wandb", "logging.wandb_mode=offline", f"hydra.run.dir={run_dir}"])
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].glob("*.wandb"))


def test_resume_from_a_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = [*SMALL[:5], "trainer.total_tokens=8192", "trainer.batch_size=512", "trainer.device=cpu",
              "trainer.checkpoint_every=8", "logging.progress=false"]  # fmt: skip
    main(["train", *common, f"hydra.run.dir={full}"])  # 16 steps, a checkpoint at step 8
    step8 = full / "checkpoints" / "step_000000008"
    main(["train", *common, f"trainer.resume_from={step8}", f"hydra.run.dir={resumed}"])
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 16
    a, b = saelab.load_sae(full), saelab.load_sae(resumed)
    for name, weight in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], weight, rtol=1e-5, atol=1e-6)


def test_a_requeued_job_resumes_its_own_run_and_a_plain_rerun_is_refused(tmp_path, monkeypatch):
    """SLURM requeues a timed-out job (SLURM_RESTART_COUNT > 0) into the same run directory: it resumes from
    its newest checkpoint and ends with the uninterrupted weights. Without the counter the run directory of an
    earlier run is refused rather than mixed with a new one."""
    full, requeued = tmp_path / "full", tmp_path / "requeued"
    common = [*SMALL[:5], "trainer.total_tokens=8192", "trainer.batch_size=512", "trainer.device=cpu",
              "trainer.checkpoint_every=8", "logging.progress=false"]  # fmt: skip
    main(["train", *common, f"hydra.run.dir={full}"])  # 16 steps, a checkpoint at step 8
    (requeued / "checkpoints").mkdir(parents=True)  # the first attempt, killed after its step-8 checkpoint
    shutil.copytree(full / "checkpoints" / "step_000000008", requeued / "checkpoints" / "step_000000008")
    refused = run_cli("train", *common, f"hydra.run.dir={requeued}", cwd=tmp_path)
    assert refused.returncode != 0
    assert "already holds checkpoints/step_000000008 of an earlier run" in refused.stderr
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    main(["train", *common, f"hydra.run.dir={requeued}"])
    assert json.loads((requeued / "summary.json").read_text())["steps"] == 16
    a, b = saelab.load_sae(full), saelab.load_sae(requeued)
    for name, weight in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], weight, rtol=1e-5, atol=1e-6)


def test_restart_counters_resume_only_a_run_with_a_checkpoint(tmp_path):
    from saelab.app.train_job import restarted_run

    assert restarted_run(tmp_path, {"SLURM_RESTART_COUNT": "2"}) is None  # nothing to resume yet
    (tmp_path / "checkpoints" / "step_000000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000000004" / "trainer_state.pt").write_bytes(b"")
    assert restarted_run(tmp_path, {"TORCHELASTIC_RESTART_COUNT": "1"}) == tmp_path
    assert restarted_run(tmp_path, {"SLURM_RESTART_COUNT": "0"}) is None  # a first attempt
    assert restarted_run(tmp_path, {}) is None
    assert restarted_run(None, {"SLURM_RESTART_COUNT": "1"}) is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sae=sparse-magic", "Could not find 'sae/sparse-magic'"),
        ("sae.k=100", "sae.k=100 must be in [1, sae.d_sae=64]"),
        ("sae.d_in=32", "sae.d_in=32 but the activation source yields vectors of size 16"),
        ("trainer.lr=-0.001", "trainer.lr=-0.001 must be > 0"),
        ("trainer.device=tpu", "trainer.device='tpu' is not a device torch knows; use auto, cpu, cuda"),
        (
            "trainer.resume_from=/nonexistent/run",
            "trainer.resume_from='/nonexistent/run' holds no checkpoint",
        ),
    ],
)
def test_bad_input_exits_nonzero_naming_the_field(tmp_path, override, message):
    result = run_cli("train", *[a for a in SMALL if not a.startswith(override.split("=")[0] + "=")], override,
                     f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "bad" / "sae").exists()


def test_usage_lists_the_commands():
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2

"""Sweeps: a local Hydra multirun of 2 configurations from one shared activation cache, the sweep summary, and
the SLURM launcher config (composed and rendered to an sbatch script by submitit, no cluster needed)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from saelab.buffer.cache import CacheWriter
from saelab.cli import CONFIG_DIR, main
from saelab.config import register_configs
from saelab.synth import SyntheticConfig, SyntheticSource


class RecordingLogger:
    """Stands in for RunLogger; records the logging config each run starts with."""

    configs: list = []

    def __init__(self, cfg, total_steps, run_config, output_dir):
        RecordingLogger.configs.append(cfg)

    def start_at(self, step):
        pass

    def advance(self, steps=1):
        pass

    def log(self, step, metrics):
        pass

    def summary(self, values):
        pass

    def close(self):
        pass


def write_cache(root, rows: int = 8192) -> None:
    """A one-hook cache of planted-feature activations (d_in 16), as `saelab harvest` would leave it."""
    source = SyntheticSource(SyntheticConfig(d_in=16, n_features=48, mean_active=3.0, seed=3))
    writer = CacheWriter(root, {"h": 16}, "float32", shard_tokens=2048, fingerprint={"test": 1})
    for i in range(rows // 1024):
        writer.add({"h": source.batch(i, 1024)}, torch.zeros(1024, dtype=torch.long), contexts=8)
    writer.finish({"h": {"hook_name": "h"}}, wall_seconds=0.0)


def test_local_multirun_of_two_configurations_from_one_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("saelab.train.trainer.RunLogger", RecordingLogger)
    RecordingLogger.configs = []
    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    write_cache(cache)
    main([
        "train", "-m", "source=cache", f"source.path={cache}", "sae.k=2,4", "sae.d_sae=64",
        "trainer.total_tokens=4096", "trainer.batch_size=256", "trainer.device=cpu", "logging.progress=false",
        f"hydra.sweep.dir={sweep}",
    ])  # fmt: skip

    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name[:2] for p in runs] == ["0_", "1_"]
    assert "sae.k=2" in runs[0].name.split(",") and "sae.k=4" in runs[1].name.split(",")
    assert not any("source.path" in p.name for p in runs)  # a path would nest the run folders
    rows = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [(r["run"], r["status"]) for r in rows] == [(p.name, "done") for p in runs]
    for k, run, row in zip((2, 4), runs, rows, strict=True):
        sae_cfg = json.loads((run / "sae" / "cfg.json").read_text())
        assert sae_cfg["k"] == k and sae_cfg["metadata"]["cache_path"] == str(
            cache
        )  # both read the one cache
        assert f"sae.k={k}" in row["overrides"] and f"source.path={cache}" in row["overrides"]
        summary = json.loads((run / "summary.json").read_text())
        assert row["fvu"] == summary["fvu"] and row["steps"] == summary["steps"] == 16
        assert 0 < row["l0"] <= k  # TopK keeps at most k latents per row
    assert [(c.group, c.run_name) for c in RecordingLogger.configs] == [(str(sweep), p.name) for p in runs]

    (runs[1] / "summary.json").unlink()  # a failed (or still running) job
    (sweep / "summary.jsonl").unlink()
    capsys.readouterr()
    main(["sweep-summary", str(sweep)])
    out = capsys.readouterr().out
    assert "2 runs (1 done)" in out and "missing" in out
    rows = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["done", "missing"] and "fvu" not in rows[1]


def test_explicit_wandb_group_and_name_win_over_the_sweep_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr("saelab.train.trainer.RunLogger", RecordingLogger)
    RecordingLogger.configs = []
    main([
        "train", "-m", "sae.d_sae=64", "sae.k=2", "source.d_in=16", "trainer.total_tokens=1024",
        "trainer.batch_size=256", "trainer.device=cpu", "logging.progress=false", "logging.group=mine",
        "logging.run_name=first", f"hydra.sweep.dir={tmp_path}",
    ])  # fmt: skip
    main([
        "train", "sae.d_sae=64", "sae.k=2", "source.d_in=16", "trainer.total_tokens=1024", "trainer.batch_size=256",
        "trainer.device=cpu", "logging.progress=false", f"hydra.run.dir={tmp_path / 'single'}",
    ])  # fmt: skip
    assert [(c.group, c.run_name) for c in RecordingLogger.configs] == [("mine", "first"), (None, None)]


def test_slurm_launcher_config_composes_and_renders_an_sbatch_script(tmp_path, monkeypatch):
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher",
        reason="needs hydra-submitit-launcher: pip install 'saelab[slurm]'",
    )
    import submitit

    fake_srun = tmp_path / "bin" / "srun"  # submitit's SLURM executor only checks that srun exists
    fake_srun.parent.mkdir()
    fake_srun.write_text("#!/bin/sh\n")
    fake_srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_srun.parent}{os.pathsep}{os.environ['PATH']}")
    register_configs()
    overrides = [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher_cfg.partition, launcher_cfg.gpus_per_node, launcher_cfg.timeout_min) == ("gpu", 1, 240)

    scripts = []

    def submit(executor, fn, *job_args):  # the launcher's own parameter mapping, stopped before sbatch
        scripts.append(executor._executor._make_submission_file_text("python -m job", "uid"))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit)
    launcher = instantiate(launcher_cfg)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["sae.k=16"], ["sae.k=32"]], initial_job_idx=0)
    (script,) = scripts
    for line in ("--partition=gpu", "--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=8",
                 "--mem=64GB", "--time=240", "--nodes=1"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    assert str(tmp_path / "sweep" / ".submitit") in script

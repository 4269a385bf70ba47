"""Runs that must not lose or poison data: non-finite checkpoints, two runs in one directory, resuming with
changed settings."""

from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from saelab.app.cli import CONFIG_DIR
from saelab.app.config import register_configs
from saelab.app.train_job import train_from_config
from saelab.core.seeds import generator
from saelab.io.checkpoint import STATE_FILE, list_checkpoints
from saelab.sae.base import WEIGHTS_FILE, load_weights
from saelab.sae.registry import build_sae
from saelab.sae.topk import TopKConfig
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
from saelab.train import lock
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

SOURCE = SyntheticConfig(d_in=16, n_features=48, mean_active=3, seed=3)


class Poisoned:
    """A source whose batch number `at` (0-based; trained as step at + 1) is replaced by `value` * batch."""

    def __init__(self, at: int, value: float):
        self.source, self.at, self.value, self.d_in = SyntheticSource(SOURCE), at, value, SOURCE.d_in

    def batches(self, batch_size: int, start_batch: int = 0):
        for i, x in enumerate(self.source.batches(batch_size, start_batch), start=start_batch):
            yield x * self.value if i == self.at else x


def make_trainer(out: Path, **overrides) -> Trainer:
    settings = {
        "total_tokens": 30 * 32,
        "batch_size": 32,
        "device": "cpu",
        "checkpoint_every": 3,
        **overrides,
    }
    sae = build_sae(TopKConfig(d_in=16, d_sae=64, k=4), generator(0, "sae.init"))
    return Trainer(sae, TrainerConfig(**settings), output_dir=out)


def assert_only_finite_checkpoints(out: Path) -> list[int]:
    """Every kept checkpoint's weights and optimizer moments are finite; returns their steps."""
    steps = []
    for ckpt in list_checkpoints(out / "checkpoints"):
        for name, tensor in load_weights(ckpt / WEIGHTS_FILE).items():
            assert torch.isfinite(tensor).all(), (ckpt, name)
        state = torch.load(ckpt / STATE_FILE, weights_only=True)
        for moments in state["optimizer"]["state"].values():
            assert all(torch.isfinite(v).all() for v in moments.values()), ckpt
        steps.append(int(ckpt.name.split("_")[1]))
    return steps


def test_a_nan_batch_leaves_only_finite_checkpoints_and_names_its_steps(tmp_path):
    # batch 16 is trained at step 17; checkpoints every 3 steps: 15 is the last one before it
    with pytest.raises(ValueError) as err:
        make_trainer(tmp_path).fit(Poisoned(at=16, value=float("nan")))
    message = str(err.value)
    assert "between steps 15 and 18 contains NaN or Inf" in message
    assert "step_000000015" in message and "finite" in message
    assert assert_only_finite_checkpoints(tmp_path) == [12, 15]
    assert not (tmp_path / "sae").exists()


def test_divergence_from_a_huge_finite_batch_keeps_the_finite_checkpoints(tmp_path):
    # a finite batch of 1e38-scaled activations makes the loss overflow and the weights NaN
    with pytest.raises(FloatingPointError) as err:
        make_trainer(tmp_path, log_every=100).fit(Poisoned(at=16, value=1e38))
    message = str(err.value)
    assert re.search(r"diverged.*between steps 15 and 18 although every activation batch was finite", message)
    assert "trainer.lr" in message and "step_000000015" in message
    assert assert_only_finite_checkpoints(tmp_path) == [12, 15]


def test_a_diverging_learning_rate_writes_no_checkpoint_and_says_so(tmp_path):
    with pytest.raises(FloatingPointError, match=r"(?s)diverged.*between steps 0 and 3.*trainer\.lr=1e\+20.*"
                                                 r"No checkpoint was written"):  # fmt: skip
        make_trainer(tmp_path, lr=1e20, log_every=100).fit(SyntheticSource(SOURCE))
    assert assert_only_finite_checkpoints(tmp_path) == []


def test_a_nan_loss_at_a_log_step_blames_the_learning_rate_with_the_step(tmp_path):
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 2 .*trainer\.lr=1e\+20"):
        make_trainer(tmp_path, lr=1e20, log_every=2, checkpoint_every=0).fit(SyntheticSource(SOURCE))


# ------------------------------------------------------------------ run directory lock
def _hold_lock(run_dir: str, ready, release) -> None:
    lock.acquire(run_dir)
    ready.set()
    release.wait(60)


def test_a_second_live_run_in_the_same_directory_is_refused_naming_the_holder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(lock.RunDirInUse, match=rf"in use by another live run \(pid {holder.pid} on host"):
            make_trainer(tmp_path).fit(SyntheticSource(SOURCE))
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "sae").exists()
    finally:
        release.set()
        holder.join(60)
    # the holder exited: its lock is gone with it, and a run there now trains
    make_trainer(tmp_path).fit(SyntheticSource(SOURCE))
    assert (tmp_path / "sae").is_dir()


def test_a_stale_lock_file_from_a_dead_process_does_not_block(tmp_path):
    (tmp_path / lock.LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone"}))
    make_trainer(tmp_path).fit(SyntheticSource(SOURCE))
    assert (tmp_path / "sae").is_dir()
    assert not (tmp_path / lock.LOCK_FILE).exists()  # a finished run removes its lock file


# ------------------------------------------------------------------ resume with changed settings
SMALL = [
    "sae.d_sae=64",
    "sae.k=4",
    "source.d_in=16",
    "source.n_features=48",
    "source.mean_active=3",
    "source.seed=3",
    "trainer.total_tokens=384",
    "trainer.batch_size=32",
    "trainer.device=cpu",
    "trainer.checkpoint_every=4",
    "logging.progress=false",
]


def run_config(*overrides: str):
    """The composed `saelab train` config for SMALL plus overrides (later ones win)."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        names = {o.split("=")[0] for o in overrides}
        return compose(
            "config", overrides=[o for o in SMALL if o.split("=")[0] not in names] + list(overrides)
        )


def test_resume_refuses_changed_settings_naming_each_with_old_and_new_values(tmp_path):
    train_from_config(run_config(), tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoints" / "step_000000008"
    resume = f"trainer.resume_from={ckpt}"
    cases = {
        ("sae.k=8",): ["sae.k: 4 -> 8"],
        ("sae.architecture=relu",): ["sae.architecture: 'topk' -> 'relu'"],
        ("source.seed=5", "trainer.batch_size=64"): ["source.seed: 3 -> 5", "trainer.batch_size: 32 -> 64"],
        ("trainer.lr=0.01",): ["trainer.lr: None -> 0.01"],
    }
    for overrides, named in cases.items():
        with pytest.raises(ValueError, match="other settings") as err:
            train_from_config(run_config(resume, *overrides), tmp_path / "second")
        for text in named:
            assert text in str(err.value), (overrides, str(err.value))
    assert not (tmp_path / "second" / "sae").exists()


def test_resume_accepts_the_safe_changes(tmp_path):
    train_from_config(run_config(), tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoints" / "step_000000008"
    safe = [
        "trainer.total_tokens=640",
        "trainer.log_every=3",
        "trainer.checkpoint_every=5",
        "logging.progress=true",
    ]
    result = train_from_config(run_config(f"trainer.resume_from={ckpt}", *safe), tmp_path / "second")
    assert result.steps == 20


def test_a_refused_cli_run_leaves_the_live_run_s_hydra_record_intact(tmp_path, capsys):
    """Hydra writes `.hydra/` before the task runs; the run directory's lock is taken before that."""
    from saelab.app.cli import main

    run_dir = tmp_path / "run"
    record = run_dir / ".hydra" / "config.yaml"
    record.parent.mkdir(parents=True)
    record.write_text("the live run's config\n")
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(run_dir), ready, release))
    holder.start()
    args = ["train", "sae.d_sae=64", "sae.k=4", "source.d_in=16", "source.n_features=48", "trainer.device=cpu",
            "trainer.total_tokens=2048", "trainer.batch_size=256", "logging.progress=false"]  # fmt: skip
    try:
        assert ready.wait(60)
        with pytest.raises(SystemExit):  # Hydra prints the error and exits 1
            main([*args, f"hydra.run.dir={run_dir}"])
        assert "in use by another live run" in capsys.readouterr().err
        assert record.read_text() == "the live run's config\n"
        assert not (run_dir / "sae").exists()
    finally:
        release.set()
        holder.join(60)
    main([*args, f"hydra.run.dir={run_dir}"])  # the holder is gone: the run trains and writes its own record
    assert (run_dir / "sae").is_dir() and "sae:" in record.read_text()
    assert not (run_dir / lock.LOCK_FILE).exists()

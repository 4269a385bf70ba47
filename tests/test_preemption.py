"""Preemption safety in the trainer: a stop signal (SIGINT, SIGTERM, SIGUSR2) checkpoints at the next step boundary
and stops; the checkpoint resumes to the uninterrupted run's weights; the handlers from before are restored and
handed the signal; time-based checkpoints come on their clock."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saelab.app.cli import main
from saelab.core.seeds import generator
from saelab.io.checkpoint import list_checkpoints
from saelab.sae.registry import build_sae
from saelab.sae.topk import TopKConfig
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
from saelab.train import preemption
from saelab.train.config import TrainerConfig
from saelab.train.preemption import CheckpointClock, TrainingStopped, catch_stop_signals
from saelab.train.trainer import Trainer

SOURCE = SyntheticConfig(d_in=16, n_features=48, mean_active=3, seed=3)
STEPS = 16


class SignalAt:
    """The synthetic source, sending `signum` to this process while it yields batch number `at` (trained as step
    at + 1): the signal arrives in the middle of the run's work on that step."""

    def __init__(self, at: int, signum: int):
        self.source, self.at, self.signum, self.d_in = SyntheticSource(SOURCE), at, signum, SOURCE.d_in

    def batches(self, batch_size: int, start_batch: int = 0):
        for i, x in enumerate(self.source.batches(batch_size, start_batch), start=start_batch):
            if i == self.at:
                os.kill(os.getpid(), self.signum)
            yield x


def make_trainer(out, **overrides) -> Trainer:
    cfg = TrainerConfig(total_tokens=STEPS * 32, batch_size=32, device="cpu", **overrides)
    return Trainer(
        build_sae(TopKConfig(d_in=16, d_sae=64, k=4), generator(0, "sae.init")), cfg, output_dir=out
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return make_trainer(tmp_path_factory.mktemp("full")).fit(SyntheticSource(SOURCE))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_checkpoints_at_the_next_step_boundary_and_resumes_to_the_same_weights(
    tmp_path, signum, uninterrupted
):
    before = {sig: signal.getsignal(sig) for sig in preemption.STOP_SIGNALS}
    with pytest.raises(TrainingStopped) as stopped:
        make_trainer(tmp_path / "cut").fit(SignalAt(9, signum))
    # batch 9 is step 10's: the step the signal came in finishes, then the run checkpoints and stops
    assert (stopped.value.signum, stopped.value.step) == (signum, 10)
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step_000000010"]
    assert stopped.value.checkpoint == tmp_path / "cut" / "checkpoints" / "step_000000010"
    assert not (tmp_path / "cut" / "sae").exists() and not (tmp_path / "cut" / ".lock").exists()
    assert {sig: signal.getsignal(sig) for sig in preemption.STOP_SIGNALS} == before  # handlers restored

    resumed = Trainer.from_checkpoint(tmp_path / "cut", make_trainer(None).cfg, output_dir=tmp_path / "cut")
    assert resumed.step == 10
    result = resumed.fit(SyntheticSource(SOURCE))
    assert result.steps == STEPS
    for name, weight in uninterrupted.sae.state_dict().items():
        torch.testing.assert_close(result.sae.state_dict()[name], weight, rtol=1e-5, atol=1e-6)


def test_the_caught_signal_is_handed_to_the_handler_installed_before_training(tmp_path):
    """As submitit's handler (which requeues the SLURM job) gets SIGUSR2 once the checkpoint is written."""
    seen = []

    def requeue(signum, frame):
        seen.append((signum, list_checkpoints(tmp_path / "checkpoints")[-1].name))
        raise SystemExit(-1)  # what submitit does after `scontrol requeue`

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(SystemExit):
            make_trainer(tmp_path).fit(SignalAt(4, signal.SIGUSR2))
        assert signal.getsignal(signal.SIGUSR2) is requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [(signal.SIGUSR2, "step_000000005")]


def test_a_signal_during_the_final_save_lets_the_run_finish_then_reaches_the_old_handler(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with catch_stop_signals():  # as `saelab train` holds it around fit and its summary
            result = make_trainer(tmp_path).fit(SignalAt(STEPS - 1, signal.SIGTERM))  # during the last step
            assert seen == []  # deferred while the SAE is saved
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.steps == STEPS and (tmp_path / "sae").is_dir() and seen == [signal.SIGTERM]


def test_time_based_checkpoints_come_on_their_clock(tmp_path, monkeypatch):
    """A fake clock advancing one minute per step: with checkpoint_every_minutes=5 a checkpoint every 5 steps."""
    minutes = iter(range(10_000))
    monkeypatch.setattr(preemption.time, "monotonic", lambda: 60.0 * next(minutes))
    saved = []
    trainer = make_trainer(tmp_path, checkpoint_every_minutes=5, keep_checkpoints=100)
    original = trainer.save_checkpoint

    def record():
        saved.append(trainer.step)
        return original()

    trainer.save_checkpoint = record
    trainer.fit(SyntheticSource(SOURCE))
    assert saved and all(b - a == saved[1] - saved[0] for a, b in zip(saved, saved[1:], strict=False))
    assert 4 <= saved[1] - saved[0] <= 5 and saved[-1] < STEPS  # the final SAE is no checkpoint


def test_checkpoint_clock_and_its_validation():
    now = [0.0]
    clock = CheckpointClock(2, now=lambda: now[0])
    now[0] = 119.0
    assert not clock.due()
    now[0] = 120.0
    assert clock.due()
    clock.restart()
    assert not clock.due() and not CheckpointClock(0, now=lambda: 1e9).due()
    with pytest.raises(ValueError, match=r"trainer.checkpoint_every_minutes=-1 must be >= 0"):
        TrainerConfig(checkpoint_every_minutes=-1).validate()


# ------------------------------------------------------------------ `saelab train`: Ctrl-C and resume in place
REPO = Path(__file__).resolve().parents[1]
CLI_RUN = ["source.d_in=16", "source.n_features=48", "sae.d_sae=64", "sae.k=4", "trainer.batch_size=256",
           "trainer.device=cpu", "trainer.checkpoint_every=20", "logging.progress=false"]  # fmt: skip


def test_ctrl_c_ends_with_one_line_and_the_run_resumes_in_its_own_folder_under_its_lock(
    tmp_path, monkeypatch, capsys
):
    """A run folder named like a sweep job's (`=` and `,`, which Hydra's override syntax would misread) is resumed
    by the command the stopped run prints, typed as it is: refused while the run is live (naming it, leaving its
    Hydra record alone), then continued in that folder with the run's own settings, the original record kept."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "0_sae.k=4,source.seed=0"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "saelab.app.cli", "train", *CLI_RUN, "trainer.total_tokens=100000000",
         f"hydra.run.dir='{run}'"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(run / "checkpoints") and time.monotonic() < deadline:  # training
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        record = (run / ".hydra" / "config.yaml").read_text()
        with pytest.raises(SystemExit):  # the live run holds its folder
            main(["train", f"trainer.resume_from={run.name}"])
        assert f"pid {proc.pid} on host" in capsys.readouterr().err
        assert (run / ".hydra" / "config.yaml").read_text() == record and not list(
            run.glob(".hydra/resume-*")
        )

        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(
        r"stopped at step (\d+) \(SIGINT\); resume with saelab train trainer.resume_from=(.+)", last
    )
    assert match, err
    step = int(match.group(1))
    assert (
        list_checkpoints(run / "checkpoints")[-1].name == f"step_{step:09d}" and not (run / ".lock").exists()
    )

    main(
        [
            "train",
            *shlex.split(last.split("resume with saelab train ")[1]),
            f"trainer.total_tokens={(step + 5) * 256}",
        ]
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == step + 5 and summary["config"]["sae"]["d_sae"] == 64  # the run's own settings
    assert (run / "sae" / "cfg.json").is_file() and not (tmp_path / "outputs").exists()
    assert (run / ".hydra" / "config.yaml").read_text() == record  # the original record, untouched
    (resumed,) = run.glob(".hydra/resume-*/overrides.yaml")
    assert f"trainer.total_tokens={(step + 5) * 256}" in resumed.read_text()

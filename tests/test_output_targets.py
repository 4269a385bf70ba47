"""A run's outputs: every target is checked before step 0, a failing final write never loses the trained steps,
and a full disk is reported with the path and the disk."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from saelab.io.checkpoint import list_checkpoints, save_checkpoint
from saelab.sae.registry import build_sae
from saelab.sae.topk import TopKConfig
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

SOURCE = SyntheticConfig(d_in=16, n_features=48, mean_active=3, seed=3)


def trainer(out: Path, steps: int = 12, **settings) -> Trainer:
    sae = build_sae(TopKConfig(d_in=16, d_sae=64, k=4), torch.Generator().manual_seed(0))
    cfg = TrainerConfig(total_tokens=steps * 32, batch_size=32, device="cpu", **settings)
    return Trainer(sae, cfg, output_dir=out)


def test_a_foreign_file_in_sae_is_refused_before_a_resumed_run_trains(tmp_path):
    out = tmp_path / "run"
    trainer(out, checkpoint_every=6).fit(SyntheticSource(SOURCE))
    (out / "sae" / "NOTES.txt").write_text("my notes")
    resumed = Trainer.from_checkpoint(out, TrainerConfig(total_tokens=24 * 32, batch_size=32, device="cpu",
                                                         checkpoint_every=6), output_dir=out)  # fmt: skip
    with pytest.raises(
        FileExistsError, match=r"sae holds NOTES\.txt, which writing the trained SAE there would"
    ):
        resumed.fit(SyntheticSource(SOURCE))
    assert resumed.step == 6  # refused before any step: the 18 steps are not trained only to be lost
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_000000006"]
    assert (out / "sae" / "NOTES.txt").read_text() == "my notes"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda out: (out / "sae").write_text("x"), r"run[/\\]sae is a file"),
        (lambda out: (out / "checkpoints").write_text("x"), r"run[/\\]checkpoints is a file"),
        (lambda out: (out / "summary.json").mkdir(), r"run[/\\]summary\.json is a folder"),
    ],
    ids=["sae-file", "checkpoints-file", "summary-folder"],
)
def test_every_output_target_is_checked_before_step_0(tmp_path, make, message):
    out = tmp_path / "run"
    out.mkdir()
    make(out)
    run = trainer(out, checkpoint_every=4)
    run.extra_outputs = ("summary.json",)
    with pytest.raises(FileExistsError, match=message):
        run.fit(SyntheticSource(SOURCE))
    assert run.step == 0


class DropsANoteInto:
    """The planted source, which puts a user's file into `folder` when it serves batch `at`."""

    def __init__(self, folder: Path, at: int):
        self.source, self.folder, self.at, self.d_in = SyntheticSource(SOURCE), folder, at, SOURCE.d_in

    def batches(self, batch_size: int, start_batch: int = 0):
        for i, x in enumerate(self.source.batches(batch_size, start_batch), start=start_batch):
            if i == self.at:
                self.folder.mkdir(parents=True, exist_ok=True)
                (self.folder / "NOTES.txt").write_text("written during the run")
            yield x


def test_a_failing_final_write_checkpoints_the_trained_steps_first(tmp_path):
    out = tmp_path / "run"
    run = trainer(out)  # no periodic checkpoints
    with pytest.raises(
        OSError, match=r"The 12 steps trained are saved in .*step_000000012: resume with"
    ) as err:
        run.fit(DropsANoteInto(out / "sae", at=5))
    assert "NOTES.txt" in str(err.value)
    resumed = Trainer.from_checkpoint(out, TrainerConfig(total_tokens=16 * 32, batch_size=32, device="cpu"))
    assert resumed.step == 12


def test_a_full_disk_names_the_path_and_the_disk(tmp_path, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):  # what a write to a full disk raises inside the file object
        f.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    sae = build_sae(TopKConfig(d_in=16, d_sae=64, k=4), torch.Generator().manual_seed(0))
    state = {"step": 1, "input_scale": 1.0}
    with pytest.raises(
        OSError, match=r"no room left writing .*step_000000001 on the disk mounted at /\S* \("
    ) as err:
        save_checkpoint(tmp_path / "checkpoints", 1, sae, state, keep=2)
    assert err.value.errno == errno.ENOSPC and "GiB free of" in str(err.value)
    assert not list((tmp_path / "checkpoints").iterdir())  # no partial checkpoint, no temporary

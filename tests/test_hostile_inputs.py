"""Hostile inputs fail at once with a message naming what to fix, before anything large is allocated: a cfg.json
claiming more latents than its weights hold, an SAE too wide to train, a non-UTF-8 config, a file where a
folder was meant, a missing Hydra run folder (never asked of the hub), held-out batches holding NaN."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap

import pytest
import torch

import saelab
from saelab.sae.registry import build_sae
from saelab.sae.topk import TopKConfig
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

DATA_LIMIT = 1 << 30  # 1 GiB of heap for the child: an allocation of several GiB fails at once there


def small_sae_dir(tmp_path):
    sae = build_sae(TopKConfig(d_in=16, d_sae=64, k=4), torch.Generator().manual_seed(0))
    return sae.save(tmp_path / "sae")


def test_sizes_and_memory_are_checked_before_anything_large_is_allocated(tmp_path):
    """In a child limited to 1 GiB of heap (`ulimit -d`): a cfg.json claiming 50M latents beside a 9 KB weights
    file would build 6.4 GB of weights; `sae.expansion_factor=100000` would allocate 3.3 GB of weights, then
    die initialising them. Both are refused from sizes alone, naming the file or the setting."""
    folder = small_sae_dir(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 50_000_000}))
    script = textwrap.dedent(
        f"""
        import saelab
        from saelab.app.cli import main
        try:
            saelab.load_sae({str(folder)!r})
        except ValueError as err:
            print("LOAD:", err)
        main(["train", "sae.expansion_factor=100000", "trainer.device=cpu", "logging.progress=false",
              "hydra.run.dir={tmp_path / "run"}"])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "WANDB_MODE": "disabled", "SAELAB_DEBUG": "0"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, resource.RLIM_INFINITY)),
    )
    assert "LOAD:" in result.stdout and "does not match" in result.stdout, (
        result.stdout + result.stderr[-3000:]
    )
    assert "wrong shapes (found, expected) {'W_enc': ((16, 64), (16, 50000000))" in result.stdout
    assert result.returncode == 1
    assert "sae.expansion_factor=100000" in result.stderr and "trainer.batch_size" in result.stderr
    assert "GiB available" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_non_utf8_config_is_named(tmp_path):
    folder = small_sae_dir(tmp_path)
    (folder / "cfg.json").write_bytes(b'{"architecture": "topk", "name": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"cfg\.json is not UTF-8 text"):
        saelab.load_sae(folder)


def test_a_file_is_not_said_to_be_missing(tmp_path):
    folder = small_sae_dir(tmp_path)
    with pytest.raises(
        NotADirectoryError, match=r"sae_weights\.safetensors is a file; load_sae takes the folder"
    ):
        saelab.load_sae(folder / "sae_weights.safetensors")


def test_a_missing_hydra_run_folder_is_not_asked_of_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.chdir(tmp_path)  # no outputs/ folder here
    for source in ("outputs/2026-01-01/12-00-00", "multirun/2026-01-01/12-00-00/0_sae.k=8"):
        with pytest.raises(FileNotFoundError, match="is not a directory"):
            saelab.load_sae(source)


class NaNHeldOut:
    """Planted batches, the first (held out for evaluation) holding a NaN."""

    def __init__(self):
        self.source, self.d_in = SyntheticSource(SyntheticConfig(d_in=16, n_features=48)), 16

    def batches(self, batch_size: int, start_batch: int = 0):
        for i, x in enumerate(self.source.batches(batch_size, start_batch), start=start_batch):
            if i == 0:
                x = x.clone()
                x[3, 5] = float("nan")
            yield x


def test_held_out_batches_holding_nan_are_refused_before_training(tmp_path):
    sae = build_sae(TopKConfig(d_in=16, d_sae=64, k=4), torch.Generator().manual_seed(0))
    cfg = TrainerConfig(total_tokens=8 * 32, batch_size=32, device="cpu", eval_every=4, eval_batches=2)
    trainer = Trainer(sae, cfg, output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"held-out batches \[0\] .* contain NaN or Inf"):
        trainer.fit(NaNHeldOut())
    assert trainer.step == 0 and not (tmp_path / "run" / "sae").exists()

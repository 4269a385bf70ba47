"""Data-parallel training: 2 processes (gloo, CPU) against single-process runs over the same global batches.

The workers train every variant once and save their final state; the references are ordinary single-process
Trainer runs over the same global batches (no process group, so no collective can be called there). Every
variant, batch-normalised losses (FVU, AuxK, MP's revival term) and BatchTopK's batch-level selection included,
must give the same weights, dead-latent tracker and logged metrics. The global-batch statistics themselves are
checked on planted batches against float64 formulas.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from variants import planted_source, small_configs

from saelab import load_sae
from saelab.app.cli import main
from saelab.app.hydra_callbacks import SharedRunDir
from saelab.parallel import global_batch
from saelab.parallel.distributed import Distributed, env_world_size, finish, setup
from saelab.sae import build_sae
from saelab.sae.batchtopk import BatchTopKConfig
from saelab.sae.losses import fraction_of_variance_unexplained
from saelab.sae.topk import TopKSAE
from saelab.sources.synthetic import SyntheticConfig
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

WORLD = 2
BATCH = 128  # global rows per step
STEPS = 24
SOURCE = SyntheticConfig(d_in=16, n_features=48, mean_active=3.0, seed=1)
#: Every trainable variant (one with a yaml under configs/sae/) that declares data-parallel support, in a small
#: configuration; a new variant file is covered without editing this test.
CASES = small_configs(
    {"d_in": 16, "d_sae": 128},
    relu={"d_sae": 64, "l1_coefficient": 1.0},
    gba={"d_sae": 64, "n_groups": 4, "update_every": 5},
    data_parallel_only=True,
    # on planted pairs: loss on y, the skip term, b_in and target_scale; sparse (TopK) and dense (ReLU) paths
    transcoders=("topk_skip_transcoder", "relu_skip_transcoder"),
)
#: History columns that must match (tokens_per_s is timing).
COMPARED = (
    "step",
    "tokens",
    "loss",
    "l0",
    "dead_frac",
    "lr",
    "fvu",
    "auxk",
    "revival",
    "sq_error",
    "l1_penalty",
    "gate_aux",
    "threshold",
)


def trainer_config() -> TrainerConfig:
    """Short run whose dead window (2 batches) switches on AuxK and the MP revival term."""
    return TrainerConfig(
        total_tokens=STEPS * BATCH,
        batch_size=BATCH,
        lr=3e-3,
        adam_eps=1e-6,  # above the rounding noise of near-zero gradients, which Adam would blow up to lr steps
        device="cpu",
        dead_window_tokens=2 * BATCH,
        dead_check_every=2,
        log_every=4,
        eval_every=8,
        eval_batches=2,
        checkpoint_every=12,
    )


def train(architecture: str, output_dir: Path | None = None) -> dict:
    """Train one variant from seed 0 on the synthetic source; return its final training-space state."""
    torch.manual_seed(0)
    sae = build_sae(CASES[architecture])
    trainer = Trainer(sae, trainer_config(), output_dir=output_dir)
    trainer.fit(planted_source(architecture, SOURCE))
    return {
        "state": {k: v.clone() for k, v in trainer.sae.state_dict().items()},
        "input_scale": trainer.input_scale,
        "tracker": trainer.tracker.state_dict(),
        "history": trainer.history,
        "eval_history": trainer.eval_history,
    }


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    setup(torch.device("cpu"))  # the process group the trainers below reuse
    results = {arch: train(arch, output_dir=out / f"rank{rank}" / arch) for arch in CASES}
    results["checks"] = global_batch_checks(Distributed(rank, WORLD))
    torch.save(results, out / f"results{rank}.pt")
    finish()  # as `saelab train` ends: a barrier, then the group destroyed (no rank exits under another's feet)


def planted_batches() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A global batch x [16, 6] whose second half (rank 1's rows) sits 1000 higher, a reconstruction x_hat of
    it, and BatchTopK pre-activations [16, 12] whose whole top 16 * 3 lies in the first half (rank 0's rows)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 6, generator=g) + torch.tensor([0.0, 1000.0]).repeat_interleave(8)[:, None]
    x_hat = x + 0.3 * torch.randn(16, 6, generator=g)
    pre = torch.randn(16, 12, generator=g) + torch.tensor([100.0, 0.0]).repeat_interleave(8)[:, None]
    return x, x_hat, pre


def global_batch_checks(d: Distributed) -> dict[str, torch.Tensor]:
    """This rank's FVU and BatchTopK selection of the planted batches, inside and outside `sharded`."""
    x, x_hat, pre = (d.shard(t) for t in planted_batches())
    sae = build_sae(BatchTopKConfig(d_in=6, d_sae=12, k=3))
    with global_batch.sharded():
        fvu = fraction_of_variance_unexplained(x, x_hat)
        values, indices = sae.select(pre, 3)
        sae.update_threshold(values)
    kept = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, indices, values > 0)
    local = fraction_of_variance_unexplained(x, x_hat)  # outside `sharded`: this slice's own FVU
    return {"fvu": fvu, "local_fvu": local, "kept": kept, "threshold": sae.threshold.clone()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Both ranks' results (every variant) and the output folder of the 2-process run."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(out / f"results{r}.pt", weights_only=False) for r in range(WORLD)], out


def assert_same_run(got: dict, want: dict) -> None:
    assert got["input_scale"] == pytest.approx(want["input_scale"], rel=1e-12)
    for name, value in want["state"].items():  # parameters (GBA's adapted biases too) and saved buffers
        torch.testing.assert_close(got["state"][name], value, rtol=1e-4, atol=2e-5, equal_nan=True, msg=name)
    for key in ("tokens_since_fired", "fire_counts"):
        assert torch.equal(got["tracker"][key], want["tracker"][key]), key
    assert got["tracker"]["tokens_seen"] == want["tracker"]["tokens_seen"] == STEPS * BATCH
    assert len(got["history"]) == len(want["history"]) == STEPS // 4
    for row, ref in zip(got["history"], want["history"], strict=True):
        assert set(row) == set(ref)
        for key in (k for k in COMPARED if k in ref):
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (row["step"], key)
    assert len(got["eval_history"]) == len(want["eval_history"]) == STEPS // 8
    for row, ref in zip(got["eval_history"], want["eval_history"], strict=True):
        assert row == pytest.approx(ref, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("architecture", list(CASES))
def test_ddp_equals_the_single_process_run_over_the_same_global_batches(ddp_runs, architecture):
    (rank0, _), _ = ddp_runs
    reference = train(architecture)
    revival = {"topk": "auxk", "batchtopk": "auxk", "mp": "revival"}.get(architecture)
    if revival:  # the dead window really switched the revival term on
        assert any(row.get(revival, 0) > 0 for row in reference["history"])
    assert_same_run(rank0[architecture], reference)


def test_batch_statistics_inside_sharded_are_the_global_batch_s(ddp_runs):
    (rank0, rank1), _ = ddp_runs
    checks = [rank0["checks"], rank1["checks"]]
    x, x_hat, pre = (t.double() for t in planted_batches())
    # FVU: rank r returns W * its rows' squared error / the global denominator, whose mean over ranks is the
    # global FVU; the slices' own FVUs (outside `sharded`) ignore the 1000 between them and are far larger
    denominator = (x - x.mean(dim=0)).pow(2).sum()
    errors = (x - x_hat).pow(2).sum(dim=1).reshape(WORLD, -1).sum(dim=1)
    for r, check in enumerate(checks):
        assert float(check["fvu"]) == pytest.approx(float(WORLD * errors[r] / denominator), rel=1e-5)
        part = slice(8 * r, 8 * (r + 1))
        local = errors[r] / (x[part] - x[part].mean(dim=0)).pow(2).sum()
        assert float(check["local_fvu"]) == pytest.approx(float(local), rel=1e-5)
    global_fvu = float(errors.sum() / denominator)
    assert sum(float(c["fvu"]) for c in checks) / WORLD == pytest.approx(global_fvu, rel=1e-5)
    assert min(float(c["local_fvu"]) for c in checks) > 1e4 * global_fvu
    # BatchTopK keeps the global batch's 16 * 3 largest entries, all of them on rank 0
    cutoff = pre.flatten().sort(descending=True).values[16 * 3 - 1]
    kept = torch.cat([c["kept"] for c in checks])
    assert torch.equal(kept, pre >= cutoff)
    assert int(kept[:8].sum()) == 48 and not kept[8:].any()
    for check in checks:  # the first threshold update: the smallest positive kept value of the global batch
        assert float(check["threshold"]) == pytest.approx(float(cutoff), rel=1e-6)


def test_ranks_hold_identical_state_and_only_rank_0_writes(ddp_runs):
    (rank0, rank1), out = ddp_runs
    for arch in CASES:
        for name, value in rank0[arch]["state"].items():
            assert torch.equal(rank1[arch]["state"][name], value), (arch, name)
        assert rank1[arch]["eval_history"] == []  # held-out evaluation runs on rank 0 alone
        written = sorted(p.name for p in (out / "rank0" / arch).iterdir())
        assert written == ["checkpoints", "sae"]
        assert [p.name for p in (out / "rank0" / arch / "checkpoints").iterdir()] == ["step_000000012"]
    assert not (out / "rank1").exists()


def test_settings_data_parallel_training_cannot_honour_are_refused():
    four = Distributed(rank=1, world_size=4)
    with pytest.raises(
        ValueError, match=r"trainer.batch_size=130 must be divisible by the number of processes"
    ):
        four.check(build_sae(CASES["topk"]), 130)

    class Unregistered(TopKSAE):
        architecture = "my_variant"
        data_parallel = False

    with pytest.raises(ValueError, match=r"sae.architecture='my_variant' does not support data-parallel"):
        four.check(Unregistered(CASES["topk"]), 128)
    x = torch.arange(8.0)[:, None]
    assert four.shard(x).flatten().tolist() == [2.0, 3.0]  # rank 1's contiguous quarter
    assert Distributed().shard(x) is x
    with (
        pytest.raises(
            RuntimeError, match=r"sharded\(\) needs an initialised torch.distributed process group"
        ),
        global_batch.sharded(),
    ):
        pass


CLI_ARGS = [
    "sae=relu", "sae.d_sae=128", "trainer.device=cpu", "trainer.total_tokens=8192", "trainer.batch_size=256",
    "source.d_in=16", "source.n_features=48", "logging.progress=false",
    "trainer.adam_eps=1e-6",  # above the rounding noise of near-zero gradients, which Adam would blow up
]  # fmt: skip


@pytest.mark.slow
def test_torchrun_cli_run_writes_one_output_dir_with_the_single_process_sae(tmp_path):
    """`torchrun --nproc_per_node=2 -m saelab.app.cli train`: ${now:...} with microseconds differs per process,
    yet both ranks share rank 0's run directory, and only rank 0 writes there."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    cmd += ["-m", "saelab.app.cli", "train", *CLI_ARGS, "hydra.run.dir=runs/${now:%H-%M-%S-%f}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "sae", "summary.json"]
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 32 and summary["tokens"] == 8192

    main(["train", *CLI_ARGS, f"hydra.run.dir={tmp_path / 'single'}"])
    ddp, single = load_sae(run / "sae"), load_sae(tmp_path / "single" / "sae")
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[name], value, rtol=1e-4, atol=2e-5, msg=name)


def test_a_multirun_under_torchrun_is_refused_before_any_job(monkeypatch, tmp_path):
    """Refused by the command itself: Hydra would turn a callback's error into a warning and run the sweep."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="cannot run under torchrun"):
        main(["train", "-m", "sae.k=4,8", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert not (tmp_path / "sweep").exists()


def test_a_slurm_job_with_several_tasks_exports_the_torchrun_environment(monkeypatch):
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[03-04]",
    }  # fmt: skip
    monkeypatch.setattr(os, "environ", dict(slurm))  # restored afterwards, exported variables included
    assert env_world_size() == 1
    SharedRunDir().on_job_start(config=None)  # what each task of a submitit job runs before the task function
    assert env_world_size() == 8
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"]) == ("5", "1", "gpu03")

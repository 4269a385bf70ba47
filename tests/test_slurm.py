"""A sweep on a real single-node SLURM (its own munged, slurmctld and slurmd, see slurm_cluster.py): two jobs
submitted through hydra/launcher=slurm_cpu from one activation cache, run one at a time (array_parallelism=1)
so that `saelab sweep-summary` sees one pending. The second gets submitit's timeout warning (SIGUSR2) while it
trains: it checkpoints at the next step boundary and requeues itself, and the requeued job resumes from that
checkpoint; then it is cancelled with scancel (SIGTERM), checkpointing again. The summary must list the first as
done (its SAE reproduces the cache's rows with the reported FVU, recomputed here in float64; its result file is
small and unpickles without torch) and the second as failed (CANCELLED), with one line about sacct instead of a
warning each poll (the cluster keeps no accounting). `saelab sweep-resubmit` then runs the second again in its
own folder, from its newest checkpoint, to the end."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import missing_binaries, single_node_cluster
from test_sweep import write_cache

import saelab
from saelab.app.cli import main
from saelab.buffer.cache import ActivationCache
from saelab.io.layout import list_checkpoints

MISSING = missing_binaries()
pytestmark = [
    pytest.mark.slow,  # about 80 s on 2 CPU cores, most of it waiting for submitit's polls
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"needs SLURM and munge ({', '.join(MISSING)} not found): apt-get install slurm-wlm munge",
    ),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="the test cluster runs its daemons as root (SlurmUser=root)"
    ),
]
pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher",
    reason="needs hydra-submitit-launcher: pip install 'saelab[slurm]'",
)
REPO = Path(__file__).resolve().parents[1]
SLOW_TOKENS = 100_000_000  # the job to cancel: far more than it can train before the test cancels it


@pytest.fixture
def cluster(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("slurm")
    with single_node_cluster(root) as running:
        monkeypatch.setenv("SLURM_CONF", str(running.conf))  # for sweep-summary's squeue in this process
        yield running
    deadline = time.monotonic() + 10
    while running.leftover_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running.leftover_processes(), "processes of the test cluster outlived it"
    assert all(p.poll() is not None for p in running.processes.values())


def summary_rows(sweep: Path, capsys) -> list[dict]:
    capsys.readouterr()
    main(["sweep-summary", str(sweep)])
    capsys.readouterr()
    return [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]


def wait_until(predicate, timeout: float, what: str, submit: subprocess.Popen, log: Path, cluster):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if submit.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"no {what} after {timeout:.0f} s\n{log.read_text()[-3000:]}\n{cluster.logs()}")


def float64_fvu(run: Path, cache: Path) -> float:
    """FVU of the run's saved SAE on every row of the cache: sum ||x - sae(x)||^2 / sum ||x - mean x||^2."""
    sae = saelab.load_sae(run).double()
    x = ActivationCache(cache).read_all("h").double()
    with torch.no_grad():
        residual = x - sae(x)
    return (residual.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def test_sweep_on_slurm_with_a_pending_and_a_cancelled_job(cluster, tmp_path, capsys):
    cache, sweep, log = tmp_path / "cache", tmp_path / "sweep", tmp_path / "submit.log"
    write_cache(cache)
    env = {**cluster.env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable, "-m", "saelab.app.cli", "train", "-m", "hydra/launcher=slurm_cpu",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
        "hydra.launcher.array_parallelism=1", "source=cache", f"source.path={cache}", "sae.d_sae=64", "sae.k=4",
        f"trainer.total_tokens=4096,{SLOW_TOKENS}", "trainer.batch_size=256", "trainer.checkpoint_every=500",
        "logging.progress=false",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    with log.open("w") as out:
        submit = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:

        def queue() -> str:
            return cluster.run("squeue", "--noheader", "--array", "--states=all", "--format=%i|%T")

        # job 0 trains while job 1 waits for it (array_parallelism=1): sweep-summary says so.
        wait_until(lambda: "_0|RUNNING" in queue(), 90, "running job 0", submit, log, cluster)
        rows = summary_rows(sweep, capsys)
        by_job = {row["job"]: row for row in rows}
        assert by_job[1]["status"] == "pending" and by_job[1]["run"] is None
        assert f"trainer.total_tokens={SLOW_TOKENS}" in by_job[1]["overrides"]  # read from submitit's pickle
        assert by_job[0]["status"] in ("running", "done")

        # job 1 starts once job 0 is done; cancel it while it trains.
        def started() -> bool:
            return bool(list(sweep.glob("1_*/.hydra/overrides.yaml"))) and "_1|RUNNING" in queue()

        wait_until(started, 150, "running job 1", submit, log, cluster)
        assert [row["status"] for row in summary_rows(sweep, capsys)] == ["done", "running"]
        array_id = next(row["slurm_job_id"] for row in rows if row["job"] == 1)
        job_log = sweep / ".submitit" / array_id / f"{array_id}_0_log"  # .out and .err

        # submitit's timeout warning: checkpoint at the next step boundary, requeue, resume from that checkpoint
        run = next(sweep.glob("1_*"))
        wait_until(lambda: list_checkpoints(run / "checkpoints"), 90, "job 1 training", submit, log, cluster)
        cluster.run("scancel", "--signal=USR2", array_id)

        def resumed():  # SLURM holds the requeued job for CRED_EXPIRE_S, then runs it again
            return re.search(r"resuming \S+ at step (\d+)", read(job_log))

        step = int(wait_until(resumed, 90, "job 1 resumed", submit, log, cluster).group(1))
        assert re.search(rf"stopped at step {step} \(SIGUSR2\)", read(job_log)), read(job_log)
        assert step % 500, "the resume must come from the signal's checkpoint, not a periodic one"

        def training_again() -> bool:
            return int(list_checkpoints(run / "checkpoints")[-1].name.split("_")[1]) > step

        wait_until(training_again, 60, "job 1 training again", submit, log, cluster)
        cluster.run("scancel", array_id)  # SIGTERM: checkpoint at the next step boundary, then end

        def cancelled_with_checkpoint():
            return "CANCELLED" in queue() and re.search(r"stopped at step (\d+) \(SIGTERM\)", read(job_log))

        last_step = int(
            wait_until(cancelled_with_checkpoint, 60, "job 1 cancelled", submit, log, cluster).group(1)
        )
        assert last_step > step and list_checkpoints(run / "checkpoints")[-1].name == f"step_{last_step:09d}"
        rows = summary_rows(
            sweep, capsys
        )  # re-collected while the submitting process waits for its next poll
        assert [(row["job"], row["status"], row.get("slurm_state")) for row in rows] == [
            (0, "done", None),
            (1, "failed", "CANCELLED"),
        ]

        # sweep-resubmit: job 1 again, in its own folder, resuming from its newest checkpoint to a nearer end
        resubmit = subprocess.Popen(
            [sys.executable, "-m", "saelab.app.cli", "sweep-resubmit", str(sweep),
             f"trainer.total_tokens={(last_step + 8) * 256}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        resubmitted = resubmit.communicate(timeout=240)[0]
        submit.wait(timeout=180)
    finally:
        for process in (submit, locals().get("resubmit")):
            if process is not None and process.poll() is None:
                process.kill()
    output = log.read_text()
    assert submit.returncode == 1, output  # the sweep reports its failed job
    assert output.count("sacct failed") == 1 and "Bypassing sacct error" not in output, output
    assert resubmit.returncode == 0, resubmitted + cluster.logs()

    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [row["run"] for row in rows] == [p.name for p in runs]
    done, cancelled = runs
    assert "trainer.total_tokens=4096" in rows[0]["overrides"] and rows[0]["steps"] == 4096 // 256
    summary = json.loads((done / "summary.json").read_text())
    assert rows[0]["fvu"] == summary["fvu"] and 0 < rows[0]["l0"] <= 4
    fvu = float64_fvu(done, cache)
    assert math.isfinite(fvu) and 0 < fvu < 0.9  # a 64-latent TopK SAE explains much of the planted data
    assert fvu == pytest.approx(summary["fvu"], abs=0.05)  # the reported FVU is the last training batches'
    assert json.loads((done / "sae" / "cfg.json").read_text())["k"] == 4

    # the job's return value, pickled by submitit (in Hydra's JobReturn) for the submitting process: numbers and
    # paths, no SAE and no tensor anywhere in the file (a GPU job's CUDA tensors failed to unpickle on CPU-only
    # login nodes)
    result = sweep / ".submitit" / rows[0]["slurm_job_id"] / f"{rows[0]['slurm_job_id']}_0_result.pkl"
    assert b"torch" not in result.read_bytes()
    with result.open("rb") as f:
        outcome, job_return = pickle.load(f)
    value = job_return.return_value
    assert outcome == "success" and len(pickle.dumps(value)) < 2048
    assert json.loads(json.dumps(value)) == value  # plain Python types only
    assert value["sae_dir"] == str(done / "sae") and value["metrics"]["fvu"] == summary["fvu"]

    # the resubmitted job 1 ran in its own folder from the cancelled job's last checkpoint to its new end
    rows = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [(row["job"], row["status"], row["run"]) for row in rows] == [
        (0, "done", done.name),
        (1, "done", cancelled.name),
    ]
    assert rows[1]["slurm_job_id"] != array_id and rows[1]["steps"] == last_step + 8
    new_log = sweep / ".submitit" / rows[1]["slurm_job_id"] / f"{rows[1]['slurm_job_id']}_0_log"
    assert f"at step {last_step}" in read(new_log)
    assert (cancelled / "sae").is_dir() and list((cancelled / ".hydra").glob("attempt-*/overrides.yaml"))


def read(log: Path) -> str:
    """A submitit job log's stdout and stderr (`log`: the path without .out / .err)."""
    paths = [log.with_name(f"{log.name}.{kind}") for kind in ("out", "err")]
    return "".join(p.read_text() for p in paths if p.is_file())

"""A sweep on a real single-node SLURM (its own munged, slurmctld and slurmd, see slurm_cluster.py): two jobs
submitted through hydra/launcher=slurm_cpu from one activation cache, run one at a time (array_parallelism=1)
so that `saelab sweep-summary` sees one pending, then the second cancelled with scancel while it trains. The
summary must list the first as done (its SAE reproduces the cache's rows with the reported FVU, recomputed
here in float64) and the second as failed (CANCELLED), with one line about sacct instead of a warning each poll
(the cluster keeps no accounting)."""

from __future__ import annotations

import json
import math
import os
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
        f"trainer.total_tokens=4096,{SLOW_TOKENS}", "trainer.batch_size=256", "logging.progress=false",
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
        cluster.run("scancel", array_id)
        submit.wait(timeout=180)
    finally:
        if submit.poll() is None:
            submit.kill()
    output = log.read_text()
    assert submit.returncode == 1, output  # the sweep reports its failed job
    assert output.count("sacct failed") == 1 and "Bypassing sacct error" not in output, output

    rows = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [(row["job"], row["status"], row.get("slurm_state")) for row in rows] == [
        (0, "done", None),
        (1, "failed", "CANCELLED"),
    ]
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
    assert not (cancelled / "summary.json").exists() and not (cancelled / "sae").exists()
    assert [row["status"] for row in summary_rows(sweep, capsys)] == ["done", "failed"]  # re-collected

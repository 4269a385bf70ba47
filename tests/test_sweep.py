"""Sweeps: a local Hydra multirun of 2 configurations from one shared activation cache, the sweep summary, and
the SLURM launcher config (composed and rendered to an sbatch script by submitit, no cluster needed)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import saelab
from saelab.app.cli import CONFIG_DIR, main
from saelab.app.config import register_configs
from saelab.buffer.cache import CacheWriter
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource

REPO = Path(__file__).resolve().parents[1]


class RecordingLogger:
    """Stands in for RunLogger; records the logging config each run starts with, and the step it starts at."""

    configs: list = []
    starts: list = []

    def __init__(self, cfg, total_steps, run_config, output_dir):
        RecordingLogger.configs.append(cfg)

    def start_at(self, step):
        RecordingLogger.starts.append(step)

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
        "trainer.total_tokens=4096", "trainer.batch_size=256", "trainer.device=cpu", "trainer.checkpoint_every=4",
        "logging.progress=false", f"hydra.sweep.dir={sweep}",
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

    # sweep-resubmit: job 1 (as if killed after its step-12 checkpoint) resumes in its own folder; job 0, whose
    # folder is gone (never started), runs from the start in the folder the sweep gave it. Both end with the
    # weights they had.
    trained = [saelab.load_sae(run).state_dict() for run in runs]
    shutil.rmtree(runs[1] / "sae")
    shutil.rmtree(runs[0])
    assert [r["status"] for r in _collect(sweep)] == ["not started", "missing"]
    RecordingLogger.starts = []
    main(["sweep-resubmit", str(sweep)])
    rows = _rows(sweep)
    assert [(r["run"], r["status"]) for r in rows] == [(p.name, "done") for p in runs]
    assert RecordingLogger.starts == [0, 12]  # job 1 resumed from its newest checkpoint
    for run, weights in zip(runs, trained, strict=True):
        for name, tensor in saelab.load_sae(run).state_dict().items():
            torch.testing.assert_close(tensor, weights[name], rtol=1e-5, atol=1e-6)
    assert list((runs[1] / ".hydra").glob("attempt-*/overrides.yaml"))  # the earlier record, kept
    capsys.readouterr()
    main(["sweep-resubmit", str(sweep)])
    assert "nothing to resubmit" in capsys.readouterr().out


def test_a_sweep_with_a_failed_run_still_writes_its_summary(tmp_path):
    """Hydra skips on_multirun_end when a job raised; the summary is then written as the process exits."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "saelab.app.cli",
            "train",
            "-m",
            "sae.d_sae=64",
            "sae.k=2,65",
            "source.d_in=16",
            "trainer.total_tokens=1024",
            "trainer.batch_size=256",
            "trainer.device=cpu",
            "logging.progress=false",
            f"hydra.sweep.dir={sweep}",
        ],  # fmt: skip
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "lower k" in done.stderr, done.stderr
    rows = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [(r["job"], r["status"]) for r in rows] == [(0, "done"), (1, "missing")]
    assert rows[0]["steps"] == 4 and "sae.k=65" in rows[1]["overrides"]
    assert "2 runs (1 done): 1 missing" in done.stdout + done.stderr  # the table is logged too


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


def render_sbatch(tmp_path, monkeypatch, overrides: list[str]):
    """Compose `saelab train` with the given launcher overrides and let the launcher render its sbatch script
    (submitit's own parameter mapping, stopped before sbatch): (the launcher config, the script)."""
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher",
        reason="needs hydra-submitit-launcher: pip install 'saelab[slurm]'",
    )
    import submitit

    fake_command(tmp_path / "bin", "srun", "")  # submitit's SLURM executor only checks that srun exists
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    register_configs()
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    scripts = []

    def submit(executor, fn, *job_args):
        scripts.append(executor._executor._make_submission_file_text("python -m job", "uid"))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["sae.k=16"], ["sae.k=32"]], initial_job_idx=0)
    (script,) = scripts
    return cfg.hydra.launcher, script


def test_slurm_launcher_config_composes_and_renders_an_sbatch_script(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={sweep}"]
    launcher_cfg, script = render_sbatch(tmp_path, monkeypatch, overrides)
    assert launcher_cfg._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher_cfg.partition, launcher_cfg.gpus_per_node, launcher_cfg.timeout_min) == ("gpu", 1, 240)
    for line in ("--partition=gpu", "--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=8",
                 "--mem=64GB", "--time=240", "--nodes=1"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    assert str(sweep / ".submitit") in script


def test_slurm_cpu_preset_asks_for_no_gpu_and_limits_torch_threads_to_the_job_cpus(tmp_path, monkeypatch):
    overrides = ["hydra/launcher=slurm_cpu", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    launcher_cfg, script = render_sbatch(tmp_path, monkeypatch, overrides)
    assert launcher_cfg._target_.endswith("submitit_launcher.SlurmLauncher")
    for line in ("--cpus-per-task=4", "--mem=16GB", "--time=240", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}\n" in script
    assert "gpus" not in script and "gres" not in script
    setup = script.index("export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK")
    assert setup < script.index("srun")  # set in the job script, inherited by the training process


def fake_command(bin_dir, name: str, script: str) -> None:
    """An executable `name` on PATH running the given sh script (a stand-in for a SLURM client command)."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


def submit_job(sweep, job_id: str, num: int, overrides: list[str], result=None, started: bool = True) -> None:
    """What hydra-submitit-launcher leaves for one job: .submitit/<id>/ with the pickled call (and the result
    pickle once the job returned or raised), and the run folder with Hydra's files once the job started."""
    from submitit.core.utils import DelayedSubmission

    folder = sweep / ".submitit" / job_id
    folder.mkdir(parents=True)
    DelayedSubmission(print, overrides, "hydra.sweep.dir", num, f"job_id_for_{num}", {}).dump(
        folder / f"{job_id}_submitted.pkl"
    )
    if result is not None:
        (folder / f"{job_id}_0_result.pkl").write_bytes(pickle.dumps(result))
    if started:
        hydra_dir = sweep / f"{num}_{overrides[0]}" / ".hydra"
        hydra_dir.mkdir(parents=True)
        (hydra_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (hydra_dir / "hydra.yaml").write_text(f"hydra:\n  job:\n    id: '{job_id}'\n")


def test_sweep_summary_says_which_slurm_jobs_are_pending_running_or_failed(tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit", reason="needs hydra-submitit-launcher: pip install 'saelab[slurm]'")
    sweep = tmp_path / "sweep"
    (sweep / ".submitit" / "7").mkdir(parents=True)  # the array's own folder: no job of its own
    submit_job(sweep, "7_0", 0, ["sae.k=1"], result=("success", None))
    (sweep / "0_sae.k=1" / "summary.json").write_text(json.dumps({"fvu": 0.25, "steps": 4}))
    submit_job(sweep, "7_1", 1, ["sae.k=2"])  # running
    submit_job(sweep, "7_2", 2, ["sae.k=3"], started=False)  # waiting for a free node: no run folder yet
    submit_job(sweep, "7_3", 3, ["sae.k=4"], result=("error", "Traceback ...\nValueError: k too large"))
    submit_job(sweep, "7_4", 4, ["sae.k=5"])  # cancelled
    submit_job(sweep, "7_5", 5, ["sae.k=6"])  # ended long ago without a summary: squeue no longer lists it
    squeue_args = tmp_path / "squeue_args"
    listing = "7_0|COMPLETED\\n7_1|RUNNING\\n7_2|PENDING\\n7_3|FAILED\\n7_4|CANCELLED\\n"
    fake_command(tmp_path / "bin", "squeue", f'echo "$@" > {squeue_args}\nprintf "{listing}"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    main(["sweep-summary", str(sweep)])
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [(r["job"], r["status"], r.get("slurm_state")) for r in rows] == [
        (0, "done", None),
        (1, "running", "RUNNING"),
        (2, "pending", "PENDING"),
        (3, "failed", None),  # the job's own exception, from its result pickle
        (4, "failed", "CANCELLED"),
        (5, "failed", "NOT_LISTED"),
    ]
    assert rows[0]["fvu"] == 0.25 and rows[2]["run"] is None and rows[2]["overrides"] == ["sae.k=3"]
    assert rows[3]["error"] == "ValueError: k too large"
    assert [r["slurm_job_id"] for r in rows] == [f"7_{i}" for i in range(6)]
    assert "6 runs (1 done): 1 running, 1 pending, 3 failed" in out
    assert "failed (CANCELLED)" in out and "--jobs=7" in squeue_args.read_text().split()  # one call, array id

    fake_command(
        tmp_path / "bin", "squeue", "echo 'slurm_load_jobs error: Unable to contact controller' >&2; exit 1"
    )
    main(["sweep-summary", str(sweep)])
    assert [r["status"] for r in _rows(sweep)] == [
        "done",
        "missing",
        "missing",
        "failed",
        "missing",
        "missing",
    ]  # no queue: unknown


def _collect(sweep) -> list[dict]:
    from saelab.app.sweep import collect_sweep

    return collect_sweep(sweep)


def _rows(sweep) -> list[dict]:
    return [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]


def test_job_states_come_from_squeue_after_one_line_about_sacct(tmp_path, monkeypatch, caplog):
    pytest.importorskip("submitit", reason="needs hydra-submitit-launcher: pip install 'saelab[slurm]'")
    from saelab.app.slurm_watcher import QueueInfoWatcher

    fake_command(tmp_path / "bin", "sacct", "echo 'Slurm accounting storage is disabled' >&2; exit 1")
    fake_command(tmp_path / "bin", "squeue", f"cat {tmp_path / 'queue'}")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    watcher = QueueInfoWatcher(delay_s=600)
    (tmp_path / "queue").write_text("9_0|RUNNING\n9_1|CONFIGURING\n9_2|PENDING\n")
    with caplog.at_level(logging.INFO, logger="saelab.app.slurm_watcher"):
        states = [watcher.get_state(f"9_{i}", mode="force") for i in range(3)]
        assert states == ["RUNNING", "RUNNING", "PENDING"]  # submitit's words for "not ended yet"
        assert not any(watcher.is_done(f"9_{i}", mode="cache") for i in range(3))
        (tmp_path / "queue").write_text("9_0|CANCELLED\n9_2|RUNNING\n")  # 9_1 left the controller's list
        watcher.update()
        watcher.update()
    assert [watcher.get_state(f"9_{i}", mode="cache") for i in range(3)] == [
        "CANCELLED",
        "NOT_LISTED",
        "RUNNING",
    ]
    assert [watcher.is_done(f"9_{i}", mode="cache") for i in range(3)] == [True, True, False]
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "accounting storage is disabled" in notes[0] and "squeue" in notes[0]


def test_sweep_job_folders_stay_flat_and_short_whatever_the_overrides(tmp_path):
    """A '/' in a value would nest a job's folder (and lose its number); a long command line would pass the file
    system's 255-byte limit. Folder names are flat, at most 200 characters, and keep the job number."""
    from saelab.app.resolvers import MAX_DIRNAME, safe_dirname

    sweep = tmp_path / "sweep"
    many = [
        "source.noise_std=0.01",
        "logging.project=team/project",
        "trainer.lr_warmup_frac=0.05",
        "trainer.lr_decay_frac=0.3",
        "sae.aux_k_coef=0.05",
        "trainer.dead_window_tokens=512",
        "source.mean_active=3.0",
        "trainer.seed=3",
        "trainer.log_every=2",
        "trainer.dead_check_every=2",
        "source.seed=2",
        "trainer.adam_beta1=0.9",
    ]  # fmt: skip  (about 300 characters of overrides, one with a '/')
    main(["train", "-m", "sae.d_sae=64", "sae.k=2,4", "source.d_in=16", "trainer.total_tokens=1024",
          "trainer.batch_size=256", "trainer.device=cpu", "logging.progress=false", *many,
          f"hydra.sweep.dir={sweep}"])  # fmt: skip
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name[:2] for p in runs] == ["0_", "1_"] and all(len(p.name) <= MAX_DIRNAME + 2 for p in runs)
    assert all((p / "summary.json").is_file() for p in runs)  # flat: the run is the folder itself
    rows = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [(r["job"], r["status"]) for r in rows] == [(0, "done"), (1, "done")]
    assert safe_dirname("a=x/y,b=1") == "a=x_y,b=1"
    long = ",".join(f"key{i}=value{i}" for i in range(40))
    assert len(safe_dirname(long)) == MAX_DIRNAME and safe_dirname(long) != safe_dirname(long + "x")


def test_sweep_summary_says_a_local_job_still_training_is_running(tmp_path, capsys):
    """A run folder without summary.json whose lock a live process holds is `running`, not `missing`."""
    run = tmp_path / "sweep" / "0_sae.k=2"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- sae.k=2\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from saelab.train.lock import acquire; acquire(sys.argv[1]); "
         "print('held', flush=True); sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        main(["sweep-summary", str(tmp_path / "sweep")])
        rows = [json.loads(line) for line in (tmp_path / "sweep" / "summary.jsonl").read_text().splitlines()]
        assert [(r["job"], r["status"]) for r in rows] == [(0, "running")]
    finally:
        holder.communicate("")  # the holder exits, and its lock with it
    main(["sweep-summary", str(tmp_path / "sweep")])
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "summary.jsonl").read_text().splitlines()]
    assert [(r["job"], r["status"]) for r in rows] == [(0, "missing")]


def test_a_sweep_stopped_by_sigterm_still_writes_its_summary_and_frees_the_run(tmp_path):
    import signal
    import time

    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "saelab.app.cli", "train", "-m", "sae.d_sae=64", "sae.k=2,4", "source.d_in=16",
         "trainer.total_tokens=50000000", "trainer.batch_size=256", "trainer.device=cpu",
         "logging.progress=false", f"hydra.sweep.dir={sweep}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not list(sweep.glob("0_*/.lock")) and time.time() < deadline:  # job 0 is training
            time.sleep(0.2)
        assert list(sweep.glob("0_*/.lock")), "job 0 never started"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    rows = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [(r["job"], r["status"]) for r in rows] == [(0, "missing"), (1, "not started")]
    assert rows[1]["run"] is None and "sae.k=4" in rows[1]["overrides"] and "sae.k=2" in rows[0]["overrides"]
    assert not list(sweep.glob("*/.lock"))  # the job's lock was released on the way out


def test_planned_jobs_expand_the_recorded_sweep_as_hydras_basic_sweeper_numbers_them(tmp_path):
    """Jobs in Hydra's order (the last swept key varies fastest; sweeper params first); None where the order
    cannot be told again (a shuffled sweep) or the sweeper is another one."""
    from omegaconf import OmegaConf

    from saelab.app.sweep import planned_jobs

    def record(task: list[str], sweeper: dict) -> Path:
        OmegaConf.save(
            {"hydra": {"overrides": {"task": task}, "sweeper": sweeper}}, tmp_path / "multirun.yaml"
        )
        return tmp_path

    basic = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "max_batch_size": None}
    jobs = planned_jobs(
        record(["sae.k=2,4", "trainer.lr=range(1,3)", "x=1"], {**basic, "params": {"y": "5,6"}})
    )
    want = [
        [f"y={y}", f"sae.k={k}", f"trainer.lr={lr}", "x=1"] for y in (5, 6) for k in (2, 4) for lr in (1, 2)
    ]
    assert jobs == want
    escaped = "c=$\\{hydra\\:job.name\\}"  # as Hydra's sweeper writes an interpolation into a job's overrides
    assert planned_jobs(record(["sae.k=2,4", "c=${hydra:job.name}"], basic)) == [
        ["sae.k=2", escaped],
        ["sae.k=4", escaped],
    ]
    assert planned_jobs(record(["sae.k=shuffle(2,4)"], basic)) is None
    assert planned_jobs(record(["db=glob(*)"], basic)) is None  # needs the sweep's config loader
    assert planned_jobs(record(["sae.k=2,4"], {"_target_": "hydra_plugins.optuna.OptunaSweeper"})) is None
    (tmp_path / "multirun.yaml").unlink()
    assert planned_jobs(tmp_path) is None


def test_sweep_summary_adds_no_planned_rows_where_run_folders_carry_no_job_number(tmp_path):
    """Run folders named by their overrides alone (hydra.sweep.subdir=${hydra.job.override_dirname}): which
    planned job each is cannot be told by number, so the summary lists the runs and nothing more."""
    from omegaconf import OmegaConf

    from saelab.app.sweep import collect_sweep

    basic = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "max_batch_size": None}
    OmegaConf.save(
        {"hydra": {"overrides": {"task": ["a=1,2"]}, "sweeper": basic}}, tmp_path / "multirun.yaml"
    )
    for value in (1, 2):
        (tmp_path / f"a={value}" / ".hydra").mkdir(parents=True)
        OmegaConf.save(
            OmegaConf.create([f"a={value}"]), tmp_path / f"a={value}" / ".hydra" / "overrides.yaml"
        )
    rows = collect_sweep(tmp_path)
    assert [(r["job"], r["status"], r["overrides"]) for r in rows] == [
        (None, "missing", ["a=1"]),
        (None, "missing", ["a=2"]),
    ]


# ------------------------------------------------------------------ search sweepers and job results
SEARCH_RUN = ["source.d_in=16", "source.n_features=48", "sae.d_sae=64", "trainer.total_tokens=4096",
              "trainer.batch_size=256", "trainer.device=cpu", "logging.progress=false"]  # fmt: skip


def test_optuna_gets_each_runs_objective_and_a_failed_run_is_a_failed_trial(tmp_path):
    """hydra/sweeper=optuna_search, 2 trials of k in {4, 65} drawn by Optuna's seeded random sampler (seed 0: 65,
    then 4): k=65 (> d_sae) fails, which Optuna records as a failed trial, the search goes on, and k=4 returns its
    held-out FVU, the best value. (The grid sampler is avoided: hydra-optuna-sweeper 1.3 crashes when a grid's
    last trial fails.)"""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs hydra-optuna-sweeper (dev extra)")
    sweep = tmp_path / "sweep"
    main(["train", "-m", "hydra/sweeper=optuna_search", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
          "hydra.sweeper.n_trials=2", "sweep.objective=heldout/fvu", "trainer.eval_every=4", "sae.k=choice(4,65)",
          *SEARCH_RUN, f"hydra.sweep.dir={sweep}"])  # fmt: skip
    rows = _rows(sweep)
    assert [(row["job"], row["overrides"][0], row["status"]) for row in rows] == [
        (0, "sae.k=65", "missing"),
        (1, "sae.k=4", "done"),
    ]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert dict(best.best_params) == {"sae.k": 4}
    assert (
        best.best_value
        == rows[1]["heldout/fvu"]
        == json.loads((sweep / rows[1]["run"] / "summary.json").read_text())["heldout/fvu"]
    )


def test_sweep_settings_the_runs_cannot_honour_stop_the_sweep_before_any_job(tmp_path):
    with pytest.raises(
        SystemExit, match=r"sweep.objective='heldout/fvu' is not a metric .*trainer.eval_every > 0"
    ):
        main(
            [
                "train",
                "-m",
                "sweep.objective=heldout/fvu",
                "sae.k=2,4",
                *SEARCH_RUN,
                f"hydra.sweep.dir={tmp_path / 'a'}",
            ]
        )
    with pytest.raises(SystemExit, match=r"sweep.direction='up' must be one of \['minimize', 'maximize'\]"):
        main(
            [
                "train",
                "-m",
                "sweep.direction=up",
                "sae.k=2,4",
                *SEARCH_RUN,
                f"hydra.sweep.dir={tmp_path / 'b'}",
            ]
        )
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
        with pytest.raises(
            SystemExit, match=r"OptunaSweeper, which needs a number from every run: set sweep.objective"
        ):
            main(
                [
                    "train",
                    "-m",
                    "hydra/sweeper=optuna_search",
                    *SEARCH_RUN,
                    f"hydra.sweep.dir={tmp_path / 'c'}",
                ]
            )
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_train_job_returns_a_small_result_that_unpickles_without_torch():
    """What a launcher pickles (submitit: into the job's result file, read by the submitting process, often on a
    CPU-only login node): numbers and paths, no SAE, no tensors."""
    from saelab.app.cli import _train

    register_configs()
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("config", overrides=[*SEARCH_RUN, "sae.k=4"])
    data = pickle.dumps(_train(cfg))
    assert len(data) < 2048
    code = (
        "import json, pickle, sys; sys.modules['torch'] = None; "
        "print(json.dumps(pickle.loads(sys.stdin.buffer.read())['metrics']))"
    )
    shown = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, check=True)
    assert set(json.loads(shown.stdout)) >= {"fvu", "l0", "dead_frac", "loss"}

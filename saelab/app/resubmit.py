"""`saelab sweep-resubmit DIR [overrides]`: launch a sweep's unfinished jobs again, each into its own run folder.

The jobs `saelab sweep-summary DIR` lists as failed (a SLURM job that raised, was cancelled, timed out, ...),
missing (a local run that failed or was stopped) or not started run again with the sweep's own launcher (the
Hydra overrides DIR/multirun.yaml records, e.g. hydra/launcher=slurm), each with its recorded overrides plus
- `hydra.sweep.subdir=<its folder>`, so it writes into its own run folder (a job that never started gets the
  folder it would have had);
- `trainer.resume_from=<its folder>` where that folder holds a checkpoint, so it continues from there;
- the command line's overrides, replacing recorded ones of the same key (`hydra.*` ones apply to the launcher,
  e.g. hydra.launcher.timeout_min=600; `trainer.total_tokens=...` may change on resume).
A run folder's earlier Hydra record (.hydra/*.yaml) is kept in .hydra/attempt-<time>/ before the job writes its
own. The command waits for the jobs as a sweep does; summary.jsonl is then rewritten and printed (the
SweepSummary callback). It runs from the sweep's own working directory (Hydra's record of it), so relative
paths in the overrides mean what they meant.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from saelab.app.resume import RESUME_KEY, hydra_quote, override_key
from saelab.app.sweep import MULTIRUN_CONFIG, OVERRIDES, collect_sweep, format_table
from saelab.core.atomic import atomic_directory
from saelab.io.layout import list_checkpoints

#: Statuses of `collect_sweep` rows that are launched again.
RESUBMIT = ("failed", "missing", "not started")
SWEEPER = "saelab_resubmit"
#: Hydra overrides of the original sweep that the resubmission replaces.
REPLACED_HYDRA_KEYS = (
    "hydra.sweep.dir",
    "hydra.sweep.subdir",
    "hydra/sweeper",
    "hydra.sweeper",
    "hydra.mode",
)


#: The resubmission `main` is running: each job's overrides (read by hydra/sweeper=saelab_resubmit, the sweeper in
#: hydra_plugins/saelab_resubmit).
_planned: list[list[str]] = []


def planned_jobs() -> list[list[str]]:
    """The jobs of the resubmission in progress (empty outside `main`)."""
    return list(_planned)


def _replaces(key: str | None, keys: Sequence[str]) -> bool:
    return key is not None and any(key == k or key.startswith(k + ".") for k in keys)


def job_overrides(sweep_dir: Path, row: dict[str, Any], subdir_template: str, extra: list[str]) -> list[str]:
    """One job's overrides: its recorded ones, the command line's (winning key by key), its run folder and, where
    that folder holds a checkpoint, the resume from it."""
    extra_keys = {override_key(o) for o in extra}
    recorded = [o for o in row["overrides"] if override_key(o) not in extra_keys | {RESUME_KEY}]
    if row["run"] is not None:
        subdir = row["run"]
    else:  # never started: the folder the sweep would have given it
        subdir = subdir_template.replace("${hydra.job.num}", str(row["job"]))
    overrides = [*recorded, *extra, f"hydra.sweep.subdir={hydra_quote(subdir)}"]
    run = sweep_dir / subdir if row["run"] is not None else None
    if run is not None and list_checkpoints(run / "checkpoints"):
        overrides.append(f"{RESUME_KEY}={hydra_quote(str(run))}")
    return overrides


def hydra_overrides(sweep_dir: Path, recorded: list[str], extra: list[str]) -> list[str]:
    """The resubmission's Hydra-level overrides: the sweep's (its launcher and settings), the command line's
    `hydra.*` ones winning key by key, this sweep folder, and the resubmitting sweeper."""
    extra_keys = {override_key(o) for o in extra}
    kept = [
        o
        for o in recorded
        if not _replaces(override_key(o), REPLACED_HYDRA_KEYS) and override_key(o) not in extra_keys
    ]
    return [*kept, *extra, f"hydra.sweep.dir={hydra_quote(str(sweep_dir))}", f"hydra/sweeper={SWEEPER}"]


def keep_hydra_record(run: Path, stamp: str) -> None:
    """Copy a run folder's Hydra record (.hydra/*.yaml) to .hydra/attempt-<stamp>/ before a new attempt
    rewrites it."""
    record = run / OVERRIDES.parent
    files = sorted(record.glob("*.yaml")) if record.is_dir() else []
    if files:
        with atomic_directory(record / f"attempt-{stamp}") as tmp:
            for path in files:
                shutil.copy2(path, tmp / path.name)


def main(argv: list[str], train_command: Callable[[list[str]], None]) -> None:
    """`saelab sweep-resubmit DIR [overrides]`: launch the sweep's failed, missing and not-started jobs again
    (see the module docstring); `train_command` is `saelab train`'s Hydra command."""
    parser = argparse.ArgumentParser(prog="saelab sweep-resubmit", description=main.__doc__)
    parser.add_argument("sweep_dir", help="a multirun directory, e.g. multirun/2025-01-31/12-00-00")
    parser.add_argument("overrides", nargs="*", help="overrides for every resubmitted job (key=value)")
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep_dir).resolve()
    if not (sweep_dir / MULTIRUN_CONFIG).is_file():
        raise SystemExit(f"{sweep_dir} holds no {MULTIRUN_CONFIG}: it is not the folder of a Hydra multirun.")
    rows = collect_sweep(sweep_dir)
    unknown = [row for row in rows if row["status"] == "missing" and "slurm_job_id" in row]
    if unknown:
        raise SystemExit(
            f"cannot tell whether SLURM jobs {[row['slurm_job_id'] for row in unknown]} still run: squeue is not "
            "available here. Run sweep-resubmit where the sweep's jobs were submitted."
        )
    chosen = [row for row in rows if row["status"] in RESUBMIT]
    if not chosen:
        print(f"nothing to resubmit in {sweep_dir}: no job is failed, missing or not started.")
        return
    hydra_record = OmegaConf.load(sweep_dir / MULTIRUN_CONFIG).hydra
    template = OmegaConf.to_container(hydra_record.sweep, resolve=False)["subdir"]
    hydra_extra = [o for o in args.overrides if (override_key(o) or "").startswith("hydra")]
    task_extra = [o for o in args.overrides if o not in hydra_extra]
    jobs = [job_overrides(sweep_dir, row, template, task_extra) for row in chosen]
    print(format_table(chosen))
    print(f"resubmitting {len(chosen)} job(s) of {sweep_dir}")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    for row in chosen:
        if row["run"] is not None:
            keep_hydra_record(sweep_dir / row["run"], stamp)
    recorded = [str(o) for o in OmegaConf.to_container(hydra_record.overrides.hydra)]
    cwd, sweep_cwd = os.getcwd(), Path(str(hydra_record.runtime.cwd))
    if sweep_cwd.is_dir():
        os.chdir(sweep_cwd)
    else:
        print(f"the sweep's working directory {sweep_cwd} is gone: relative paths are taken from {cwd}")
    _planned[:] = jobs
    try:
        train_command(["-m", *hydra_overrides(sweep_dir, recorded, hydra_extra)])
    finally:
        os.chdir(cwd)
        _planned.clear()

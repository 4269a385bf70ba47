"""Hydra sweeps: per-run wandb naming, and one summary table per sweep.

`saelab train -m sae.k=16,32 trainer.lr=1e-3,3e-3` runs every combination, locally one after another or as
SLURM jobs (`hydra/launcher=slurm`); each run writes `<sweep dir>/<num>_<overrides>/summary.json`. Inside a
sweep every run's wandb group defaults to the sweep directory and its name to the run's overrides.

`write_sweep_summary(dir)` gathers the runs' summaries into `<sweep dir>/summary.jsonl`, one row per run:
`job` (its number), `run` (its folder), `status`, `overrides` and the run's final metrics. Status: "done" (it
wrote summary.json); "failed" for a job of hydra/launcher=together that stopped alone (its error.json: `error`,
`failed_at_step`); for a SLURM job (hydra-submitit-launcher's `.submitit/` folder) "pending", "running" or
"failed" by squeue and submitit's result file, with `slurm_job_id`, `slurm_state` and the job's `error`;
"running" for a local run whose process still holds its run directory's lock; "not started" for a job of the
sweep (as Hydra's basic sweeper expands the `multirun.yaml` it wrote) with no run folder yet, e.g. after the
sweep was stopped; "missing" where none of these tells (a local run that failed, or no squeue here). It runs
when a multirun ends, also with an error (the SweepSummary callback in configs/config.yaml), and as
`saelab sweep-summary DIR`, for a sweep whose SLURM jobs outlived the process that submitted them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from saelab.app.slurm_jobs import ACTIVE, SUBMITIT, WAITING, SubmittedJob, queue_states, submitted_jobs
from saelab.core.atomic import atomic_file
from saelab.eval.frontier import write_sweep_frontier
from saelab.io.layout import FAILURE_FILE
from saelab.train.config import LoggingConfig
from saelab.train.lock import held_elsewhere

MULTIRUN_CONFIG = "multirun.yaml"
RUN_SUMMARY = "summary.json"
SWEEP_SUMMARY = "summary.jsonl"
OVERRIDES = Path(".hydra") / "overrides.yaml"
#: Metrics shown in the printed table (when some run has them); summary.jsonl keeps every metric.
TABLE_METRICS = ("loss", "fvu", "l0", "dead_frac", "mmcs", "frac_recovered")


def sweep_logging(cfg: LoggingConfig) -> LoggingConfig:
    """Inside a Hydra multirun, default the wandb group to the sweep directory and the run name to the job's
    folder name (its number and overrides, `saelab.app.resolvers.safe_dirname`); explicit logging.group /
    logging.run_name win. Unchanged outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return cfg
    hydra = HydraConfig.get()
    name = Path(hydra.runtime.output_dir).name  # the job's folder: its number and flat, short overrides
    return dataclasses.replace(cfg, group=cfg.group or str(hydra.sweep.dir), run_name=cfg.run_name or name)


def _job_number(name: str) -> int | None:
    match = re.match(r"(\d+)(_|$)", name)
    return int(match.group(1)) if match else None


def _order(num: int | None, run: str | None) -> tuple[int, str]:
    return (-1 if num is None else num, run or "")


def run_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's run folders (holding Hydra's .hydra/overrides.yaml or a summary.json), in job order."""
    found = {p.parents[1] for p in sweep_dir.rglob(str(OVERRIDES))}
    found |= {p.parent for p in sweep_dir.rglob(RUN_SUMMARY)}
    runs = [d for d in found if SUBMITIT not in d.relative_to(sweep_dir).parts]
    return sorted(runs, key=lambda d: _order(_job_number(d.name), d.relative_to(sweep_dir).as_posix()))


#: A resume's path is bookkeeping, not a setting of the job (Hydra's override_dirname leaves it out too).
RESUME_OVERRIDE = "trainer.resume_from="


def _job_overrides(overrides: list[Any]) -> list[str]:
    """A job's settings among its overrides: without the resume path (sweep-resubmit adds one) and Hydra's own."""
    return [str(o) for o in overrides if not str(o).startswith((RESUME_OVERRIDE, "hydra.", "hydra/"))]


def _run_row(root: Path, run: Path) -> dict[str, Any]:
    recorded = OmegaConf.to_container(OmegaConf.load(run / OVERRIDES)) if (run / OVERRIDES).is_file() else []
    overrides = _job_overrides(recorded)
    row: dict[str, Any] = {
        "job": _job_number(run.name),
        "run": run.relative_to(root).as_posix(),
        "status": "missing",
        "overrides": overrides,
    }
    if (run / RUN_SUMMARY).is_file():
        summary = json.loads((run / RUN_SUMMARY).read_text())
        summary.pop("config", None)
        row.update(status="done", **summary)
    elif (run / FAILURE_FILE).is_file():  # a job of hydra/launcher=together that stopped alone says why
        failure = json.loads((run / FAILURE_FILE).read_text())
        row.update(status="failed", error=failure.get("error"), failed_at_step=failure.get("step"))
    elif held_elsewhere(run):  # a job still training there holds its run directory's lock
        row["status"] = "running"
    return row


def submission(job: SubmittedJob) -> tuple[int | None, list[str]]:
    """A submitted job's number and overrides (`SubmittedJob.submission`). A job that `saelab sweep-resubmit`
    launched again names its run folder in a hydra.sweep.subdir override: the folder's number is the job's (its
    position in the resubmitted batch is not)."""
    num, overrides = job.submission()
    subdirs = [o.split("=", 1)[1].strip("'\"") for o in overrides if o.startswith("hydra.sweep.subdir=")]
    if subdirs:
        num = _job_number(Path(subdirs[-1]).name)
    return num, _job_overrides(overrides)


def latest_submissions(
    jobs: list[SubmittedJob], submissions: dict[str, tuple[int | None, list[str]]]
) -> list[SubmittedJob]:
    """The jobs (in job id order) without those a later submission of the same job number replaced
    (sweep-resubmit); `submissions`: each job id's `submission`."""
    latest = {submissions[job.job_id][0]: job for job in jobs}  # in job id order: the last one wins
    return [
        job for job in jobs if submissions[job.job_id][0] is None or latest[submissions[job.job_id][0]] is job
    ]


def _not_started_row(submitted: tuple[int | None, list[str]]) -> dict[str, Any]:
    num, overrides = submitted
    return {"job": num, "run": None, "status": "missing", "overrides": overrides}


def planned_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Every job's overrides, in job order, as Hydra's basic sweeper expands the sweep recorded in
    <sweep_dir>/multirun.yaml (the command line's overrides unresolved, as Hydra keeps them); None where that
    cannot be told (no such file, another sweeper, a shuffled sweep, or an override that needs what only the
    running sweep had, e.g. glob's config loader or a ${hydra:...} interpolation)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    path = sweep_dir / MULTIRUN_CONFIG
    if not path.is_file():
        return None
    hydra = OmegaConf.load(path).get("hydra", {})
    if not str(OmegaConf.select(hydra, "sweeper._target_", default="")).endswith(".BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    try:
        params = OmegaConf.select(hydra, "sweeper.params", default=None) or {}
        task = OmegaConf.select(hydra, "overrides.task", default=None)
        arguments = [f"{k}={v}" for k, v in params.items()]
        arguments += OmegaConf.to_container(task, resolve=False) if task is not None else []
        overrides = OverridesParser.create().parse_overrides(arguments)
        if any(getattr(o.value(), "shuffle", False) for o in overrides if o.is_sweep_override()):
            return None
        return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except (HydraException, OmegaConfBaseException):
        return None


def _slurm_job_id(run: Path) -> str | None:
    """The SLURM job id the submitit launcher recorded in the run's .hydra/hydra.yaml (hydra.job.id)."""
    hydra_yaml = run / OVERRIDES.parent / "hydra.yaml"
    if not hydra_yaml.is_file():
        return None
    job_id = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.id", default=None)
    return None if job_id is None else str(job_id)


def _unfinished_status(job: SubmittedJob, states: dict[str, str] | None) -> dict[str, Any]:
    """status (and slurm_state / error) of a submitted job without summary.json."""
    outcome = job.outcome()
    if outcome is not None and outcome[0] == "error":
        return {"status": "failed", "error": outcome[1]}
    if states is None:  # no squeue here: pending, running or ended, unknown
        return {"status": "missing"}
    state = states.get(job.job_id, "NOT_LISTED")  # not listed: ended more than MinJobAge ago
    if state in WAITING:
        return {"status": "pending", "slurm_state": state}
    if state in ACTIVE:
        return {"status": "running", "slurm_state": state}
    return {"status": "failed", "slurm_state": state}  # ended (even COMPLETED) without writing its summary


def _run_of_job(
    runs: dict[Path, dict[str, Any]],
    jobs: list[SubmittedJob],
    submissions: dict[str, tuple[int | None, list[str]]],
) -> dict[str | None, Path]:
    """Each run folder under the SLURM job that runs (or ran) it: the job id its .hydra/hydra.yaml records or,
    where sweep-resubmit submitted that job number again, the newest submission's."""
    if not jobs:
        return {}
    ids = {job.job_id for job in jobs}
    newest = {submissions[job.job_id][0]: job.job_id for job in jobs}
    found: dict[str | None, Path] = {}
    for run, row in runs.items():
        job_id = _slurm_job_id(run)
        if job_id not in ids and row["job"] is not None:
            job_id = newest.get(row["job"], job_id)
        found[job_id] = run
    return found


def collect_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per run of the sweep: job (number), run (folder; None for a job that has not started),
    status, overrides and the run's summary.json (without its config). A run without summary.json that was
    submitted to SLURM is pending, running or failed (by squeue and submitit's result file; slurm_state and
    error say more); otherwise, or where squeue is unavailable, it is missing. A job of the sweep that neither
    has a folder nor was submitted is not started (`planned_jobs`)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {str(root)!r} does not exist.")
    runs = {run: _run_row(root, run) for run in run_dirs(root)}
    submitted = submitted_jobs(root)
    submissions = {job.job_id: submission(job) for job in submitted}
    jobs = latest_submissions(submitted, submissions)
    run_of_job = _run_of_job(runs, jobs, submissions)
    job_rows = {  # a job that has not started has no run folder yet: its row comes from submitit's pickle
        job.job_id: runs[run_of_job[job.job_id]]
        if job.job_id in run_of_job
        else _not_started_row(submissions[job.job_id])
        for job in jobs
    }
    unfinished = [job for job in jobs if job_rows[job.job_id]["status"] != "done"]
    states = queue_states(job.job_id for job in unfinished) if unfinished else {}
    for job in jobs:
        job_rows[job.job_id]["slurm_job_id"] = job.job_id
    for job in unfinished:
        job_rows[job.job_id].update(_unfinished_status(job, states))
    not_started = [row for row in job_rows.values() if row["run"] is None]
    listed = [*runs.values(), *not_started]
    numbers, overrides = {row["job"] for row in listed}, {tuple(row["overrides"]) for row in listed}
    if None not in numbers:  # where some run has no number, which planned job it is cannot be told
        not_started += [
            {"job": num, "run": None, "status": "not started", "overrides": job}
            for num, job in enumerate(planned_jobs(root) or [])
            if num not in numbers and tuple(job) not in overrides
        ]
    return sorted([*runs.values(), *not_started], key=lambda row: _order(row["job"], row["run"]))


def write_sweep_summary(sweep_dir: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """Write <sweep_dir>/summary.jsonl (atomically) and the frontier of its runs (`saelab.eval.frontier`);
    returns the summary's path and the rows."""
    rows = collect_sweep(sweep_dir)
    path = Path(sweep_dir) / SWEEP_SUMMARY
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
    write_sweep_frontier(
        sweep_dir, rows
    )  # frontier_*.png + frontier.html: L0 against FVU / CE loss recovered
    return path, rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table: job number, status, the overrides that differ between runs, and the
    TABLE_METRICS some run reports (a failed SLURM job shows its final state, e.g. "failed (CANCELLED)")."""
    metrics = [m for m in TABLE_METRICS if any(m in row for row in rows)]
    shared = set.intersection(*(set(row["overrides"]) for row in rows)) if len(rows) > 1 else set()
    header = ["job", "status", "overrides", *metrics]
    lines = [
        [
            "?" if row["job"] is None else row["job"],
            row["status"]
            + (f" ({row['slurm_state']})" if row["status"] == "failed" and "slurm_state" in row else ""),
            " ".join(o for o in row["overrides"] if o not in shared),
            *(f"{row[m]:.4g}" if isinstance(row.get(m), (int, float)) else "-" for m in metrics),
        ]
        for row in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
    cells = (
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in [header, *lines]
    )
    return "\n".join(line.rstrip() for line in cells)


def summary_counts(rows: list[dict[str, Any]]) -> str:
    """e.g. "4 runs (2 done): 1 running, 1 pending"."""
    counts = Counter(row["status"] for row in rows)
    statuses = ("running", "pending", "not started", "failed", "missing")
    rest = ", ".join(f"{counts[s]} {s}" for s in statuses if counts[s])
    return f"{len(rows)} runs ({counts['done']} done)" + (f": {rest}" if rest else "")


def main(argv: list[str]) -> None:
    """`saelab sweep-summary DIR`: (re)collect a sweep's summary.jsonl and print its table."""
    parser = argparse.ArgumentParser(prog="saelab sweep-summary", description=main.__doc__)
    parser.add_argument("sweep_dir", help="a multirun directory, e.g. multirun/2025-01-31/12-00-00")
    args = parser.parse_args(argv)
    path, rows = write_sweep_summary(args.sweep_dir)
    print(format_table(rows))
    print(f"{summary_counts(rows)} -> {path}")

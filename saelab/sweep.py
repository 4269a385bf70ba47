"""Hydra sweeps: per-run wandb naming, and one summary table per sweep.

`saelab train -m sae.k=16,32 trainer.lr=1e-3,3e-3` runs every combination, locally one after another or as
SLURM jobs (`hydra/launcher=slurm`); each run writes `<sweep dir>/<num>_<overrides>/summary.json`. Inside a
sweep every run's wandb group defaults to the sweep directory and its name to the run's overrides.

`write_sweep_summary(dir)` gathers the runs' summaries into `<sweep dir>/summary.jsonl`, one row per run:
`run` (its folder), `status` ("done", or "missing" for a run without summary.json: failed or still
running), `overrides` and the run's final metrics. It runs when a multirun ends (the SweepSummary callback in
configs/config.yaml) and as `saelab sweep-summary DIR`, for a sweep whose SLURM jobs outlived the process that
submitted them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from saelab.atomic import atomic_file
from saelab.train.config import LoggingConfig

RUN_SUMMARY = "summary.json"
SWEEP_SUMMARY = "summary.jsonl"
OVERRIDES = Path(".hydra") / "overrides.yaml"
#: Metrics shown in the printed table (when some run has them); summary.jsonl keeps every metric.
TABLE_METRICS = ("loss", "fvu", "l0", "dead_frac", "mmcs", "frac_recovered")


def sweep_logging(cfg: LoggingConfig) -> LoggingConfig:
    """Inside a Hydra multirun, default the wandb group to the sweep directory and the run name to the job's
    number and overrides; explicit logging.group / logging.run_name win. Unchanged outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return cfg
    hydra = HydraConfig.get()
    name = "_".join(str(p) for p in (hydra.job.num, hydra.job.override_dirname) if p != "")
    return dataclasses.replace(cfg, group=cfg.group or str(hydra.sweep.dir), run_name=cfg.run_name or name)


def _job_order(run: str) -> tuple[int, str]:
    match = re.match(r"(\d+)_?", run)
    return (int(match.group(1)) if match else -1, run)


def run_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's run folders (holding Hydra's .hydra/overrides.yaml or a summary.json), in job order."""
    found = {p.parents[1] for p in sweep_dir.rglob(str(OVERRIDES))}
    found |= {p.parent for p in sweep_dir.rglob(RUN_SUMMARY)}
    runs = [d for d in found if ".submitit" not in d.relative_to(sweep_dir).parts]
    return sorted(runs, key=lambda d: _job_order(d.relative_to(sweep_dir).as_posix()))


def collect_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per run of the sweep: run, status, overrides and the run's summary.json (without its config)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {str(root)!r} does not exist.")
    rows = []
    for run in run_dirs(root):
        overrides = (
            OmegaConf.to_container(OmegaConf.load(run / OVERRIDES)) if (run / OVERRIDES).is_file() else []
        )
        row: dict[str, Any] = {
            "run": run.relative_to(root).as_posix(),
            "status": "missing",
            "overrides": overrides,
        }
        if (run / RUN_SUMMARY).is_file():
            summary = json.loads((run / RUN_SUMMARY).read_text())
            summary.pop("config", None)
            row.update(status="done", **summary)
        rows.append(row)
    return rows


def write_sweep_summary(sweep_dir: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """Write <sweep_dir>/summary.jsonl (atomically); returns its path and the rows."""
    rows = collect_sweep(sweep_dir)
    path = Path(sweep_dir) / SWEEP_SUMMARY
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
    return path, rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table: job number, status, the overrides that differ between runs, and the
    TABLE_METRICS some run reports."""
    metrics = [m for m in TABLE_METRICS if any(m in row for row in rows)]
    shared = set.intersection(*(set(row["overrides"]) for row in rows)) if len(rows) > 1 else set()
    header = ["job", "status", "overrides", *metrics]
    lines = [
        [
            row["run"].split("_")[0],
            row["status"],
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


def main(argv: list[str]) -> None:
    """`saelab sweep-summary DIR`: (re)collect a sweep's summary.jsonl and print its table."""
    parser = argparse.ArgumentParser(prog="saelab sweep-summary", description=main.__doc__)
    parser.add_argument("sweep_dir", help="a multirun directory, e.g. multirun/2025-01-31/12-00-00")
    args = parser.parse_args(argv)
    path, rows = write_sweep_summary(args.sweep_dir)
    print(format_table(rows))
    print(f"{len(rows)} runs ({sum(r['status'] == 'done' for r in rows)} done) -> {path}")

"""What a search sweeper optimises, and what every `saelab train` job returns to its launcher.

Hydra's search sweepers (Optuna, Nevergrad, Ax) need one float from each run. `sweep.objective` names a metric of
the run's summary.json and `sweep.direction` says which way is better; the train task then returns that float
(`objective_value`). Without an objective it returns `job_result`: a small dict of numbers and paths that
unpickles anywhere (no SAE, no tensors, no saelab import: submitit pickles it into each SLURM job's result file,
which the submitting process, often on a CPU-only login node, reads back).

A run that gives no number (it failed, or its metric is NaN) is reported the way each sweeper takes it
(`unscored`): Optuna records a job that raised as a FAILed trial (hydra-optuna-sweeper refuses a NaN value, and
stops the search once more than `hydra.sweeper.max_failure_rate` of a batch failed), so the failure is raised;
Nevergrad stops on a job that raised but clips a NaN loss to its worst value, so NaN is returned, as it is to any
other sweeper.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Metrics every run's summary.json holds (the saved SAE's FVU and L0 on the last batch, the dead fraction, the
#: last logged loss).
ALWAYS = ("fvu", "l0", "dead_frac", "loss")
#: The held-out evaluation's, with trainer.eval_every > 0 (`saelab.metrics.heldout`).
HELDOUT = ("heldout/fvu", "heldout/l0", "heldout/cosine", "heldout/dead_frac")
#: Recovery of the planted features, on the synthetic source.
RECOVERY = ("mmcs", "frac_recovered")
DIRECTIONS = ("minimize", "maximize")
#: Sweeper classes that need a float from every run.
SEARCH_SWEEPERS = ("OptunaSweeper", "NevergradSweeper", "AxSweeper")


def objective_names(eval_every: int, source_kind: str | None) -> tuple[str, ...]:
    """The metrics a run with these settings reports: held-out ones only with eval_every > 0, recovery only on
    the synthetic source."""
    return ALWAYS + (HELDOUT if eval_every else ()) + (RECOVERY if source_kind == "synthetic" else ())


def search_sweeper(sweeper_target: str | None) -> str | None:
    """The class name of a sweeper that needs a float from every run (Optuna, Nevergrad, Ax), else None."""
    name = str(sweeper_target or "").rsplit(".", 1)[-1]
    return name if name in SEARCH_SWEEPERS else None


def check_sweep(
    objective: str | None, direction: str, eval_every: int, source_kind: str | None, sweeper: str | None
) -> None:
    """Raise ValueError naming the sweep field to fix: a direction other than minimize / maximize, an objective
    this run does not report, or a search sweeper without an objective."""
    if direction not in DIRECTIONS:
        raise ValueError(f"sweep.direction={direction!r} must be one of {list(DIRECTIONS)}.")
    valid = objective_names(eval_every, source_kind)
    if objective is None:
        if sweeper is not None:
            raise ValueError(
                f"hydra/sweeper uses {sweeper}, which needs a number from every run: set sweep.objective to one of "
                f"{list(valid)}{_heldout_hint(eval_every)}, and sweep.direction (minimize or maximize)."
            )
        return
    if objective not in valid:
        raise ValueError(
            f"sweep.objective={objective!r} is not a metric this run reports; valid keys: {list(valid)}"
            f"{_heldout_hint(eval_every) if objective in HELDOUT or not eval_every else ''}"
            + (" (mmcs and frac_recovered need source=synthetic)." if objective in RECOVERY else ".")
        )


def _heldout_hint(eval_every: int) -> str:
    return "" if eval_every else " (the held-out metrics heldout/* need trainer.eval_every > 0)"


def objective_value(summary: dict[str, Any], objective: str) -> float:
    """The run's objective (NaN where its summary has no finite value for it)."""
    value = summary.get(objective)
    return float(value) if isinstance(value, (int, float)) else math.nan


def unscored(sweeper: str | None, objective: str, error: BaseException | None, value: float) -> float:
    """What to give the sweeper for a run without a usable objective (`error`: why the run failed; else the
    objective's non-finite `value`): Optuna gets an exception (a FAILed trial), other sweepers NaN."""
    reason = f"the run failed ({type(error).__name__}: {error})" if error else f"{objective} is {value}"
    if sweeper == "OptunaSweeper":
        if error is not None:
            raise error
        raise FloatingPointError(
            f"sweep.objective={objective}: {reason}; Optuna records the trial as failed."
        )
    log.warning("sweep.objective=%s: %s; the sweeper gets NaN.", objective, reason)
    return math.nan


def job_result(run_dir: Path | None, metrics: dict[str, Any]) -> dict[str, Any]:
    """What a `saelab train` job returns when there is no objective: its run and SAE folders (None when nothing
    was written, e.g. ranks other than 0) and its summary's numbers. Plain Python types only."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {
        "run_dir": None if run_dir is None else str(run_dir),
        "sae_dir": None if run_dir is None else str(run_dir / "sae"),
        "metrics": numbers,
    }

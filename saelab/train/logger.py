"""Run logging: a progress bar with throughput and key metrics, optional wandb (offline works, no account)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from saelab.train.config import LoggingConfig


class RunLogger:
    """Progress bar + wandb. Construct with the run's config dict; call `log(step, metrics)` and `close()`."""

    def __init__(
        self, cfg: LoggingConfig, total_steps: int, run_config: dict[str, Any], output_dir: Path | None
    ):
        cfg.validate()
        self.cfg = cfg
        # In a log file (SLURM, CI) redraw every 30 s instead of many times a second.
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps,
            disable=not cfg.progress,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.1 if interactive else 30.0,
        )
        self.wandb_run = None
        if cfg.wandb_mode != "disabled":
            import wandb

            if output_dir is not None:
                os.makedirs(output_dir, exist_ok=True)
            self.wandb_run = wandb.init(
                mode=cfg.wandb_mode,
                project=cfg.project,
                entity=cfg.entity,
                group=cfg.group,
                name=cfg.run_name,
                config=run_config,
                dir=str(output_dir) if output_dir is not None else None,
                reinit="create_new",  # several runs may be open at once (hydra/launcher=together)
            )

    def start_at(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        shown = ("tokens_per_s", "loss", "l0", "fvu", "dead_frac")
        self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in shown if k in metrics}, refresh=False)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(values)

    def close(self) -> None:
        self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

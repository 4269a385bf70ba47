"""Hydra callbacks of `saelab train`, listed under `hydra.callbacks` in configs/config.yaml.

SharedRunDir: a single run resuming with trainer.resume_from runs in the resumed run's directory, its Hydra
record going to `.hydra/resume-<time>/` (saelab.app.resume). Under torchrun every rank composes its own config,
and Hydra's `${now:...}` resolves to each process's own clock, so the ranks could pick different run
directories. Rank 0's resolved directory is broadcast to all ranks before any of them creates it; the other
ranks also skip `.hydra/` and the log file.
In a SLURM job that submitit started with several tasks, each task first exports torchrun's variables. Rank 0
takes the run directory's lock (saelab.train.lock) before Hydra writes `.hydra/` there (the job re-enters it);
where another live run holds it, Hydra is told to write neither `.hydra/` nor its log there, and the job then
fails naming the holder, so the live run's records stay intact (Hydra only warns about a callback's exception).

SlurmJobStates: with a SLURM launcher, poll job states with squeue once sacct fails (clusters without
accounting), instead of a warning every poll and a wait without end for a cancelled job (saelab.app.slurm_watcher).

SweepObjective: before a multirun launches anything, check its `sweep` settings (a search sweeper such as Optuna
needs sweep.objective, one the runs report; saelab.app.objective) and stop with the message if they are wrong.

SweepSummary: when a multirun ends, gather the runs' summary.json files into the sweep's summary.jsonl
(saelab.app.sweep), also when it ends with an error (a failed or cancelled job) or is interrupted (Ctrl-C, or
SIGTERM, which it turns into a normal exit).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


def _drop_file_handlers(job_logging: DictConfig) -> None:
    """Remove the logging handlers that write files (and their uses) from a logging dictConfig."""
    handlers = job_logging.get("handlers") or {}
    files = [name for name, h in handlers.items() if "FileHandler" in str(h.get("class", ""))]
    for name in files:
        del handlers[name]
    owners = [job_logging.get("root"), *(job_logging.get("loggers") or {}).values()]
    for owner in owners:
        if owner is not None and owner.get("handlers") is not None:
            owner.handlers = [h for h in owner.handlers if h not in files]


def export_torchrun_environment() -> None:
    """Inside a SLURM job submitted by submitit with several tasks, export RANK / WORLD_SIZE / LOCAL_RANK /
    MASTER_ADDR / MASTER_PORT as torchrun would (submitit's own mapping of the SLURM variables)."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class SharedRunDir(Callback):
    """Give every torchrun rank rank 0's run directory; only rank 0 writes Hydra's files there."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        export_torchrun_environment()

    locked: str | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from saelab.app.resume import resume_in_place
        from saelab.parallel import distributed
        from saelab.train import lock

        resume_in_place(config)
        if distributed.env_world_size() > 1:
            from saelab.core.device import resolve_device

            device = resolve_device(str(OmegaConf.select(config, "trainer.device", default="auto")))
            ranks = distributed.setup(device)
            run_dir = ranks.broadcast_object(str(config.hydra.run.dir))
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.run.dir = run_dir
                if not ranks.is_main:
                    config.hydra.output_subdir = None
                    _drop_file_handlers(config.hydra.job_logging)
                    return
        run_dir = str(config.hydra.run.dir)
        try:
            lock.acquire(run_dir)
        except lock.RunDirInUse:
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = None
                _drop_file_handlers(config.hydra.job_logging)
            return
        self.locked = run_dir

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        from saelab.train import lock

        if self.locked is not None:
            lock.release(self.locked)
            self.locked = None


class SlurmJobStates(Callback):
    """With submitit's SLURM launcher, poll job states with sacct while it works, then with squeue."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        target = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
        if target.startswith("hydra_plugins.hydra_submitit_launcher") and target.endswith("SlurmLauncher"):
            from saelab.app import slurm_watcher

            slurm_watcher.install()


class SweepObjective(Callback):
    """Refuse a multirun whose sweep settings the runs cannot honour, before any job starts (a SystemExit: Hydra
    turns a callback's other exceptions into warnings)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from saelab.app.objective import check_sweep, search_sweeper

        try:
            check_sweep(
                OmegaConf.select(config, "sweep.objective", default=None),
                OmegaConf.select(config, "sweep.direction", default="minimize"),
                int(OmegaConf.select(config, "trainer.eval_every", default=0)),
                OmegaConf.select(config, "source.kind", default=None),
                search_sweeper(OmegaConf.select(config, "hydra.sweeper._target_", default=None)),
            )
        except ValueError as err:
            raise SystemExit(f"Error: {err}") from None


def exit_on_sigterm() -> bool:
    """Turn SIGTERM (`kill`, a scheduler's stop) into SystemExit(143) in the main thread, so that a sweep still
    runs its `finally` blocks (the job's run-directory lock) and atexit hooks (the sweep summary) as it stops.
    A handler someone else installed is left in place. Returns whether it installed one."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return True


class SweepSummary(Callback):
    """Write <sweep dir>/summary.jsonl (one row per run) and log its table when a multirun ends: from
    on_multirun_end, or at exit where the multirun raised (Hydra skips on_multirun_end then)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        atexit.register(self.write)
        self.sigterm_installed = exit_on_sigterm()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self.write)
        if getattr(self, "sigterm_installed", False):  # the sweep is over: SIGTERM acts as before again
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.write()

    def write(self) -> None:
        from saelab.app.sweep import format_table, summary_counts, write_sweep_summary

        if not self.sweep_dir.is_dir():  # the multirun failed before launching a job
            return
        path, rows = write_sweep_summary(self.sweep_dir)
        log.info("sweep summary (%s):\n%s\n%s", path, format_table(rows), summary_counts(rows))

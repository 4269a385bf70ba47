"""Run a training job from a composed Hydra config: build source and SAE, train, save, summarise."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shlex
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from saelab.app.config import SweepConfig, sae_config, to_dataclass
from saelab.app.objective import check_sweep, job_result, objective_value, search_sweeper, unscored
from saelab.app.sweep import sweep_logging
from saelab.core.atomic import atomic_file
from saelab.core.device import resolve_device
from saelab.core.seeds import derive_seed, generator
from saelab.io.layout import list_checkpoints
from saelab.parallel.distributed import env_world_size
from saelab.sae.registry import build_sae, get_sae_class
from saelab.sae.transcoder import resolve_for_data
from saelab.sources import build_source
from saelab.sources.harvested import transcoder_source_config
from saelab.sources.synthetic import recovery_metrics
from saelab.train.lock import run_dir_lock
from saelab.train.memory import check_training_memory
from saelab.train.preemption import TrainingStopped, catch_stop_signals
from saelab.train.trainer import Trainer, TrainResult

SUMMARY_FILE = "summary.json"
log = logging.getLogger(__name__)


def hydra_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def hydra_sweeper_target() -> str | None:
    """The `_target_` of the running Hydra multirun's sweeper (None outside a multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return OmegaConf.select(HydraConfig.get(), "sweeper._target_", default=None)


#: Environment variables whose value > 0 marks a job restarted in its own run directory: a SLURM requeue (e.g.
#: hydra.launcher.max_num_timeout) or a torchrun elastic restart.
RESTART_COUNTERS = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")


def restarted_run(out: Path | None, env: Mapping[str, str]) -> Path | None:
    """The run directory `out` to resume, when this job is a restart of the run that wrote its checkpoints
    (a counter of RESTART_COUNTERS > 0 and a complete checkpoint under out/checkpoints); else None."""
    restarted = any(env.get(name, "0").isdigit() and int(env.get(name, "0")) > 0 for name in RESTART_COUNTERS)
    if out is None or not restarted or not list_checkpoints(out / "checkpoints"):
        return None
    return out


def train_task(cfg: DictConfig) -> dict[str, Any] | float:
    """The Hydra task of `saelab train`: train, then return what the launcher pickles and the sweeper reads,
    small and device-free (`saelab.app.objective`): with sweep.objective that metric as a float (a failed run or
    a NaN metric reported as the sweeper takes it), else a dict of the run's numbers and paths."""
    sweep = to_dataclass(cfg.sweep, "sweep") if "sweep" in cfg else SweepConfig()
    sweeper = search_sweeper(hydra_sweeper_target())
    source_kind = OmegaConf.select(cfg, "source.kind", default=None)
    check_sweep(sweep.objective, sweep.direction, int(cfg.trainer.eval_every), source_kind, sweeper)
    if sweep.objective is None:
        result, summary = _train(cfg, None)
        return job_result(result.output_dir, summary or result.final_metrics)
    try:
        _, summary = _train(cfg, None)
    except Exception as err:  # a failed trial; TrainingStopped (a signal) stops the whole search
        log.exception("run failed")
        return unscored(sweeper, sweep.objective, err, math.nan)
    value = objective_value(summary or {}, sweep.objective)
    return value if math.isfinite(value) else unscored(sweeper, sweep.objective, None, value)


def train_from_config(cfg: DictConfig, output_dir: str | Path | None = None) -> TrainResult:
    """Train the SAE described by cfg (sae, source, trainer, logging groups); writes <output_dir>/sae.
    Under torchrun every rank calls this; rank 0 alone writes. A stop signal (Ctrl-C, SIGTERM, SIGUSR2) ends it
    at the next step boundary with a checkpoint, one line saying how to resume, and TrainingStopped."""
    return _train(cfg, output_dir)[0]


def _train(cfg: DictConfig, output_dir: str | Path | None) -> tuple[TrainResult, dict[str, Any] | None]:
    """train_from_config, also returning the summary written (None on ranks other than 0)."""
    sae_cfg = sae_config(cfg.sae)
    source_cfg = to_dataclass(cfg.source, "source")
    trainer_cfg = to_dataclass(cfg.trainer, "trainer")
    logging_cfg = sweep_logging(to_dataclass(cfg.logging, "logging"))
    trainer_cfg.validate()
    logging_cfg.validate()
    out = Path(output_dir) if output_dir is not None else hydra_output_dir()
    is_main = int(os.environ.get("RANK", "0")) == 0
    # the run directory's lock first: a resume into a live run's directory is refused before any work
    with run_dir_lock(out if is_main else None):
        device = resolve_device(trainer_cfg.device)
        # anything drawing from the global RNG
        torch.manual_seed(derive_seed(trainer_cfg.seed, "torch.global"))
        if get_sae_class(sae_cfg.architecture).is_transcoder:  # (also refuses the names that cannot exist)
            source_cfg = transcoder_source_config(source_cfg)
        source = build_source(source_cfg, device)
        trainer_cfg = trainer_cfg.for_source(source)  # total_tokens 0: one pass over a cache
        width = (
            f"sae.d_sae={sae_cfg.d_sae}"
            if sae_cfg.d_sae
            else f"sae.expansion_factor={sae_cfg.expansion_factor}"
        )
        sae_cfg = resolve_for_data(sae_cfg, source.d_in, getattr(source, "d_out", None))
        run_config = with_resolved_sizes(OmegaConf.to_container(cfg, resolve=True), sae_cfg, trainer_cfg)
        resume = trainer_cfg.resume_from or restarted_run(out, os.environ)
        if resume:
            trainer = Trainer.from_checkpoint(
                resume, trainer_cfg, logging_cfg, out, run_config, sae_config=sae_cfg
            )
            log.info("resuming %s at step %d", resume, trainer.step)
        else:
            check_training_memory(sae_cfg, trainer_cfg.batch_size // env_world_size(), device, width)
            sae_cfg.metadata = {**source.metadata(), **sae_cfg.metadata}
            sae = build_sae(sae_cfg, generator(trainer_cfg.seed, "sae.init"))
            trainer = Trainer(sae, trainer_cfg, logging_cfg, out, run_config)
        trainer.extra_outputs = (
            SUMMARY_FILE,
        )  # checked before step 0 with the SAE's and checkpoints' targets
        summary = None
        with catch_stop_signals():  # also around the summary: a signal then waits until it is written
            try:
                result = trainer.fit(source)
            except TrainingStopped as stopped:
                if is_main:  # under torchrun rank 0 speaks for the run
                    print(stopped_line(stopped), file=sys.stderr, flush=True)
                raise
            if trainer.output_dir is not None:
                summary = write_summary(out / SUMMARY_FILE, result, source, run_config)
                print(summary_line(summary, out))
    return result, summary


def stopped_line(stopped: TrainingStopped) -> str:
    """The one line a stopped run ends with: the step it stopped at and the command that continues it."""
    if stopped.checkpoint is None or stopped.run_dir is None:
        return str(stopped)
    relative = os.path.relpath(stopped.run_dir)
    run_dir = stopped.run_dir if relative.startswith("..") else relative
    return (
        f"stopped at step {stopped.step} ({signal.Signals(stopped.signum).name}); resume with "
        f"saelab train trainer.resume_from={shlex.quote(str(run_dir))}"
    )


def with_resolved_sizes(run_config: dict[str, Any], sae_cfg: Any, trainer_cfg: Any) -> dict[str, Any]:
    """A copy of the composed config (plain data) with the sizes resolved from the source (sae.d_in, sae.d_sae,
    trainer.total_tokens: 0 in the config means "from the data"), as summary.json, wandb and checkpoints
    record it."""
    resolved = copy.deepcopy(run_config)
    resolved["sae"].update(d_in=sae_cfg.d_in, d_sae=sae_cfg.d_sae)
    resolved["trainer"]["total_tokens"] = trainer_cfg.total_tokens
    return resolved


def summary_line(summary: dict[str, Any], out: Path) -> str:
    """One human-readable line: where the SAE is and its final metrics."""
    shown = ("fvu", "l0", "dead_frac", "heldout/dead_frac", "mmcs", "frac_recovered")
    metrics = ", ".join(f"{k}={summary[k]:.4g}" for k in shown if k in summary)
    window = f" (dead_frac: silent for the last {summary['dead_window_tokens']:,} tokens)"
    return f"saved {out / 'sae'} after {summary['tokens']:,} tokens: {metrics}{window}"


def write_summary(path: Path, result: TrainResult, source: Any, run_config: dict[str, Any]) -> dict[str, Any]:
    """One JSON row per run: the last logged training row, then the saved SAE's fvu and l0 on the last batch
    (`TrainResult.final_metrics`; `lr`: the last scheduled rate; `base_lr`: the rate before the schedule), dead
    fraction (with its token window), the last held-out evaluation when there was one, recovery when the source
    has planted features."""
    last_eval = result.eval_history[-1] if result.eval_history else {}
    summary: dict[str, Any] = {
        "steps": result.steps,
        "tokens": result.tokens,
        **{
            k: v
            for k, v in (result.history[-1] if result.history else {}).items()
            if k not in ("step", "tokens")
        },  # the last logged training row; the saved SAE's figures below win
        **result.final_metrics,
        "dead_frac": result.dead_fraction,
        "dead_window_tokens": result.dead_window_tokens,
        "input_scale": result.input_scale,
        "base_lr": result.base_lr,
        **{k: v for k, v in last_eval.items() if k != "step"},
    }
    features = getattr(source, "features", None)
    if features is not None:
        summary.update(recovery_metrics(features, result.sae.W_dec.detach().cpu()))
    inputs = getattr(source, "input_features", None)  # planted pairs: the input features vs encoder columns
    if inputs is not None:
        recovered = recovery_metrics(inputs, result.sae.W_enc.detach().cpu().T)
        summary.update({f"encoder_{k}": v for k, v in recovered.items()})
    summary["config"] = run_config
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str))
    return summary

"""Run a training job from a composed Hydra config: build source and SAE, train, save, summarise."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from saelab.app.config import sae_config, to_dataclass
from saelab.app.sweep import sweep_logging
from saelab.core.atomic import atomic_file
from saelab.core.device import resolve_device
from saelab.core.seeds import derive_seed, generator
from saelab.io.layout import list_checkpoints
from saelab.sae.registry import build_sae, get_sae_class
from saelab.sae.transcoder import resolve_for_data
from saelab.sources import build_source
from saelab.sources.harvested import transcoder_source_config
from saelab.sources.synthetic import recovery_metrics
from saelab.train.lock import run_dir_lock
from saelab.train.trainer import Trainer, TrainResult


def hydra_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


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


def train_from_config(cfg: DictConfig, output_dir: str | Path | None = None) -> TrainResult:
    """Train the SAE described by cfg (sae, source, trainer, logging groups); writes <output_dir>/sae.
    Under torchrun every rank calls this; rank 0 alone writes."""
    sae_cfg = sae_config(cfg.sae)
    source_cfg = to_dataclass(cfg.source, "source")
    trainer_cfg = to_dataclass(cfg.trainer, "trainer")
    logging_cfg = sweep_logging(to_dataclass(cfg.logging, "logging"))
    trainer_cfg.validate()
    logging_cfg.validate()
    out = Path(output_dir) if output_dir is not None else hydra_output_dir()
    device = resolve_device(trainer_cfg.device)
    torch.manual_seed(derive_seed(trainer_cfg.seed, "torch.global"))  # anything drawing from the global RNG
    if get_sae_class(sae_cfg.architecture).is_transcoder:  # (also refuses the names that cannot exist)
        source_cfg = transcoder_source_config(source_cfg)
    source = build_source(source_cfg, device)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    sae_cfg = resolve_for_data(sae_cfg, source.d_in, getattr(source, "d_out", None))
    resume = trainer_cfg.resume_from or restarted_run(out, os.environ)
    if resume:
        trainer = Trainer.from_checkpoint(
            resume, trainer_cfg, logging_cfg, out, run_config, sae_config=sae_cfg
        )
    else:
        sae_cfg.metadata = {**source.metadata(), **sae_cfg.metadata}
        sae = build_sae(sae_cfg, generator(trainer_cfg.seed, "sae.init"))
        trainer = Trainer(sae, trainer_cfg, logging_cfg, out, run_config)
    with run_dir_lock(trainer.output_dir):  # None on ranks other than 0
        result = trainer.fit(source)
        if trainer.output_dir is not None:
            summary = write_summary(out / "summary.json", result, source, run_config)
            print(summary_line(summary, out))
    return result


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

"""Run `saelab eval` from a composed Hydra config: load the SAE, build the source, evaluate, write, log."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from saelab.app.config import to_dataclass
from saelab.app.train_job import hydra_output_dir
from saelab.core.device import resolve_device
from saelab.eval.evaluate import EvalResult, evaluate, flatten_report, write_report
from saelab.io.loading import load_sae
from saelab.sources import build_source
from saelab.sources.harvested import transcoder_source_config
from saelab.train.logger import RunLogger

SUMMARY_KEYS = (
    "reconstruction/fvu",
    "reconstruction/cosine",
    "reconstruction/l0",
    "dead/dead_frac",
    "lm/ce_clean",
    "lm/ce_sae",
    "lm/ce_zero",
    "lm/ce_loss_score",
    "lm/ce_mean",
    "lm/ce_loss_score_mean",
    "lm/kl_div",
    "geometry/max_cos_mean",
    "geometry/spectrum_slope",
    "cooccurrence/ami",
    "recovery/mmcs",
    "recovery/frac_recovered",
    "recovery_encoder/mmcs",
    "recovery_encoder/frac_recovered",
)


def evaluate_from_config(cfg: DictConfig, output_dir: str | Path | None = None) -> EvalResult:
    """Evaluate cfg.sae_path on cfg.source; writes report.json and PNGs to the output directory."""
    eval_cfg = to_dataclass(cfg.eval, "eval")
    logging_cfg = to_dataclass(cfg.logging, "logging")
    eval_cfg.validate()
    logging_cfg.validate()
    base = output_dir or cfg.output_dir
    out = Path(base) if base is not None else (hydra_output_dir() or Path("outputs")) / "eval"
    device = resolve_device(eval_cfg.device, "eval.device")
    sae = load_sae(cfg.sae_path, device=device)
    source_cfg = to_dataclass(cfg.source, "source")
    if sae.is_transcoder:  # pairs of its input and target hooks
        source_cfg = transcoder_source_config(source_cfg, sae.cfg.metadata.get("hook_name_out"))
    source = build_source(source_cfg, device)
    result = evaluate(sae, source, eval_cfg, progress=logging_cfg.progress)
    write_report(result, out, plots=eval_cfg.plots)
    _log_wandb(result, logging_cfg, OmegaConf.to_container(cfg, resolve=True), out)
    _print_summary(result, out)
    return result


def _log_wandb(result: EvalResult, logging_cfg: Any, run_config: dict[str, Any], out: Path) -> None:
    if logging_cfg.wandb_mode == "disabled":
        return
    import wandb

    logger = RunLogger(dataclasses.replace(logging_cfg, progress=False), 0, run_config, out)
    try:
        logger.summary({f"eval/{k}": v for k, v in flatten_report(result.report).items()})
        images = {f"eval/{p.stem}": wandb.Image(str(p)) for p in result.files if p.suffix == ".png"}
        if images and logger.wandb_run is not None:
            logger.wandb_run.log(images)
    finally:
        logger.close()


def _print_summary(result: EvalResult, out: Path) -> None:
    flat = flatten_report(result.report)
    table = Table(title=f"saelab eval: {result.report['tokens']} tokens")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in SUMMARY_KEYS:
        if key in flat:
            table.add_row(key, f"{flat[key]:.4g}")
    console = Console()
    console.print(table)
    data = result.report["data"]
    held_out = {True: "held out", False: "NOT held out: the SAE trained on it", None: "held out: unknown"}
    console.print(f"data from source batch {data['start_batch']} ({held_out[data['held_out']]})")
    console.print(f"report and plots: {out}")

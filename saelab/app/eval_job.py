"""Run `saelab eval` from a composed Hydra config: load the SAE(s), build the source, evaluate, write, log.

`sae=PATH` evaluates one SAE into the output directory. `sae=[A,B,...]` or `sae=SWEEP_DIR` (a multirun
folder: every run in it with a saved SAE) evaluates each on the same source data (the batches past the
training data of all of them) into `<output dir>/<name>/`, sharing the probe datasets, and draws their
L0 / fidelity frontier (`saelab.eval.frontier`) in the output directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from saelab.app.config import to_dataclass
from saelab.app.sweep import OVERRIDES, run_dirs
from saelab.app.train_job import hydra_output_dir
from saelab.core.atomic import atomic_file
from saelab.core.device import resolve_device
from saelab.eval.config import EvalConfig
from saelab.eval.evaluate import (
    EvalResult,
    default_start_batch,
    evaluate,
    flatten_report,
    probe_session,
    write_report,
)
from saelab.eval.frontier import report_point, write_frontier
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
    "absorption_first_letter/eval_result_metrics/mean/mean_absorption_fraction_score",
    "absorption_first_letter/eval_result_metrics/mean/mean_full_absorption_score",
    "sparse_probing/eval_result_metrics/llm/llm_top_1_test_accuracy",
    "sparse_probing/eval_result_metrics/sae/sae_top_1_test_accuracy",
    "sparse_probing/eval_result_metrics/sae/sae_top_5_test_accuracy",
)
EVALS_FILE = "evals.jsonl"


@dataclasses.dataclass
class SaeToEvaluate:
    """name: its folder under the output directory (several SAEs); overrides: its sweep run's overrides."""

    name: str
    path: str
    overrides: list[str]


def saes_to_evaluate(sae_path: Any) -> list[SaeToEvaluate]:
    """The SAEs `sae=` names: one path, a list of paths, or a sweep folder (its runs that saved an SAE)."""
    if isinstance(sae_path, (list, tuple, ListConfig)):
        paths = [str(p) for p in sae_path]
        if not paths:
            raise ValueError("sae=[] names no SAE; pass sae=PATH, sae=[PATH,...] or a sweep folder.")
        names = [Path(p).expanduser().resolve().name or f"sae{i}" for i, p in enumerate(paths)]
        if len(set(names)) < len(names):
            names = [f"{i}_{n}" for i, n in enumerate(names)]
        return [SaeToEvaluate(n, p, []) for n, p in zip(names, paths, strict=True)]
    path = Path(str(sae_path)).expanduser()
    if path.is_dir() and _is_sweep(path):
        runs = [r for r in run_dirs(path) if (r / "sae").is_dir()]
        if not runs:
            raise ValueError(
                f"sae={sae_path}: the sweep folder holds no run with a saved SAE (<run>/sae/) yet."
            )
        return [SaeToEvaluate(r.name, str(r), _overrides(r)) for r in runs]
    return [SaeToEvaluate(path.name, str(sae_path), [])]


def _is_sweep(path: Path) -> bool:
    own = any((path / name).exists() for name in ("cfg.json", "sae", "checkpoints"))
    return not own and ((path / "multirun.yaml").is_file() or (path / "summary.jsonl").is_file())


def _overrides(run: Path) -> list[str]:
    file = run / OVERRIDES
    return [str(o) for o in OmegaConf.to_container(OmegaConf.load(file))] if file.is_file() else []


def evaluate_from_config(
    cfg: DictConfig, output_dir: str | Path | None = None
) -> EvalResult | list[EvalResult]:
    """Evaluate cfg.sae_path (one SAE, several, or a sweep) on cfg.source; writes reports and plots."""
    eval_cfg = to_dataclass(cfg.eval, "eval")
    logging_cfg = to_dataclass(cfg.logging, "logging")
    eval_cfg.validate()
    logging_cfg.validate()
    base = output_dir or cfg.output_dir
    out = Path(base) if base is not None else (hydra_output_dir() or Path("outputs")) / "eval"
    device = resolve_device(eval_cfg.device, "eval.device")
    targets = saes_to_evaluate(cfg.sae_path)
    saes = [load_sae(t.path, device=device) for t in targets]
    source = build_source(eval_source_config(to_dataclass(cfg.source, "source"), saes), device)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    if len(targets) == 1:
        result = evaluate(saes[0], source, eval_cfg, progress=logging_cfg.progress)
        write_report(result, out, plots=eval_cfg.plots)
        _log_wandb(result, logging_cfg, run_config, out)
        _print_summary(result, out)
        return result
    return _evaluate_several(targets, saes, source, eval_cfg, logging_cfg, run_config, out)


def eval_source_config(source_cfg: Any, saes: list[Any]) -> Any:
    """The source config to evaluate saes on: for transcoders, rows pairing their input and target hooks."""
    transcoder = {sae.is_transcoder for sae in saes}
    targets = {sae.cfg.metadata.get("hook_name_out") for sae in saes if sae.is_transcoder}
    if transcoder == {False}:
        return source_cfg
    if len(transcoder) > 1 or len(targets) > 1:
        raise ValueError(
            "sae_path mixes SAEs and transcoders (or transcoders of different target hooks); they need "
            "different data: evaluate each kind in its own `saelab eval` run."
        )
    return transcoder_source_config(source_cfg, targets.pop())


def _evaluate_several(
    targets: list[SaeToEvaluate],
    saes: list[Any],
    source: Any,
    eval_cfg: EvalConfig,
    logging_cfg: Any,
    run_config: dict[str, Any],
    out: Path,
) -> list[EvalResult]:
    """Each SAE on the same source batches (past every SAE's training data), probe data shared; the frontier."""
    if eval_cfg.start_batch < 0 and "core" in eval_cfg.suite:
        start = max(default_start_batch(sae, source, eval_cfg) for sae in saes)
        eval_cfg = dataclasses.replace(eval_cfg, start_batch=start)
    session = probe_session(source, eval_cfg)
    results, points, rows = [], [], []
    for target, sae in zip(targets, saes, strict=True):
        result = evaluate(sae, source, eval_cfg, progress=logging_cfg.progress, session=session)
        write_report(result, out / target.name, plots=eval_cfg.plots)
        _log_wandb(result, logging_cfg, run_config, out / target.name)
        _print_summary(result, out / target.name)
        results.append(result)
        points.append(report_point(target.name, result.report, target.overrides))
        rows.append(
            {
                "name": target.name,
                "sae": target.path,
                "overrides": target.overrides,
                **flatten_report(result.report),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / EVALS_FILE) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    files = write_frontier(points, out, title=f"saelab eval: {len(targets)} SAEs, L0 vs fidelity")
    Console().print(f"{len(targets)} SAEs evaluated; frontier: {', '.join(str(f) for f in files)}")
    return results


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
    tokens = result.report.get("tokens")
    table = Table(title="saelab eval" + (f": {tokens} tokens" if tokens else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in SUMMARY_KEYS:
        if key in flat:
            table.add_row(key.replace("/eval_result_metrics", ""), f"{flat[key]:.4g}")
    console = Console()
    console.print(table)
    data = result.report.get("data")
    if data is not None:
        held_out = {True: "held out", False: "NOT held out: the SAE trained on it", None: "held out: unknown"}
        console.print(f"data from source batch {data['start_batch']} ({held_out[data['held_out']]})")
    console.print(f"report, plots and report.html: {out}")

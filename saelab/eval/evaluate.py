"""Evaluate a trained SAE on a source: one streaming pass, then the decoder-only analyses.

Streamed (activation or language-model source): reconstruction metrics, dead latents and density,
latent co-occurrence; with a language model also CE clean / spliced / zero-ablated and KL.
From the weights: nearest-neighbour decoder cosines and duplicates, spectrum of cov(W_dec), and recovery of
planted features when the source has them (`source.features`).

Data: an SAE trained on a synthetic source is refused against another synthetic source, and by default
(start_batch -1) the evaluation starts past its training data when it trained on this source (synthetic,
cache or model); a source at another hook than the SAE's is refused; the report's
`data` says where it started and whether that data is held out (`saelab.eval.provenance`).

A live "model" source (`saelab.sources.harvested.ModelSource`) also gets the language-model metrics: its
harvest pipeline supplies the model, the hook, the token contexts and the special token ids.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.core.atomic import atomic_directory
from saelab.core.config_diff import flatten
from saelab.eval.config import EvalConfig
from saelab.eval.cooccurrence import CooccurrenceStats, cooccurrence_vs_geometry
from saelab.eval.geometry import decoder_cosines, decoder_spectrum, power_law_slope
from saelab.eval.lm import LMEvaluator
from saelab.eval.provenance import check_hook, check_same_synthetic_source, evaluation_start
from saelab.metrics.codes import encode_codes, output_of
from saelab.metrics.dead import DeadLatentTracker, dead_latent_report
from saelab.metrics.reconstruction import ReconstructionStats
from saelab.sae.base import SAE
from saelab.sources.registry import source_metadata
from saelab.sources.synthetic import recovery_metrics

REPORT_FILE = "report.json"
MAX_LISTED_PAIRS = 100


@dataclass
class EvalResult:
    """report: JSON-ready nested dict. max_cos [n] and eigenvalues [d] are kept for the plots."""

    report: dict[str, Any]
    max_cos: Tensor
    eigenvalues: Tensor
    files: list[Path] = field(default_factory=list)


@dataclass
class LanguageModel:
    """What the CE evaluation needs: the model, its hook, special token ids, and token batches.

    token_batches(batch_size, start_batch) yields token ids [batch_size, pos], skipping start_batch batches.
    """

    model: nn.Module
    hook_name: str
    special_token_ids: list[int]
    token_batches: Callable[[int, int], Iterator[Tensor]]
    target_hook: str | None = None  # a transcoder's target (source.target_hook)


def language_model_of(source: Any) -> LanguageModel | None:
    """The language model behind a live model source (its harvest pipeline); None for other sources."""
    pipeline = getattr(source, "pipeline", None)
    model = getattr(getattr(pipeline, "harvester", None), "model", None)
    if model is None or not hasattr(pipeline, "contexts"):
        return None

    def token_batches(batch_size: int, start_batch: int) -> Iterator[Tensor]:
        return pipeline.contexts.batches(batch_size, skip=start_batch * batch_size)

    target = getattr(source.cfg, "target_hook", "") or None
    return LanguageModel(model, source.cfg.hook_name, pipeline.excluded.tolist(), token_batches, target)


def _activation_stream(sae: SAE, source: Any, cfg: EvalConfig, device: torch.device) -> Iterator[tuple]:
    """Yields (x [B, d], x_hat [B, d], codes) from an activation source, exactly cfg.total_tokens rows in all
    (for a transcoder, its target and prediction from rows [x | y])."""
    remaining = cfg.total_tokens
    for rows in source.batches(cfg.batch_size, start_batch=cfg.start_batch):
        rows = rows[:remaining].to(device, dtype=sae.W_dec.dtype)
        remaining -= rows.shape[0]
        x, target = sae.split_row(rows)
        sae.check_input(x)
        codes = encode_codes(sae, x)
        yield target, output_of(sae, x, codes), codes


def _lm_stream(lm: LMEvaluator, model: LanguageModel, cfg: EvalConfig) -> Iterator[tuple]:
    """Yields (x, x_hat, codes) of the non-special positions while accumulating CE / KL in `lm`, exactly
    cfg.total_tokens positions in all (the last batch's later positions are neither returned nor counted)."""
    device = next(model.model.parameters()).device
    remaining = cfg.total_tokens
    for tokens in model.token_batches(cfg.lm_batch_size, cfg.start_batch):
        batch = lm.update(tokens.to(device), max_positions=remaining)
        remaining -= batch.x.shape[0]
        yield batch.x.to(batch.x_hat.dtype), batch.x_hat, batch.codes
        if remaining <= 0:
            return


@torch.no_grad()
def evaluate(sae: SAE, source: Any, cfg: EvalConfig | None = None, progress: bool = False) -> EvalResult:
    """Run every evaluator on `cfg.total_tokens` tokens of `source` (see the module docstring)."""
    cfg = cfg or EvalConfig()
    cfg.validate()
    sae.eval()
    device = sae.W_dec.device
    if getattr(source, "d_in", sae.d_in) != sae.d_in:
        raise ValueError(
            f"the source yields vectors of size {source.d_in} but the SAE has d_in={sae.d_in}; "
            "evaluate on the source (model and hook) the SAE was trained on."
        )
    pairs = getattr(source, "d_out", None)
    if sae.is_transcoder != (pairs is not None) or (pairs is not None and pairs != sae.d_out):
        raise ValueError(
            f"the SAE {'predicts d_out=' + str(sae.d_out) if sae.is_transcoder else 'reconstructs its input'} "
            f"but the source yields {'targets of width ' + str(pairs) if pairs else 'single activations'}; "
            "evaluate a transcoder on pairs (source.target_hook, source=pairs) and an SAE without them."
        )
    trained_on, reads = dict(sae.cfg.metadata), source_metadata(source)
    check_hook(trained_on.get("hook_name"), reads.get("hook_name"))
    check_same_synthetic_source(trained_on, reads)
    lm, model = None, language_model_of(source)
    per_batch = cfg.lm_batch_size if model is not None else cfg.batch_size  # contexts for a model source
    start_batch, held_out = evaluation_start(
        trained_on, reads, source, cfg.start_batch, per_batch, cfg.total_tokens
    )
    cfg = dataclasses.replace(cfg, start_batch=start_batch)
    tracker = DeadLatentTracker(sae.d_sae, cfg.dead_window_tokens or cfg.total_tokens, device)
    recon = ReconstructionStats()
    cooc = (
        CooccurrenceStats.random_subset(sae.d_sae, cfg.cooccurrence_latents, cfg.seed, device)
        if cfg.cooccurrence_latents >= 2
        else None
    )
    if model is not None:
        lm = LMEvaluator(
            model.model, sae, model.hook_name, model.special_token_ids, target_hook=model.target_hook
        )
        stream = _lm_stream(lm, model, cfg)
    else:
        stream = _activation_stream(sae, source, cfg, device)
    bar = tqdm(total=cfg.total_tokens, disable=not progress, unit="tok", desc="eval")
    for x, x_hat, codes in stream:
        recon.update(x, x_hat, codes)
        tracker.update_codes(codes)
        if cooc is not None:
            cooc.update(codes)
        bar.update(x.shape[0])
        if tracker.tokens_seen >= cfg.total_tokens:
            break
    bar.close()
    if tracker.tokens_seen == 0:
        raise ValueError("the source yielded no activations to evaluate.")

    report: dict[str, Any] = {
        "sae": {"architecture": sae.cfg.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae},
        "tokens": tracker.tokens_seen,
        "data": {"start_batch": start_batch, "held_out": held_out},
        "reconstruction": recon.compute(),
        "dead": dead_latent_report(tracker),
    }
    if lm is not None:
        report["lm"] = lm.compute()
    cos = decoder_cosines(sae.W_dec, cfg.cosine_threshold, cfg.cosine_chunk)
    eig = decoder_spectrum(sae.W_dec)
    report["geometry"] = {
        "max_cos_mean": cos.max_cos.double().mean().item(),
        "max_cos_median": cos.max_cos.double().median().item(),
        "duplicate_threshold": cfg.cosine_threshold,
        "n_duplicate_pairs": int(cos.pairs.shape[0]),
        "frac_latents_in_duplicate_pair": cos.pairs.unique().numel() / sae.d_sae,
        "top_duplicate_pairs": [
            [int(i), int(j), float(c)]
            for (i, j), c in zip(
                cos.pairs[:MAX_LISTED_PAIRS].tolist(), cos.pair_cos[:MAX_LISTED_PAIRS].tolist(), strict=True
            )
        ],
        "spectrum_slope": power_law_slope(eig, cfg.spectrum_first_rank, cfg.spectrum_last_rank),
        "spectrum_ranks": [cfg.spectrum_first_rank, min(cfg.spectrum_last_rank, eig.numel())],
    }
    if cooc is not None:
        report["cooccurrence"] = cooccurrence_vs_geometry(
            cooc, sae.W_dec, cfg.n_clusters, cfg.min_fires, cfg.n_shuffles, cfg.seed
        )
    features = getattr(source, "features", None)
    if features is not None:
        report["recovery"] = recovery_metrics(features, sae.W_dec.detach().cpu(), cfg.recovery_threshold)
    inputs = getattr(source, "input_features", None)  # planted pairs: input features vs encoder columns
    if inputs is not None:
        report["recovery_encoder"] = recovery_metrics(
            inputs, sae.W_enc.detach().cpu().T, cfg.recovery_threshold
        )
    return EvalResult(report=_json_ready(report), max_cos=cos.max_cos.cpu(), eigenvalues=eig.cpu())


def _json_ready(value: Any) -> Any:
    """Replace NaN / inf floats with None (strict JSON) throughout a nested report."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(result: EvalResult, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """Write report.json (+ density, spectrum and cosine PNGs) into `out_dir`, atomically as one directory."""
    names = [REPORT_FILE]
    plot_names = ["density.png", "spectrum.png", "cosine.png"]
    with atomic_directory(out_dir, owned=[REPORT_FILE, *plot_names]) as tmp:
        (tmp / REPORT_FILE).write_text(json.dumps(result.report, indent=2))
        if plots:
            from saelab.eval.plots import plot_cosine_histogram, plot_density_histogram, plot_spectrum

            geometry = result.report["geometry"]
            plot_density_histogram(result.report["dead"]["density_histogram"], tmp / "density.png")
            plot_spectrum(
                result.eigenvalues,
                geometry["spectrum_slope"] if geometry["spectrum_slope"] is not None else math.nan,
                tmp / "spectrum.png",
                tuple(geometry["spectrum_ranks"]),
            )
            plot_cosine_histogram(result.max_cos, tmp / "cosine.png")
            names += plot_names
    result.files = [Path(out_dir).expanduser() / name for name in names]
    return result.files


def flatten_report(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested report as {"group/name": value} (for wandb)."""
    leaves = flatten(report, prefix, separator="/")
    return {k: v for k, v in leaves.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

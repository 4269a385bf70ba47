"""Evaluate a trained SAE on a source: the suite `eval.suite` names, each score with random baselines beside it.

"core": one streaming pass (activation or language-model source): reconstruction metrics, dead latents and
density, latent co-occurrence; with a language model also CE clean / spliced / zero-ablated and KL. From the
weights: nearest-neighbour decoder cosines and duplicates, spectrum of cov(W_dec), and recovery of planted
features when the source has them (`source.features`). The baselines (`saelab.eval.baselines`, built from the
first batch) reconstruct the same batches. `core` also holds the figures under SAEBench's core keys.
"absorption", "sparse_probing" (a language-model source): `saelab.eval.probe_suite`, on probe datasets whose
activations are cached per model and hook; a `ProbeSession` passed in shares them across SAEs.

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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.core.atomic import atomic_directory
from saelab.core.config_diff import flatten
from saelab.eval.baselines import build_baselines, reconstruct
from saelab.eval.config import EvalConfig
from saelab.eval.cooccurrence import CooccurrenceStats, cooccurrence_vs_geometry
from saelab.eval.geometry import decoder_cosines, decoder_spectrum, power_law_slope
from saelab.eval.lm import LMEvaluator
from saelab.eval.probe_data import ProbeModel
from saelab.eval.probe_suite import ProbeSession, absorption_section, gaps, sparse_probing_section
from saelab.eval.provenance import check_hook, check_same_synthetic_source, evaluation_start
from saelab.metrics.codes import encode_codes, output_of
from saelab.metrics.dead import DeadLatentTracker, dead_latent_report
from saelab.metrics.reconstruction import ReconstructionStats
from saelab.sae.base import SAE
from saelab.sources.registry import source_metadata
from saelab.sources.synthetic import recovery_metrics

REPORT_FILE = "report.json"
MAX_LISTED_PAIRS = 100
#: Suites that run probes on a language model.
PROBE_SUITES = ("absorption", "sparse_probing")


@dataclass
class EvalResult:
    """report: JSON-ready nested dict. max_cos [n] and eigenvalues [d] are kept for the plots (None without core)."""

    report: dict[str, Any]
    max_cos: Tensor | None
    eigenvalues: Tensor | None
    files: list[Path] = field(default_factory=list)


@dataclass
class LanguageModel:
    """What the CE evaluation and the probe metrics need: the model, its hook, special token ids, token batches,
    and (`probe`) the model as the probe datasets run it.

    token_batches(batch_size, start_batch) yields token ids [batch_size, pos], skipping start_batch batches.
    """

    model: nn.Module
    hook_name: str
    special_token_ids: list[int]
    token_batches: Callable[[int, int], Iterator[Tensor]]
    probe: ProbeModel | None = None
    target_hook: str | None = None  # a transcoder's target (source.target_hook)


def language_model_of(source: Any, probe_batch_size: int = 16) -> LanguageModel | None:
    """The language model behind a live model source (its harvest pipeline); None for other sources."""
    pipeline = getattr(source, "pipeline", None)
    model = getattr(getattr(pipeline, "harvester", None), "model", None)
    if model is None or not hasattr(pipeline, "contexts"):
        return None
    hook = source.cfg.hook_name

    def token_batches(batch_size: int, start_batch: int) -> Iterator[Tensor]:
        return pipeline.contexts.batches(batch_size, skip=start_batch * batch_size)

    def activations(tokens: Tensor) -> Tensor:
        return pipeline.harvester(tokens.to(pipeline.harvester.device))[hook]

    cfg = source.cfg
    probe = ProbeModel(
        key=f"{cfg.model}-{cfg.backend}-{cfg.dtype}",
        hook_name=hook,
        tokenizer=pipeline.contexts.tokenizer,
        activations=activations,
        bos_id=pipeline.contexts.bos_id,
        special_token_ids=pipeline.excluded.tolist(),
        batch_size=probe_batch_size,
    )
    target = getattr(cfg, "target_hook", "") or None
    return LanguageModel(model, hook, pipeline.excluded.tolist(), token_batches, probe, target)


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


def default_start_batch(sae: SAE, source: Any, cfg: EvalConfig) -> int:
    """The first source batch `evaluate` reads for this SAE with eval.start_batch=-1 (past its training data
    on the source it trained on, else 0); with several SAEs the largest serves all (the same held-out data)."""
    model = language_model_of(source)
    per_batch = cfg.lm_batch_size if model is not None else cfg.batch_size
    start, _ = evaluation_start(
        dict(sae.cfg.metadata), source_metadata(source), source, -1, per_batch, cfg.total_tokens
    )
    return start


def probe_session(source: Any, cfg: EvalConfig) -> ProbeSession | None:
    """A session sharing the probe datasets of `source`'s model across SAEs (None: no probe suite, or no model)."""
    model = language_model_of(source, cfg.probe_batch_size)
    if not any(s in PROBE_SUITES for s in cfg.suite) or model is None or model.probe is None:
        return None
    return ProbeSession(model.probe, cfg)


@torch.no_grad()
def evaluate(
    sae: SAE,
    source: Any,
    cfg: EvalConfig | None = None,
    progress: bool = False,
    session: ProbeSession | None = None,
) -> EvalResult:
    """Run `cfg.suite` on `sae` (see the module docstring); `session` shares probe data across SAEs."""
    cfg = cfg or EvalConfig()
    cfg.validate()
    sae.eval()
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
    model = language_model_of(source, cfg.probe_batch_size)
    probes = [s for s in cfg.suite if s in PROBE_SUITES]
    if probes and session is None:
        if model is None or model.probe is None:
            raise ValueError(
                f"eval.suite={list(cfg.suite)} needs the language model at the SAE's hook for {probes}: evaluate "
                "with source=smollm2 or source=model (a cache or synthetic source has no model)."
            )
        session = ProbeSession(model.probe, cfg)
    report: dict[str, Any] = {
        "sae": {"architecture": sae.cfg.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae},
        "suite": list(cfg.suite),
        "timing_s": {},
    }
    result = EvalResult(report=report, max_cos=None, eigenvalues=None)
    baselines: dict[str, SAE] | None = None
    if "core" in cfg.suite:
        started = time.perf_counter()
        baselines = _core(sae, source, model, trained_on, reads, cfg, progress, result)
        report["timing_s"]["core"] = time.perf_counter() - started
    if probes:
        assert session is not None
        if baselines is None:
            baselines = build_baselines(sae, session.sample(), cfg.baselines, cfg.seed)
        sections = {"absorption": absorption_section, "sparse_probing": sparse_probing_section}
        keys = {"absorption": "absorption_first_letter", "sparse_probing": "sparse_probing"}
        for name in probes:
            started = time.perf_counter()
            report[keys[name]] = sections[name](session, sae, baselines)
            report["timing_s"][name] = time.perf_counter() - started
    result.report = _json_ready(report)
    return result


def _core(
    sae: SAE,
    source: Any,
    model: LanguageModel | None,
    trained_on: dict[str, Any],
    reads: dict[str, Any],
    cfg: EvalConfig,
    progress: bool,
    result: EvalResult,
) -> dict[str, SAE]:
    """The streamed and weight-based metrics into result.report (and its max_cos / eigenvalues); returns the
    baselines it built from the first batch."""
    device = sae.W_dec.device
    report = result.report
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
    lm = None
    if model is not None:
        lm = LMEvaluator(
            model.model, sae, model.hook_name, model.special_token_ids, target_hook=model.target_hook
        )
        stream = _lm_stream(lm, model, cfg)
    else:
        stream = _activation_stream(sae, source, cfg, device)
    baselines: dict[str, SAE] = {}
    baseline_recon: dict[str, ReconstructionStats] = {}
    bar = tqdm(total=cfg.total_tokens, disable=not progress, unit="tok", desc="eval")
    for x, x_hat, codes in stream:
        if not baselines and cfg.baselines and not sae.is_transcoder:  # (a transcoder's x is its target)
            baselines = build_baselines(sae, x, cfg.baselines, cfg.seed)
            baseline_recon = {name: ReconstructionStats() for name in baselines}
        recon.update(x, x_hat, codes)
        for name, baseline in baselines.items():
            b_hat, b_codes = reconstruct(baseline, x)
            baseline_recon[name].update(x, b_hat.to(x.dtype), b_codes)
        tracker.update_codes(codes)
        if cooc is not None:
            cooc.update(codes)
        bar.update(x.shape[0])
        if tracker.tokens_seen >= cfg.total_tokens:
            break
    bar.close()
    if tracker.tokens_seen == 0:
        raise ValueError("the source yielded no activations to evaluate.")
    report.update(
        {
            "tokens": tracker.tokens_seen,
            "data": {"start_batch": start_batch, "held_out": held_out},
            "reconstruction": recon.compute(),
            "dead": dead_latent_report(tracker),
        }
    )
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
    baseline_figures = {
        name: {
            "reconstruction": stats.compute(),
            **(
                {
                    "recovery": recovery_metrics(
                        features, baselines[name].W_dec.detach().cpu(), cfg.recovery_threshold
                    )
                }
                if features is not None
                else {}
            ),
        }
        for name, stats in baseline_recon.items()
    }
    report["core"] = saebench_core(report, tracker.density(), baseline_figures)
    result.max_cos, result.eigenvalues = cos.max_cos.cpu(), eig.cpu()
    return baselines


def saebench_core(
    report: dict[str, Any], density: Tensor, baselines: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The core figures under SAEBench's `core` result keys (those saelab measures the same way), and each
    baseline's reconstruction (and recovery, on planted data) with its gap to the SAE."""
    recon, lm = report["reconstruction"], report.get("lm")
    metrics: dict[str, dict[str, Any]] = {
        "reconstruction_quality": {
            "explained_variance": recon["explained_variance"],
            "mse": recon["mse"],
            "cossim": recon["cosine"],
        },
        "shrinkage": {
            "l2_ratio": recon["shrinkage"],
            "relative_reconstruction_bias": recon["relative_reconstruction_bias"],
        },
        "sparsity": {"l0": recon.get("l0"), "l1": recon.get("l1")},
        "misc": {
            "frac_alive": 1.0 - report["dead"]["never_fired_frac"],
            "freq_over_1_percent": (density > 0.01).double().mean().item(),
            "freq_over_10_percent": (density > 0.1).double().mean().item(),
            "average_max_decoder_cosine_sim": report["geometry"]["max_cos_mean"],
        },
        "token_stats": {"total_tokens_eval_reconstruction": report["tokens"]},
    }
    if lm is not None:
        metrics["model_behavior_preservation"] = {
            "kl_div_score": lm["kl_div_score"],
            "kl_div_with_ablation": lm["kl_div_zero"],
            "kl_div_with_sae": lm["kl_div"],
        }
        metrics["model_performance_preservation"] = {
            "ce_loss_score": lm["ce_loss_score"],
            "ce_loss_with_ablation": lm["ce_zero"],
            "ce_loss_with_sae": lm["ce_sae"],
            "ce_loss_without_sae": lm["ce_clean"],
        }
    return {
        "eval_type_id": "core",
        "eval_result_metrics": metrics,
        "baselines": baselines,
        "gap": {
            name: {part: gaps(report[part], figures[part]) for part in figures if part in report}
            for name, figures in baselines.items()
        },
    }


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
    """Write report.json, the plots (PNG) and report.html (the scores with their baselines, plots embedded)
    into `out_dir`, atomically as one directory."""
    from saelab.eval.report_html import REPORT_HTML, report_html

    report = result.report
    plot_names = [name for name, needed in _plots(report) if needed] if plots else []
    with atomic_directory(out_dir, owned=[REPORT_FILE, REPORT_HTML, *ALL_PLOTS]) as tmp:
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
        written = _write_plots(result, tmp, plot_names)
        (tmp / REPORT_HTML).write_text(report_html(report, written))
    result.files = [Path(out_dir).expanduser() / name for name in [REPORT_FILE, *plot_names, REPORT_HTML]]
    return result.files


ALL_PLOTS = (
    "density.png", "spectrum.png", "cosine.png", "frontier_position.png", "absorption_letters.png",
    "probing_k.png",
)  # fmt: skip


def _plots(report: dict[str, Any]) -> list[tuple[str, bool]]:
    core = "core" in report
    absorbed = "eval_result_details" in report.get("absorption_first_letter", {})
    probed = "eval_result_metrics" in report.get("sparse_probing", {})
    needed = [core, core, core, core and report["reconstruction"].get("l0") is not None, absorbed, probed]
    return list(zip(ALL_PLOTS, needed, strict=True))


def _write_plots(result: EvalResult, folder: Path, names: list[str]) -> list[Path]:
    from saelab.eval import plots
    from saelab.eval.frontier import baseline_points, pareto_front, report_point

    report = result.report
    written = []
    for name in names:
        path = folder / name
        if name == "density.png":
            plots.plot_density_histogram(report["dead"]["density_histogram"], path)
        elif name == "spectrum.png":
            slope = report["geometry"]["spectrum_slope"]
            plots.plot_spectrum(
                result.eigenvalues, slope if slope is not None else math.nan, path,
                tuple(report["geometry"]["spectrum_ranks"]),
            )  # fmt: skip
        elif name == "cosine.png":
            plots.plot_cosine_histogram(result.max_cos, path)
        elif name == "frontier_position.png":
            points = [report_point("SAE", report), *baseline_points(report)]
            plots.plot_frontier(points, path, "fvu", "FVU", pareto_front(points, "fvu", False))
        elif name == "absorption_letters.png":
            plots.plot_absorption_letters(report["absorption_first_letter"], path)
        else:
            plots.plot_probing_vs_k(report["sparse_probing"], path)
        written.append(path)
    return written


def flatten_report(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested report as {"group/name": value} (for wandb)."""
    leaves = flatten(report, prefix, separator="/")
    return {k: v for k, v in leaves.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

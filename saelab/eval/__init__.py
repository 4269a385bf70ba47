"""Evaluators: dead latents, reconstruction (with or without a language model), decoder geometry.

`evaluate(sae, source, EvalConfig(...))` runs them all; the modules can also be used one by one.
"""

from saelab.eval.config import EvalConfig
from saelab.eval.evaluate import EvalResult, evaluate, write_report
from saelab.eval.geometry import decoder_cosines, decoder_spectrum, power_law_slope
from saelab.eval.lm import LMEvaluator
from saelab.metrics.dead import DeadLatentTracker, dead_latent_report, log10_density_histogram
from saelab.metrics.reconstruction import ReconstructionStats, reconstruction_metrics

__all__ = [
    "DeadLatentTracker",
    "EvalConfig",
    "EvalResult",
    "LMEvaluator",
    "ReconstructionStats",
    "dead_latent_report",
    "decoder_cosines",
    "decoder_spectrum",
    "evaluate",
    "log10_density_histogram",
    "power_law_slope",
    "reconstruction_metrics",
    "write_report",
]

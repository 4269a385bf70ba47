"""Figures shared by training and evaluation: SAE codes in dense or sparse form, dead-latent tracking, reconstruction
statistics (FVU, MSE, L0, L1) and the held-out metrics the trainer logs."""

from saelab.metrics.dead import DeadLatentTracker, dead_latent_report, log10_density_histogram
from saelab.metrics.heldout import heldout_metrics
from saelab.metrics.reconstruction import ReconstructionStats, reconstruction_metrics

__all__ = [
    "DeadLatentTracker",
    "ReconstructionStats",
    "dead_latent_report",
    "heldout_metrics",
    "log10_density_histogram",
    "reconstruction_metrics",
]

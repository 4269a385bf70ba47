"""saelab: train, evaluate and load sparse autoencoders on transformer activations."""

from saelab.io.loading import load_sae
from saelab.sae import SAE, SAEConfig, available_architectures, build_sae
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource, recovery_metrics
from saelab.train.config import LoggingConfig, TrainerConfig
from saelab.train.trainer import Trainer, TrainResult

__all__ = [
    "SAE",
    "SAEConfig",
    "LoggingConfig",
    "SyntheticConfig",
    "SyntheticSource",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
    "available_architectures",
    "build_sae",
    "load_sae",
    "recovery_metrics",
]

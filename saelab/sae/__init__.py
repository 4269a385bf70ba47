"""SAE variants. Importing this package registers every built-in variant."""

from saelab.sae import batchtopk, gba, jumprelu, mp, relu, topk  # noqa: F401  (registration side effects)
from saelab.sae.base import SAE, SAEConfig, TrainContext, TrainOutput
from saelab.sae.loading import load_sae
from saelab.sae.registry import available_architectures, build_sae, get_sae_class, register

__all__ = [
    "SAE",
    "SAEConfig",
    "TrainContext",
    "TrainOutput",
    "available_architectures",
    "build_sae",
    "get_sae_class",
    "load_sae",
    "register",
]

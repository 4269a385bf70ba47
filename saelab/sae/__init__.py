"""SAE variants. Importing this package registers every variant: each module of the package that defines one
registers it with `@register`, so a new variant is one new file here (plus its yaml under configs/sae/)."""

import importlib
import pkgutil

from saelab.sae.base import SAE, SAEConfig, TrainContext, TrainOutput
from saelab.sae.registry import available_architectures, build_sae, get_sae_class, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module

__all__ = [
    "SAE",
    "SAEConfig",
    "TrainContext",
    "TrainOutput",
    "available_architectures",
    "build_sae",
    "get_sae_class",
    "register",
]

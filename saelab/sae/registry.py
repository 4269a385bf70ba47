"""String registry of SAE variants: `architecture` in a config picks the class."""

from __future__ import annotations

from collections.abc import Callable

import torch

from saelab.sae.base import SAE, SAEConfig

_REGISTRY: dict[str, type[SAE]] = {}
#: Names that are refused with a reason (e.g. transcoders of variants whose math has none).
_REFUSED: dict[str, str] = {}


def register(name: str, *aliases: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator adding a variant under `name` (and aliases, e.g. SAELens's names)."""

    def add(cls: type[SAE]) -> type[SAE]:
        for key in (name, *aliases):
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise ValueError(
                    f"architecture name {key!r} is already registered to {_REGISTRY[key].__name__}"
                )
            _REGISTRY[key] = cls
        cls.architecture = name
        return cls

    return add


def refuse(name: str, reason: str) -> None:
    """Make `get_sae_class(name)` raise a ValueError giving `reason` (a name that cannot exist, and why)."""
    _REFUSED[name] = reason


def get_sae_class(name: str) -> type[SAE]:
    """Look up a variant by name; refused names raise their reason, unknown ones the list of known ones."""
    if name in _REFUSED:
        raise ValueError(f"sae.architecture={name!r} is not available: {_REFUSED[name]}")
    if name not in _REGISTRY:
        raise ValueError(f"sae.architecture={name!r} is unknown; choose one of {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def available_architectures() -> list[str]:
    """The registered variant names (`sae=<name>`), sorted."""
    return sorted(_REGISTRY)


def variant_classes() -> list[type[SAE]]:
    """Every registered variant class once, in name order."""
    return sorted(set(_REGISTRY.values()), key=lambda cls: cls.architecture)


def build_sae(cfg: SAEConfig, generator: torch.Generator | None = None) -> SAE:
    """Instantiate the variant named by cfg.architecture (cfg must be that variant's config class).
    generator draws the random initialisation (None: torch's global generator)."""
    cls = get_sae_class(cfg.architecture)
    if not isinstance(cfg, cls.config_class):
        raise TypeError(f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(cfg).__name__}")
    return cls(cfg, generator)

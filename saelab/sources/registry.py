"""Activation sources: a string `kind` in the `source` config picks a builder.

A source has `d_in`, `batches(batch_size, start_batch=0)` yielding float tensors [batch_size, d_in], and
`metadata()` (model / hook / dataset facts stored in the SAE's cfg.json). A source of a transcoder's pairs
also has `d_out` (its batches are rows [x | y] of width d_in + d_out); `d_out` absent or None: single activations.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from saelab.sources.synthetic import SyntheticConfig, SyntheticSource


class ActivationSource(Protocol):
    """What the trainer and the evaluators read: batches of activations of width d_in."""

    d_in: int

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[Tensor]:
        """Batches [batch_size, d_in] (a transcoder's source: [batch_size, d_in + d_out], rows [x | y]) from
        batch number `start_batch` on."""
        ...

    def metadata(self) -> dict[str, Any]:
        """What an SAE trained on this source records about it (kind, model, hook, dataset, seed, ...)."""
        ...


Builder = Callable[[Any, torch.device], ActivationSource]
_SOURCES: dict[str, tuple[type, Builder]] = {}

#: Modules that register further source kinds when imported (kept lazy: they pull in heavy libraries).
_PLUGIN_MODULES: list[str] = ["saelab.sources.harvested", "saelab.sources.pairs"]


def register_source(kind: str, config_class: type) -> Callable[[Builder], Builder]:
    """Decorator registering `builder(cfg, device) -> source` for configs of `config_class` (cfg.kind == kind)."""

    def add(builder: Builder) -> Builder:
        _SOURCES[kind] = (config_class, builder)
        return builder

    return add


def source_metadata(source: object) -> dict[str, Any]:
    """A source's own description (`metadata()`: model / hook / dataset facts), or {} for a plain iterator or
    any object without one."""
    return dict(source.metadata()) if hasattr(source, "metadata") else {}


def _load_plugins() -> None:
    for name in _PLUGIN_MODULES:
        importlib.import_module(name)


def source_config_classes() -> dict[str, type]:
    """kind -> config dataclass, for every registered source."""
    _load_plugins()
    return {kind: cls for kind, (cls, _) in _SOURCES.items()}


def build_source(cfg: Any, device: torch.device | str = "cpu") -> ActivationSource:
    """Build the source described by a source config dataclass (its `kind` field picks the builder)."""
    _load_plugins()
    kind = getattr(cfg, "kind", None)
    if kind not in _SOURCES:
        raise ValueError(f"source.kind={kind!r} is unknown; choose one of {sorted(_SOURCES)}.")
    config_class, builder = _SOURCES[kind]
    if not isinstance(cfg, config_class):
        raise TypeError(f"source kind {kind!r} needs a {config_class.__name__}, got {type(cfg).__name__}.")
    return builder(cfg, torch.device(device))


@register_source("synthetic", SyntheticConfig)
def _synthetic(cfg: SyntheticConfig, device: torch.device) -> SyntheticSource:
    return SyntheticSource(cfg)

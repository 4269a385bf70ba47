"""Activation sources the trainer and the evaluators read: planted features (`synthetic`), planted (x, y) pairs
for transcoders (`pairs`), a live model through the mixing buffer or a harvested cache (`harvested`), chosen by
the `kind` of a source config (`registry`)."""

from saelab.sources.registry import (
    ActivationSource,
    build_source,
    register_source,
    source_config_classes,
    source_metadata,
)
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource, recovery_metrics

__all__ = [
    "ActivationSource",
    "SyntheticConfig",
    "SyntheticSource",
    "build_source",
    "recovery_metrics",
    "register_source",
    "source_config_classes",
    "source_metadata",
]

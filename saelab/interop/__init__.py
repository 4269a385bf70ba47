"""Interoperability with other SAE libraries' on-disk formats (SAELens, sparsify, dictionary_learning)."""

from saelab.interop.dictionary_learning import SAELAB_TO_DICTIONARY_LEARNING, export_dictionary_learning
from saelab.interop.saelens import (
    SAELAB_TO_SAELENS,
    SAELENS_TO_SAELAB,
    export_saelens,
    saelens_config,
    to_saelab,
)
from saelab.interop.sparsify import export_sparsify

__all__ = [
    "SAELAB_TO_DICTIONARY_LEARNING",
    "SAELAB_TO_SAELENS",
    "SAELENS_TO_SAELAB",
    "export_dictionary_learning",
    "export_saelens",
    "export_sparsify",
    "saelens_config",
    "to_saelab",
]

"""Files: loading any supported SAE folder (`loading`), the training checkpoint layout (`checkpoint`) and the
on-disk formats of other SAE libraries (SAELens, sparsify, dictionary_learning)."""

from saelab.io.dictionary_learning import export_dictionary_learning
from saelab.io.loading import load_sae
from saelab.io.saelens import export_saelens, saelens_config, to_saelab
from saelab.io.sparsify import export_sparsify

__all__ = [
    "export_dictionary_learning",
    "export_saelens",
    "export_sparsify",
    "load_sae",
    "saelens_config",
    "to_saelab",
]

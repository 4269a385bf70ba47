"""An SAE inside a transformer: the splice that replaces a hook's activations with the SAE's reconstruction
(`hooks`), and reading feature activations for texts (`features`)."""

from saelab.splice.features import FeatureActivations, read_features
from saelab.splice.hooks import feature_activations, spliced

__all__ = ["FeatureActivations", "feature_activations", "read_features", "spliced"]

"""Interoperability with other SAE libraries' on-disk formats (SAELens)."""

from saelab.interop.saelens import (
    SAELAB_TO_SAELENS,
    SAELENS_TO_SAELAB,
    export_saelens,
    saelens_config,
    to_saelab,
)

__all__ = ["SAELAB_TO_SAELENS", "SAELENS_TO_SAELAB", "export_saelens", "saelens_config", "to_saelab"]

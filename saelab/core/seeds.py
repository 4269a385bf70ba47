"""Independent random streams: every generator in saelab is seeded from (base seed, stream name, indices).

A user seed never seeds two streams directly. `derive_seed(0, "sae.init")` and
`derive_seed(0, "synthetic.features")` are unrelated 63-bit numbers (BLAKE2b of the three parts), so the
SAE's initialisation cannot reproduce the planted features, and no pair of user seeds or batch indices
makes two streams coincide (as `seed * C + index` did).

Stream names in use: "synthetic.features", "synthetic.batch" (index: batch number), "sae.init",
"torch.global", "mixing.shuffle" (index: start batch), "cache.order" (index: epoch), "cache.rows"
(indices: epoch, group), "eval.cooccurrence_latents", "eval.cooccurrence_clusters",
"eval.decoder_clusters", "eval.shuffles".
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(base: int, stream: str, *indices: int) -> int:
    """A 63-bit seed (fits torch and numpy) for stream `stream` of user seed `base` (and batch/epoch indices)."""
    parts = [str(int(base)), stream, *(str(int(i)) for i in indices)]
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8, person=b"saelab.seed").digest()
    return int.from_bytes(digest, "little") >> 1


def generator(base: int, stream: str, *indices: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with derive_seed(base, stream, *indices)."""
    return torch.Generator(device=device).manual_seed(derive_seed(base, stream, *indices))

"""The trainable SAE variants, found as the tests' users find them: one yaml per variant under configs/sae/."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.buffer.cache import CacheWriter
from saelab.sae import SAEConfig, get_sae_class
from saelab.sources.pairs import PairsConfig, PairsSource
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource

SAE_CONFIGS = Path(__file__).resolve().parents[1] / "saelab" / "configs" / "sae"
#: Width of the target of the transcoders in these small configurations.
D_OUT = 12


def trainable_architectures() -> list[str]:
    """Names of the variants with a config under configs/sae/ (those `saelab train sae=<name>` trains; that these
    are exactly the registry's trainable variants is tested in test_layers.py)."""
    return sorted(p.stem for p in SAE_CONFIGS.glob("*.yaml"))


def small_configs(
    base: dict[str, Any],
    *,
    data_parallel_only: bool = False,
    transcoders: list[str] | tuple[str, ...] = (),
    **overrides: dict[str, Any],
) -> dict[str, SAEConfig]:
    """architecture -> its config with `base` fields, k=4 where the config has a k, and `overrides[name]` (a
    transcoder takes its variant's overrides, and d_out=D_OUT). Transcoders other than `transcoders` are left
    out (they train on pairs: `planted_source`)."""
    out = {}
    for name in trainable_architectures():
        cls = get_sae_class(name)
        if data_parallel_only and not cls.data_parallel or cls.is_transcoder and name not in transcoders:
            continue
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        own = (
            overrides.get(name, overrides.get(cls.plain_class.architecture, {})) if cls.is_transcoder else {}
        )
        values = {
            **base,
            **({"k": 4} if "k" in fields else {}),
            **({"d_out": D_OUT} if cls.is_transcoder else {}),
            **(own or overrides.get(name, {})),
        }
        out[name] = cls.config_class(**values)
    return out


def planted_source(architecture: str, cfg: SyntheticConfig) -> SyntheticSource:
    """The planted source a variant trains on: cfg's; for a transcoder, pairs with cfg's codes and input
    features, a target of width D_OUT and a planted linear part."""
    if not get_sae_class(architecture).is_transcoder:
        return SyntheticSource(cfg)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SyntheticConfig) if f.name != "kind"}
    return PairsSource(PairsConfig(**fields, d_out=D_OUT, linear_scale=0.5))


def write_pair_cache(root: Path, rows: int = 600, d_in: int = 16, shard_tokens: int = 128) -> torch.Tensor:
    """A cache of hooks "x" [rows, d_in] (random) and "y" = x @ L^T [rows, D_OUT] (exact linear pairs, a first
    column holding the row number in both); returns L [D_OUT, d_in]. A row whose y is not its own x's breaks
    the relation by far more than rounding."""
    gen = torch.Generator().manual_seed(11)
    linear = torch.randn(D_OUT, d_in, generator=gen) / d_in**0.5
    x = torch.randn(rows, d_in, generator=gen) * 3
    x[:, 0] = torch.arange(rows, dtype=torch.float32)
    y = x @ linear.T
    writer = CacheWriter(root, {"x": d_in, "y": D_OUT}, "float32", shard_tokens, {"test": "pairs"})
    for start in range(0, rows, 50):
        part = slice(start, start + 50)
        writer.add({"x": x[part], "y": y[part]}, torch.arange(start, start + x[part].shape[0]), contexts=1)
    writer.finish({"x": {"hook_name": "x"}, "y": {"hook_name": "y"}}, wall_seconds=0.0)
    return linear


def pair_misfit(rows: Tensor, linear: Tensor) -> float:
    """max |y - x @ L^T| / max |y| over rows [B, d_in + D_OUT] (rounding, about 1e-7, when every row kept its
    pair; of order 1 when a row's y is another row's)."""
    d_in = linear.shape[1]
    y = rows[:, d_in:]
    return float((y - rows[:, :d_in] @ linear.T.to(rows.dtype)).abs().max() / y.abs().max())

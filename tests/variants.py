"""The trainable SAE variants, found as the tests' users find them: one yaml per variant under configs/sae/."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

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

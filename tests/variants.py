"""The trainable SAE variants, found as the tests' users find them: one yaml per variant under configs/sae/."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from saelab.sae import SAEConfig, get_sae_class

SAE_CONFIGS = Path(__file__).resolve().parents[1] / "saelab" / "configs" / "sae"


def trainable_architectures() -> list[str]:
    """Names of the variants with a config under configs/sae/ (those `saelab train sae=<name>` trains; that these
    are exactly the registry's trainable variants is tested in test_layers.py)."""
    return sorted(p.stem for p in SAE_CONFIGS.glob("*.yaml"))


def small_configs(
    base: dict[str, Any], *, data_parallel_only: bool = False, **overrides: dict[str, Any]
) -> dict[str, SAEConfig]:
    """architecture -> its config with `base` fields, k=4 where the config has a k, and `overrides[name]`."""
    out = {}
    for name in trainable_architectures():
        cls = get_sae_class(name)
        if data_parallel_only and not cls.data_parallel:
            continue
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        values = {**base, **({"k": 4} if "k" in fields else {}), **overrides.get(name, {})}
        out[name] = cls.config_class(**values)
    return out

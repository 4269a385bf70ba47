"""Hydra structured configs: every SAE variant, source kind, trainer and logging schema in the ConfigStore.

YAML files under `configs/` name these schemas in their defaults lists (e.g. `sae/topk.yaml` starts with
`defaults: [topk_schema, _self_]`), so overrides are type-checked against the dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from saelab.eval.config import EvalRunConfig
from saelab.harvest.config import HarvestRunConfig
from saelab.sae.base import SAEConfig
from saelab.sae.registry import _REGISTRY
from saelab.sources import source_config_classes
from saelab.train.config import LoggingConfig, TrainerConfig


@dataclass
class TrainRunConfig:
    """Everything `saelab train` needs."""

    sae: Any = MISSING
    source: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_configs() -> None:
    """Store all schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainRunConfig)
    cs.store(name="eval_schema", node=EvalRunConfig)
    cs.store(name="harvest_schema", node=HarvestRunConfig)
    for cls in set(_REGISTRY.values()):
        cs.store(group="sae", name=f"{cls.architecture}_schema", node=cls.config_class)
    for kind, config_class in source_config_classes().items():
        cs.store(group="source", name=f"{kind}_schema", node=config_class)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="logging", name="logging_schema", node=LoggingConfig)


def to_dataclass(node: DictConfig, field_name: str) -> Any:
    """Turn a composed config node into its dataclass; a node without a schema is a usage error."""
    obj = OmegaConf.to_object(node)
    if isinstance(obj, dict):
        raise ValueError(
            f"config group '{field_name}' has no schema; its YAML must list '<name>_schema' in defaults."
        )
    return obj


def sae_config(node: DictConfig) -> SAEConfig:
    cfg = to_dataclass(node, "sae")
    if not isinstance(cfg, SAEConfig):
        raise TypeError(f"the 'sae' config group must hold an SAE config, got {type(cfg).__name__}.")
    return cfg

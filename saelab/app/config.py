"""Hydra structured configs: the schema of each command (train, eval, harvest, inspect) and every SAE variant,
source kind, trainer and logging schema, in the ConfigStore.

YAML files under `configs/` name these schemas in their defaults lists (e.g. `sae/topk.yaml` starts with
`defaults: [topk_schema, _self_]`), so overrides are type-checked against the dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from saelab.core.checks import check_flags
from saelab.eval.config import EvalConfig
from saelab.inspect.config import InspectConfig
from saelab.inspect.explain.config import ExplainConfig
from saelab.sae.base import SAEConfig
from saelab.sae.registry import variant_classes
from saelab.sources import source_config_classes
from saelab.train.config import LoggingConfig, TrainerConfig


@dataclass
class SweepConfig:
    """What a search sweeper (hydra/sweeper=optuna_search, Optuna, Nevergrad, Ax) optimises.

    objective: a metric of the run's summary.json (`saelab.app.objective.objective_names`), e.g. heldout/fvu;
    with it the train task returns that float (what search sweepers need), without it a small dict of metrics
    and paths. direction: minimize or maximize (the shipped Optuna config passes it on to Optuna).
    """

    objective: str | None = None
    direction: str = "minimize"


@dataclass
class TrainRunConfig:
    """Everything `saelab train` needs."""

    sae: Any = MISSING
    source: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


@dataclass
class EvalRunConfig:
    """Everything `saelab eval` needs. sae_path (`sae=PATH` on the command line): an SAE directory, a run
    directory holding `sae/`, a training checkpoint, a list of those (`sae=[A,B]`) or a sweep folder.
    output_dir: null -> `<hydra run dir>/eval`."""

    sae_path: Any = MISSING
    source: Any = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str | None = None


@dataclass
class InspectRunConfig:
    """Everything `saelab inspect` needs. sae_path (`sae=PATH` on the command line): an SAE directory, a run
    directory, a checkpoint or a hub repo id. output_dir: null -> `<sae_path>/inspect` for a local SAE, else
    `<hydra run dir>/inspect`. collect: run the model and write the site (false: use the site in output_dir).
    serve: then serve the site on http://127.0.0.1:<port>/, with the text box when `live` (the model and SAE
    are loaded for it). log_requests: print every request the server answers. explain: explanations."""

    sae_path: str | None = None
    source: Any = MISSING
    inspect: InspectConfig = field(default_factory=InspectConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str | None = None
    collect: bool = True
    serve: bool = False
    live: bool = True
    port: int = 8000
    log_requests: bool = False


@dataclass
class HarvestRunConfig:
    """`saelab harvest`: write activations at hook_names (default [source.hook_name]) to a cache folder.

    total_tokens: rows to harvest per hook (0: one pass over the dataset). shard_tokens: rows per shard.
    dtype: storage dtype (float32, float16, bfloat16). overwrite: replace a complete cache in output_dir
    (the new one is built beside it and swapped in when complete). verify: instead of harvesting, check the
    cache in output_dir against its manifest's checksums.
    """

    source: Any = MISSING
    output_dir: str = MISSING
    hook_names: list[str] = field(default_factory=list)
    total_tokens: int = 1_000_000
    shard_tokens: int = 65536
    dtype: str = "float32"
    overwrite: bool = False
    verify: bool = False
    progress: bool = True

    def validate(self) -> None:
        check_flags(self, "harvest")
        if self.total_tokens < 0:
            raise ValueError(f"total_tokens={self.total_tokens} must be >= 0 (0: the whole dataset).")
        if self.shard_tokens <= 0:
            raise ValueError(f"shard_tokens={self.shard_tokens} must be > 0.")
        if not self.output_dir:
            raise ValueError("output_dir must be set, e.g. output_dir=caches/smollm2-l6.")


def register_configs() -> None:
    """Store all schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainRunConfig)
    cs.store(name="eval_schema", node=EvalRunConfig)
    cs.store(name="harvest_schema", node=HarvestRunConfig)
    cs.store(name="inspect_schema", node=InspectRunConfig)
    for cls in variant_classes():
        cs.store(group="sae", name=f"{cls.architecture}_schema", node=sae_schema(cls))
    for kind, config_class in source_config_classes().items():
        cs.store(group="source", name=f"{kind}_schema", node=config_class)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="logging", name="logging_schema", node=LoggingConfig)


def sae_schema(cls: type) -> Any:
    """The ConfigStore node of a variant: its config class; for a transcoder, one whose fields inherited from
    the variant's config are MISSING, so that merged after the variant's yaml (sae/<variant>_transcoder.yaml
    lists sae/<variant> first) it sets the type and the transcoder's own fields without resetting the variant's
    settings."""
    if not cls.is_transcoder:
        return cls.config_class
    inherited = {f.name for f in dataclasses.fields(cls.plain_class.config_class)} - {"architecture"}
    return cls.config_class(**dict.fromkeys(inherited, MISSING))


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

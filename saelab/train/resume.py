"""What a resumed run may change: everything that decides the batches, the model or the optimisation must
match the checkpointed run; only bookkeeping and placement may differ."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from saelab.core.config_diff import changed_settings
from saelab.sae.base import SAEConfig
from saelab.train.config import TrainerConfig

#: Trainer fields a resume may change: length of the run, logging / checkpoint / eval cadence (a change in
#: the number of held-out batches is refused by `Trainer.load_state_dict`), device, compilation, autocast.
SAFE_TRAINER_FIELDS = (
    "total_tokens",
    "log_every",
    "checkpoint_every",
    "checkpoint_every_minutes",
    "keep_checkpoints",
    "eval_every",
    "eval_batches",
    "dead_check_every",
    "device",
    "compile",
    "autocast_dtype",
    "resume_from",
)
#: Source fields that only move or batch the work (model sources), never change which activations come.
SAFE_SOURCE_FIELDS = ("device", "buffer_device", "assets_dir", "streaming", "model_batch_size")


def check_resume_settings(
    checkpoint: Path,
    state: dict[str, Any],
    checkpoint_sae: SAEConfig,
    trainer: TrainerConfig,
    run_config: dict[str, Any] | None,
    sae: SAEConfig | None,
) -> None:
    """Raise ValueError listing every unsafe difference (field: old -> new) between the checkpointed run and
    the resumed one: trainer settings, the run config's `source` section, and the requested SAE (if given).
    Checkpoints written before the settings were recorded are compared on the SAE only."""
    diffs: list[str] = []
    old_trainer = state.get("trainer_config")
    if old_trainer is not None:
        new_trainer = dataclasses.asdict(trainer)
        diffs += changed_settings(old_trainer, new_trainer, "trainer.", ignore=SAFE_TRAINER_FIELDS)
    old_source = (state.get("run_config") or {}).get("source")
    new_source = (run_config or {}).get("source")
    if old_source is not None and new_source is not None:
        diffs += changed_settings(old_source, new_source, "source.", ignore=SAFE_SOURCE_FIELDS)
    if sae is not None:
        old_sae = {k: v for k, v in dataclasses.asdict(checkpoint_sae).items() if k != "metadata"}
        new_sae = {k: v for k, v in dataclasses.asdict(sae).items() if k != "metadata"}
        diffs += changed_settings(old_sae, new_sae, "sae.")
    if diffs:
        safe = ", ".join(
            [f"trainer.{name}" for name in SAFE_TRAINER_FIELDS if name != "resume_from"]
            + [f"source.{name}" for name in SAFE_SOURCE_FIELDS]
            + ["logging.*"]
        )
        raise ValueError(
            f"trainer.resume_from={str(checkpoint)!r} was trained with other settings than this run asks for: "
            f"{'; '.join(diffs)}. Resume with the checkpoint's settings (its run directory's .hydra/config.yaml "
            f"lists them) or start a new run. Only these may change on resume: {safe}."
        )

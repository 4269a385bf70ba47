"""Training checkpoints: the SAE plus optimizer, schedule, tracker and RNG state.

Layout: <dir>/step_<N>/ holds
    cfg.json + sae_weights.safetensors   the SAE with the training input scale folded in: it takes raw
                                         activations, in saelab and in SAELens, exactly like the run's sae/
    training_weights.safetensors         the training-space tensors (inputs times the scale), for resuming
    trainer_state.pt                     step, input scale, optimizer, schedule, tracker, RNG
Each checkpoint is written to a temporary directory and renamed into place; temporaries of crashed runs are
deleted by the next save. Older checkpoints (training-space sae_weights.safetensors, no
training_weights.safetensors) still load and resume.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from saelab.core.atomic import atomic_directory, remove_stale_temporaries
from saelab.io.files import read_json_object
from saelab.io.layout import STATE_FILE, TRAINING_WEIGHTS_FILE, checkpoint_dir, list_checkpoints
from saelab.io.loading import checkpoint_weights_folded, read_sae_dir
from saelab.sae.base import CONFIG_FILE, SAE, WEIGHTS_FILE

#: Entries every trainer_state.pt holds.
STATE_KEYS = ("step", "input_scale", "optimizer", "scheduler", "tracker", "cpu_rng")


def inference_copy(sae: SAE, input_scale: float, metadata: dict[str, Any] | None = None) -> SAE:
    """A copy of `sae` taking raw activations (input scale folded in; no random numbers drawn)."""
    folded = copy.deepcopy(sae)
    with torch.no_grad():
        folded.fold_input_scale(input_scale)
    folded.cfg.metadata = {**folded.cfg.metadata, **(metadata or {}), "input_scale_folded": input_scale}
    return folded.eval()


def save_checkpoint(
    root: Path, step: int, sae: SAE, state: dict[str, Any], keep: int, metadata: dict[str, Any] | None = None
) -> Path:
    """Write checkpoint `root/step_<step>` atomically and prune all but the newest `keep`.

    sae: the training SAE (training-space weights); state: the trainer state, holding its `input_scale`;
    metadata: added to the checkpoint SAE's metadata (e.g. the data record, `Trainer.data_record`).
    """
    final = checkpoint_dir(root, step)
    remove_stale_temporaries(root, "step_")
    tokens = state.get("tracker", {}).get("tokens_seen")
    extra = {**(metadata or {}), **({"training_tokens": int(tokens)} if tokens is not None else {})}
    inference = inference_copy(sae, float(state["input_scale"]), extra)
    with atomic_directory(final) as tmp:
        inference.save(tmp / "sae")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (tmp / "sae" / name).rename(tmp / name)
        (tmp / "sae").rmdir()
        training = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
        save_file(training, str(tmp / TRAINING_WEIGHTS_FILE))
        with open(tmp / STATE_FILE, "wb") as f:  # through Python's file: a full disk raises OSError(ENOSPC)
            torch.save(state, f)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint dir, a checkpoints root, or a run dir holding `checkpoints/`; return the newest."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    for root in (p, p / "checkpoints"):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"trainer.resume_from={str(path)!r} holds no checkpoint (expected {STATE_FILE} in it, "
        "or step_* directories under it or under its checkpoints/ folder)."
    )


def load_checkpoint(path: Path, device: torch.device) -> tuple[SAE, dict[str, Any]]:
    """Load (training SAE, trainer state) from a checkpoint directory."""
    if checkpoint_weights_folded(path, read_json_object(path / CONFIG_FILE)):
        sae = read_sae_dir(path, device=device, weights_name=TRAINING_WEIGHTS_FILE)
        sae.cfg.metadata.pop("input_scale_folded", None)
    else:  # an older checkpoint: sae_weights.safetensors holds the training-space weights
        sae = read_sae_dir(path, device=device)
    try:
        state = torch.load(path / STATE_FILE, map_location=device, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"could not read {path / STATE_FILE}: {err}. The checkpoint is corrupt; pick another."
        ) from err
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise ValueError(
            f"{path / STATE_FILE} has no {missing}: it is damaged or not a saelab trainer state; resume from "
            "another checkpoint."
        )
    return sae, state

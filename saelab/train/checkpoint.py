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
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from saelab.atomic import atomic_directory, remove_stale_temporaries
from saelab.sae.base import CONFIG_FILE, SAE, WEIGHTS_FILE
from saelab.sae.loading import read_sae_dir

STATE_FILE = "trainer_state.pt"
TRAINING_WEIGHTS_FILE = "training_weights.safetensors"
#: Entries every trainer_state.pt holds.
STATE_KEYS = ("step", "input_scale", "optimizer", "scheduler", "tracker", "cpu_rng")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def inference_copy(sae: SAE, input_scale: float, metadata: dict[str, Any] | None = None) -> SAE:
    """A copy of `sae` taking raw activations (input scale folded in; no random numbers drawn)."""
    folded = copy.deepcopy(sae)
    with torch.no_grad():
        folded.fold_input_scale(input_scale)
    folded.cfg.metadata = {**folded.cfg.metadata, **(metadata or {}), "input_scale_folded": input_scale}
    return folded.eval()


def save_checkpoint(root: Path, step: int, sae: SAE, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `root/step_<step>` atomically and prune all but the newest `keep`.

    sae: the training SAE (training-space weights); state: the trainer state, holding its `input_scale`.
    """
    final = root / f"step_{step:09d}"
    remove_stale_temporaries(root, "step_")
    tokens = state.get("tracker", {}).get("tokens_seen")
    extra = {"training_tokens": int(tokens)} if tokens is not None else {}
    inference = inference_copy(sae, float(state["input_scale"]), extra)
    with atomic_directory(final) as tmp:
        inference.save(tmp / "sae")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (tmp / "sae" / name).rename(tmp / name)
        (tmp / "sae").rmdir()
        training = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
        save_file(training, str(tmp / TRAINING_WEIGHTS_FILE))
        torch.save(state, tmp / STATE_FILE)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


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
    if (path / TRAINING_WEIGHTS_FILE).is_file():
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


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    """The checkpoint's cfg.json with `architecture` as saelab names it (the file holds SAELens's name)."""
    raw = json.loads((path / CONFIG_FILE).read_text())
    raw["architecture"] = raw.get("saelab_architecture", raw.get("architecture"))
    return raw

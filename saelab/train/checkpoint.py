"""Training checkpoints: the SAE (training-space weights) plus optimizer, schedule, tracker and RNG state.

Layout: <dir>/step_<N>/{cfg.json, sae_weights.safetensors, trainer_state.pt}, each checkpoint written
to a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from saelab.atomic import atomic_directory
from saelab.sae.base import CONFIG_FILE, SAE, WEIGHTS_FILE
from saelab.sae.loading import read_sae_dir

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_checkpoint(root: Path, step: int, sae: SAE, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `root/step_<step>` atomically and prune all but the newest `keep`."""
    final = root / f"step_{step:09d}"
    with atomic_directory(final) as tmp:
        sae.save(tmp / "sae")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (tmp / "sae" / name).rename(tmp / name)
        (tmp / "sae").rmdir()
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
    """Load (sae, trainer state) from a checkpoint directory."""
    sae = read_sae_dir(path, device=device)
    try:
        state = torch.load(path / STATE_FILE, map_location=device, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"could not read {path / STATE_FILE}: {err}. The checkpoint is corrupt; pick another."
        ) from err
    return sae, state


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    return json.loads((path / CONFIG_FILE).read_text())

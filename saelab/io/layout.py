"""Where a training run keeps its checkpoints: <root>/step_<N>/ with the SAE files, the training-space weights and
the trainer state. Shared by reading (saelab.io.loading) and writing (saelab.io.checkpoint)."""

from __future__ import annotations

import re
from pathlib import Path

STATE_FILE = "trainer_state.pt"
#: What a run that stopped alone while others trained on (hydra/launcher=together) leaves in its run directory:
#: {"error", "type", "step"}.
FAILURE_FILE = "error.json"
TRAINING_WEIGHTS_FILE = "training_weights.safetensors"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    """The folder of the checkpoint at `step` under `root`."""
    return root / f"step_{step:09d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

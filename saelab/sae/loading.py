"""Load a saved SAE directory (`cfg.json` + `sae_weights.safetensors`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from saelab.sae.base import CONFIG_FILE, DTYPES, SAE, WEIGHTS_FILE, load_weights
from saelab.sae.registry import get_sae_class


def load_sae(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None) -> SAE:
    """Load the SAE saved in directory `path`, ready for encode/decode, on `device` (optionally cast to dtype)."""
    folder = Path(path)
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for needed in (cfg_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed} is missing: an SAE directory needs {CONFIG_FILE} and {WEIGHTS_FILE}."
            )
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON ({err}); the checkpoint is corrupt.") from err
    if "architecture" not in data:
        raise ValueError(f"{cfg_path} has no 'architecture' field; cannot tell which SAE variant it holds.")
    sae = get_sae_class(data["architecture"]).from_config_dict(data)
    state = load_weights(weights_path)
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise ValueError(
            f"{weights_path} does not match {cfg_path}: expected tensors {expected}, found {got}."
        )
    sae.load_state_dict(state)
    sae.to(device=device, dtype=DTYPES[dtype] if dtype else None)
    return sae.eval()

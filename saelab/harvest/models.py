"""Load the model to harvest and wrap it in a harvester.

model "smollm2": the offline SmolLM2-135M-Instruct from `saelab fetch-assets`; any other name is a Hugging
Face hub name or local checkpoint folder. backend "transformer_lens": a TransformerLens HookedTransformer
(hook names like "blocks.6.hook_resid_post"; raw weights, no LayerNorm folding or weight centring, so the
activations are the HF model's; see `saelab.harvest.hooked`). backend "hf": the plain transformers model
with forward hooks on submodules (e.g. "model.layers.6").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saelab.data.assets import smollm2_checkpoint
from saelab.harvest import hooked
from saelab.harvest.base import Harvester
from saelab.harvest.config import check_backend
from saelab.harvest.module import ModuleHarvester
from saelab.harvest.tlens import TransformerLensHarvester

SMOLLM2 = "smollm2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def checkpoint(model: str, assets_dir: str) -> str:
    """The hub name or local folder transformers loads `model` from."""
    return str(smollm2_checkpoint(assets_dir)) if model == SMOLLM2 else model


def load_hf(model: str, device: torch.device, dtype: torch.dtype, assets_dir: str) -> tuple[Any, Any]:
    """(transformers causal LM in eval mode on `device`, its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoint(model, assets_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return hf, tokenizer


def load_model(
    model: str, backend: str, device: torch.device, dtype: str, assets_dir: str
) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer) for `backend`; see the module docstring for the names."""
    check_backend(backend)
    if dtype not in DTYPES:
        raise ValueError(f"source.dtype={dtype!r} must be one of {sorted(DTYPES)}.")
    if backend == "hf":
        return load_hf(model, device, DTYPES[dtype], assets_dir)
    local = model == SMOLLM2 or Path(model).is_dir()
    official = None if local else hooked.official_name(model)
    if official is not None:  # TransformerLens loads the models of its list from the hub itself
        tl = hooked.from_hub(official, device, DTYPES[dtype])
    else:
        hf, tokenizer = load_hf(model, device, DTYPES[dtype], assets_dir)
        tl = hooked.from_hf(hf, tokenizer, checkpoint(model, assets_dir), device, DTYPES[dtype])
    return tl, tl.tokenizer


def make_harvester(model: Any, backend: str, hook_names: list[str]) -> Harvester:
    """The harvester for a model loaded with `backend`."""
    check_backend(backend)
    if backend == "hf":
        return ModuleHarvester(model, hook_names)
    return TransformerLensHarvester(model, hook_names)

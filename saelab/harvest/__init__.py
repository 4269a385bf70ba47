"""Activations from real transformers: TransformerLens hook points or forward hooks on any nn.Module."""

from saelab.harvest.config import ModelSourceConfig
from saelab.harvest.models import load_model, make_harvester
from saelab.harvest.module import ModuleHarvester
from saelab.harvest.names import UnknownHookError
from saelab.harvest.pipeline import HarvestPipeline, build_pipeline, harvest_rows
from saelab.harvest.tlens import TransformerLensHarvester

__all__ = [
    "HarvestPipeline",
    "ModelSourceConfig",
    "ModuleHarvester",
    "TransformerLensHarvester",
    "UnknownHookError",
    "build_pipeline",
    "harvest_rows",
    "load_model",
    "make_harvester",
]

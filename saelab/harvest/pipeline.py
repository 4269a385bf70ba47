"""Tokens -> model -> per-token activation rows, with special tokens (BOS, separators, pad) dropped."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saelab.data.tokens import ContextStream, excluded_token_ids, keep_mask
from saelab.harvest.base import Harvester
from saelab.harvest.config import ModelSourceConfig
from saelab.harvest.models import load_model, make_harvester


@dataclass
class HarvestPipeline:
    """A harvester, the context stream feeding it, and the token ids whose rows are dropped."""

    harvester: Harvester
    contexts: ContextStream
    excluded: Tensor

    @classmethod
    def from_tokenizer(cls, harvester: Harvester, tokenizer: Any, cfg: ModelSourceConfig) -> HarvestPipeline:
        """The pipeline for `cfg`'s text and contexts, dropping the tokenizer's special tokens; refuses a
        context_size longer than the model's context."""
        longest = context_length(getattr(harvester, "model", None))
        if longest is not None and cfg.context_size > longest:
            raise ValueError(
                f"source.context_size={cfg.context_size} is longer than the model's context ({longest} tokens); "
                f"set source.context_size to at most {longest}."
            )
        contexts = ContextStream(cfg.text_spec(), tokenizer, cfg.context_size, cfg.prepend_bos)
        return cls(harvester, contexts, torch.tensor(excluded_token_ids(tokenizer), dtype=torch.long))


def context_length(model: Any) -> int | None:
    """The longest input `model` takes: a TransformerLens model's cfg.n_ctx, a Hugging Face model's
    max_position_embeddings (or n_positions); None when it does not say."""
    if model is None:
        return None
    tl_cfg = getattr(model, "cfg", None)
    if isinstance(getattr(tl_cfg, "n_ctx", None), int):
        return tl_cfg.n_ctx
    hf_cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(hf_cfg, name, None), int):
            return getattr(hf_cfg, name)
    return None


def build_pipeline(cfg: ModelSourceConfig, hook_names: list[str], device: torch.device) -> HarvestPipeline:
    """Load cfg.model on `device` and hook it at `hook_names`."""
    cfg.validate()
    model, tokenizer = load_model(cfg.model, cfg.backend, device, cfg.dtype, cfg.assets_dir)
    return HarvestPipeline.from_tokenizer(make_harvester(model, cfg.backend, hook_names), tokenizer, cfg)


def harvest_rows(
    pipeline: HarvestPipeline, batch_size: int, skip: int = 0, repeat: bool = False, reserved: int = 0
) -> Iterator[tuple[dict[str, Tensor], Tensor, int]]:
    """Per model batch of `batch_size` contexts (after skipping `skip` contexts; `ContextStream.batches` for
    repeat and reserved): ({hook: rows [N, d]} on the model's device, token ids [N] on the CPU, contexts
    used). Rows are kept positions in (context, pos) order."""
    for tokens in pipeline.contexts.batches(batch_size, skip=skip, repeat=repeat, reserved=reserved):
        acts = pipeline.harvester(tokens)
        keep = keep_mask(tokens, pipeline.excluded)
        keep_dev = keep.to(pipeline.harvester.device)
        yield {name: act[keep_dev] for name, act in acts.items()}, tokens[keep], tokens.shape[0]

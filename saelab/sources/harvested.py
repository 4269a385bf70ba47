"""Source kinds "model" (live: tokens -> harvester -> mixing buffer) and "cache" (a `saelab harvest` folder).

With `target_hook` set, either yields a transcoder's pairs: rows [x | y] of hook_name and target_hook, one
tensor, so shuffling, sharding and resuming can never separate a pair; `d_out` is y's width (None: single
activations). Heavy libraries (transformers, TransformerLens, datasets) are imported only when a source is built.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.core.seeds import derive_seed
from saelab.harvest.config import ModelSourceConfig
from saelab.sources.registry import register_source


class ModelSource:
    """Live activations of cfg.hook_name (rows [x | y] with cfg.target_hook), mixed in a shuffling buffer.
    Endless: the dataset repeats.

    batches(B, start_batch=b > 0) starts on the text after everything that the stream from batch 0 can have
    served in its first b batches (b * B rows, plus a buffer and a model batch of rows, counted on the
    tokens without running the model). So held-out batches 0..h-1 never reappear in training (passes after
    the first skip their text: reserved_batches=h). A resumed run starts after the text position its
    checkpoint recorded (`ModelBatches.contexts_read`, skip_contexts): fresh text, though not the exact rows
    of the uninterrupted run (train from a cache for that).
    """

    #: the text repeats: the trainer passes its held-out batch count as `reserved_batches`
    repeats_text = True

    def __init__(self, cfg: ModelSourceConfig, device: torch.device, pipeline: Any = None):
        from saelab.harvest.base import hook_widths
        from saelab.harvest.pipeline import build_pipeline

        cfg.validate()
        self.cfg = cfg
        self.train_device = device
        model_device = device if cfg.device == "auto" else torch.device(cfg.device)
        self.hooks = [cfg.hook_name, *([cfg.target_hook] if cfg.target_hook else [])]
        self.pipeline = pipeline or build_pipeline(cfg, self.hooks, model_device)
        widths = hook_widths(self.pipeline.harvester)
        self.d_in = widths[cfg.hook_name]
        self.d_out: int | None = widths[cfg.target_hook] if cfg.target_hook else None

    def metadata(self) -> dict[str, Any]:
        cfg = self.cfg
        reading = {
            "text_column": cfg.text_column,
            "sample_by": cfg.sample_by,
            "buffer_tokens": cfg.buffer_tokens,
            "model_batch_size": cfg.model_batch_size,
        }
        return {"source": "model", **cfg.metadata(cfg.hook_name, cfg.target_hook), "reading": reading}

    def contexts_before(self, start_batch: int, batch_size: int, reserved: int = 0, streams: int = 1) -> int:
        """Contexts from the start of the text that `streams` streams, one after the other, can have read in
        serving start_batch batches of batch_size rows in all (counted on the tokens, the dataset repeating
        without its first `reserved` contexts): each reads ahead up to a buffer and a model batch of rows
        and ends inside a context. Two for a training stream that started after held-out batches."""
        if start_batch == 0:
            return 0
        cfg = self.cfg
        ahead = cfg.buffer_tokens + (cfg.model_batch_size + 1) * cfg.context_size
        used = start_batch * batch_size + streams * ahead
        return self.pipeline.contexts.contexts_holding(used, self.pipeline.excluded, reserved)

    def for_hooks(self, hooks: list[str]) -> dict[str, ModelSource]:
        """One source per hook, all on one harvester of this model over every hook (one forward pass per model
        batch, stopping after the deepest hook): `joint_batches` of any of them serves them together."""
        from saelab.harvest.models import make_harvester

        harvester = make_harvester(self.pipeline.harvester.model, self.cfg.backend, list(hooks))
        pipeline = dataclasses.replace(self.pipeline, harvester=harvester)
        return {
            hook: ModelSource(dataclasses.replace(self.cfg, hook_name=hook), self.train_device, pipeline)
            for hook in hooks
        }

    def text_holds(self, contexts: int) -> bool:
        """Whether one pass over the text holds more than `contexts` contexts (tokenizes at most that many + 1,
        not the whole of a large dataset)."""
        return next(itertools.islice(self.pipeline.contexts.contexts(), contexts, None), None) is not None

    def batches(
        self,
        batch_size: int,
        start_batch: int = 0,
        reserved_batches: int = 0,
        skip_contexts: int | None = None,
    ) -> ModelBatches:
        """Endless batches [batch_size, d_in] from the mixing buffer. reserved_batches: the first batches of
        the stream, held out for evaluation; their text is not read again when the dataset repeats.
        skip_contexts: where to start in the text (a resumed run's recorded `contexts_read`) instead of
        `contexts_before(start_batch)` (the bound for checkpoints that do not record it)."""
        widths = {self.cfg.hook_name: self.d_in}
        if self.d_out is not None:  # a transcoder's rows [x | y]
            widths[self.cfg.target_hook] = self.d_out
        return self.joint_batches(
            widths, batch_size, start_batch, reserved_batches, skip_contexts, split=False
        )

    def joint_batches(
        self,
        widths: dict[str, int],
        batch_size: int,
        start_batch: int = 0,
        reserved_batches: int = 0,
        skip_contexts: int | None = None,
        split: bool = True,
    ) -> ModelBatches:
        """`batches` of several hooks of this source's harvester (`for_hooks`; widths: {hook: d_hook}) in one
        stream: each item is {hook: [batch_size, d_hook]}, hook h's rows exactly those `batches` of h's own
        source serves (one mixing buffer holds the hooks' rows side by side, so one shuffle moves them together).
        One hook, or split=False: the plain [batch_size, sum of widths] rows."""
        from saelab.buffer.mixing import MixingBuffer, buffer_device
        from saelab.harvest.pipeline import harvest_rows

        cfg = self.cfg
        reserved = self.contexts_before(reserved_batches, batch_size)
        if reserved and not self.text_holds(reserved):
            raise ValueError(
                f"source.dataset={cfg.dataset!r}: the {reserved_batches} held-out batches of {batch_size} rows, "
                f"with the mixing buffer (source.buffer_tokens={cfg.buffer_tokens:,}) and a model batch, can "
                "read the whole text, so training would read held-out text. Use more text, a smaller "
                "source.buffer_tokens or trainer.eval_batches, or set trainer.eval_every=0 and evaluate "
                "afterwards with `saelab eval`."
            )
        if skip_contexts is not None:
            skip = skip_contexts
        else:  # past a resumed held-out run, both the held-out and the training stream read ahead
            streams = 2 if 0 < reserved_batches < start_batch else 1
            skip = self.contexts_before(start_batch, batch_size, reserved, streams)
        rows = harvest_rows(self.pipeline, cfg.model_batch_size, skip=skip, repeat=True, reserved=reserved)
        width = sum(widths.values())
        device = buffer_device(cfg.buffer_device, self.train_device, cfg.buffer_tokens * width * 4)
        seed = derive_seed(cfg.seed, "mixing.shuffle", start_batch)
        buffer = MixingBuffer(cfg.buffer_tokens, width, batch_size, device, seed=seed)
        return ModelBatches(rows, skip, widths, buffer, split)


class ModelBatches:
    """A live source's batches (an iterator): [B, d] rows (d: the hooks' widths side by side; one hook, or
    split=False), else {hook: [B, d_hook]}; and
    `contexts_read`: the text position after every context read so far (from the start of the text, passes
    after the first counted without their reserved contexts), so the batches served came from text before it.
    Starts at the stream's skip."""

    def __init__(
        self,
        rows: Iterator[tuple[dict[str, Tensor], Tensor, int]],
        skip: int,
        widths: dict[str, int],
        buffer: Any,
        split: bool = True,
    ):
        self.contexts_read = skip
        self.widths, self.split = widths, split
        self._batches = buffer.batches(self._activations(rows, list(widths)))

    def _activations(
        self, rows: Iterator[tuple[dict[str, Tensor], Tensor, int]], hooks: list[str]
    ) -> Iterator[Tensor]:
        for acts, _, contexts in rows:
            self.contexts_read += contexts
            yield acts[hooks[0]] if len(hooks) == 1 else torch.cat([acts[h] for h in hooks], dim=1)

    def __iter__(self) -> ModelBatches:
        return self

    def __next__(self) -> Tensor | dict[str, Tensor]:
        batch = next(self._batches)
        if not self.split or len(self.widths) == 1:
            return batch
        parts = batch.split(list(self.widths.values()), dim=1)
        return {hook: part.contiguous() for hook, part in zip(self.widths, parts, strict=True)}

    def close(self) -> None:
        self._batches.close()


@dataclass
class CacheSourceConfig:
    """Activations from a `saelab harvest` cache folder.

    kind: the source kind (`source=cache`). path: the cache folder (`saelab harvest output_dir=...`).

    hook_name: which hook to train on ("" when the cache holds one). target_hook: a transcoder's target hook
    in the same cache ("" for an SAE): rows [x | y], each x beside the y of its token. group_tokens: rows loaded
    and shuffled together (whole shards, in a shuffled order per epoch). seed: the reading order.
    """

    kind: str = "cache"
    path: str = ""
    hook_name: str = ""
    target_hook: str = ""
    group_tokens: int = 131072
    seed: int = 0

    def validate(self) -> None:
        if not self.path:
            raise ValueError("source.path must name a cache folder written by `saelab harvest`.")
        if self.group_tokens <= 0:
            raise ValueError(f"source.group_tokens={self.group_tokens} must be > 0.")


class CacheSource:
    """Batches read from a cache in shuffled shard order; batch b is a pure function of (seed, b)."""

    def __init__(self, cfg: CacheSourceConfig, cache: Any = None):
        """cache: the opened `ActivationCache` of cfg.path to share (`for_hooks`); None opens it."""
        from saelab.buffer.cache import ActivationCache

        cfg.validate()
        self.cfg = cfg
        self.cache = cache or ActivationCache(cfg.path)
        self.hook_name = self.cache.check_hook(cfg.hook_name or None)
        self.d_in = self.cache.d_in(self.hook_name)
        self.target_hook = self.cache.check_hook(cfg.target_hook) if cfg.target_hook else None
        self.d_out: int | None = self.cache.d_in(self.target_hook) if self.target_hook else None

    def for_hooks(self, hooks: list[str]) -> dict[str, CacheSource]:
        """One source per hook of this cache, sharing its reader; batch b of each holds the same token rows (the
        reading order does not depend on the hook)."""
        return {
            hook: CacheSource(dataclasses.replace(self.cfg, hook_name=hook), self.cache) for hook in hooks
        }

    @property
    def distinct_rows(self) -> int:
        """Rows of one pass over the cache; the stream repeats them (reshuffled) after that."""
        return self.cache.total_rows

    def metadata(self) -> dict[str, Any]:
        meta = self.cache.manifest["metadata"].get(self.hook_name, {})
        return {
            "source": "cache",
            **meta,
            **({"hook_name_out": self.target_hook} if self.target_hook else {}),
            "cache_path": str(Path(self.cfg.path).expanduser().resolve()),
            "reading": {"seed": self.cfg.seed, "group_tokens": self.cfg.group_tokens},
            "distinct_rows": self.distinct_rows,
        }

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[Tensor]:
        hooks = [self.hook_name, self.target_hook] if self.target_hook else self.hook_name
        return self.cache.batches(hooks, batch_size, start_batch, self.cfg.seed, self.cfg.group_tokens)


@register_source("model", ModelSourceConfig)
def _model(cfg: ModelSourceConfig, device: torch.device) -> ModelSource:
    return ModelSource(cfg, device)


@register_source("cache", CacheSourceConfig)
def _cache(cfg: CacheSourceConfig, device: torch.device) -> CacheSource:
    return CacheSource(cfg)


def transcoder_source_config(cfg: Any, hook_name_out: str | None = None) -> Any:
    """The source config a transcoder reads: `cfg` with its target hook set, so the source yields [x | y] rows.

    An explicit source.target_hook is kept. Without one: with source.backend=hf, x is the input of the module
    source.hook_name names and y its output (hook_name "<module>:input", target_hook "<module>"); else the
    transcoder's own target (`hook_name_out`, from its metadata) when given; else the missing field is named. A
    planted-pairs source is returned as is; a source of single activations is refused.
    """
    from saelab.harvest.module import INPUT_SUFFIX, module_of
    from saelab.sources.pairs import PairsConfig

    if isinstance(cfg, PairsConfig):
        return cfg
    if not isinstance(cfg, (ModelSourceConfig, CacheSourceConfig)):
        raise ValueError(
            f"source.kind={getattr(cfg, 'kind', None)!r} yields single activations, but a transcoder trains on "
            "(input, target) pairs: use source=pairs (planted pairs), or a model or cache source with "
            "source.target_hook."
        )
    if cfg.target_hook:
        return cfg
    if isinstance(cfg, ModelSourceConfig) and cfg.backend == "hf":
        module = module_of(cfg.hook_name)
        return dataclasses.replace(cfg, hook_name=module + INPUT_SUFFIX, target_hook=module)
    if hook_name_out:
        return dataclasses.replace(cfg, target_hook=hook_name_out)
    example = "blocks.6.hook_mlp_out (with source.hook_name=blocks.6.ln2.hook_normalized)"
    raise ValueError(
        f"source.target_hook is empty: a transcoder reads source.hook_name={cfg.hook_name!r} as its input and "
        f"needs the hook it predicts, e.g. source.target_hook={example}; with source.backend=hf, "
        "source.hook_name=<module> alone pairs the module's input with its output."
    )

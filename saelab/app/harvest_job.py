"""`saelab harvest`: run the model over the dataset once and write the activations to a shard cache.

    saelab harvest source=smollm2 output_dir=caches/smol hook_names=[blocks.3.hook_resid_post,blocks.6.hook_resid_post]

Resumable: rerunning an interrupted harvest with the same settings continues after the last written shard.
`overwrite=true` builds the new cache beside the old one and swaps it in at the end. `verify=true` checks an
existing cache's shard files against the checksums in its manifest instead of harvesting.
"""

from __future__ import annotations

import time
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from saelab.app.config import HarvestRunConfig
from saelab.buffer.cache import ActivationCache, CacheWriter, check_storage_dtype
from saelab.core.device import resolve_device
from saelab.harvest.base import hook_widths
from saelab.harvest.config import ModelSourceConfig
from saelab.harvest.pipeline import HarvestPipeline, build_pipeline, harvest_rows

#: Source settings that decide which rows a cache holds (batch and shard sizes only change the layout).
CONTENT_KEYS = [
    "model",
    "backend",
    "dtype",
    "dataset",
    "dataset_name",
    "split",
    "text_column",
    "sample_by",
    "context_size",
    "prepend_bos",
]


def fingerprint(cfg: HarvestRunConfig, hooks: list[str]) -> dict[str, Any]:
    """The settings that decide what a cache holds; a resumed harvest must match them."""
    src: ModelSourceConfig = cfg.source
    return {
        **{f"source.{k}": getattr(src, k) for k in CONTENT_KEYS},
        "hook_names": hooks,
        "dtype": cfg.dtype,
    }


def run_harvest(cfg: HarvestRunConfig, pipeline: HarvestPipeline | None = None) -> dict[str, Any]:
    """Harvest cfg.total_tokens rows per hook into cfg.output_dir; returns the manifest.

    pipeline: an already-built harvester + context stream (tests, notebooks); default: built from cfg.source.
    """
    cfg.validate()
    check_storage_dtype(cfg.dtype)
    src: ModelSourceConfig = cfg.source
    src.validate()
    hooks = list(cfg.hook_names) or [src.hook_name]
    if pipeline is None:
        pipeline = build_pipeline(src, hooks, resolve_device(src.device, "source.device"))
    widths = hook_widths(pipeline.harvester)
    writer = CacheWriter(
        cfg.output_dir, widths, cfg.dtype, cfg.shard_tokens, fingerprint(cfg, hooks), cfg.overwrite
    )
    target = cfg.total_tokens or None
    done = initial = writer.rows
    start = time.perf_counter()
    bar = tqdm(
        total=target, initial=done, unit="tok", unit_scale=True, desc="harvest", disable=not cfg.progress
    )
    try:
        if target is None or done < target:
            for acts, tokens, contexts in harvest_rows(pipeline, src.model_batch_size, skip=writer.contexts):
                take = tokens.shape[0] if target is None else min(tokens.shape[0], target - done)
                writer.add({h: a[:take] for h, a in acts.items()}, tokens[:take], contexts)
                done += take
                bar.update(take)
                if target is not None and done >= target:
                    break
        wall = time.perf_counter() - start
        manifest = writer.finish({h: src.metadata(h) for h in hooks} | {"hook_names": hooks}, wall)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if cfg.progress:
        print_summary(manifest, cfg.output_dir, target, done - initial)
    return manifest


def print_summary(manifest: dict[str, Any], output_dir: str, target: int | None, harvested: int) -> None:
    """What was written (rows, shards, speed of this run) and per hook its width and mean norm."""
    from rich.console import Console
    from rich.table import Table

    rows, wall = manifest["total_rows"], manifest["wall_seconds"]
    table = Table(title=f"activation cache {output_dir}")
    for col in ("hook", "d_in", "mean ||x||"):
        table.add_column(col)
    for hook, info in manifest["hooks"].items():
        table.add_row(hook, str(info["d_in"]), f"{info['mean_norm']:.3f}")
    console = Console()
    console.print(table)
    note = "" if target is None or rows >= target else f" (the dataset ended before total_tokens={target})"
    console.print(
        f"{rows:,} tokens per hook in {len(manifest['shard_rows'])} shards from {manifest['contexts']:,} contexts; "
        f"this run: {harvested:,} tokens in {wall:.1f} s, {harvested / max(wall, 1e-9):,.0f} tokens/s{note}"
    )


def verify_cache(output_dir: str) -> dict[str, Any]:
    """`saelab harvest output_dir=... verify=true`: check every shard file of a complete cache against the
    checksums in its manifest (raises naming the first bad file); returns the manifest."""
    cache = ActivationCache(output_dir)
    files = cache.verify()
    print(f"{output_dir}: all {files} shard files match the manifest's checksums.")
    return cache.manifest


def harvest_from_config(node: DictConfig) -> dict[str, Any]:
    """Entry of the `saelab harvest` Hydra app (configs/harvest.yaml)."""
    if node.get("verify"):
        return verify_cache(node.output_dir)
    cfg = OmegaConf.to_object(node)
    if not isinstance(cfg, HarvestRunConfig):
        raise TypeError("configs/harvest.yaml must list harvest_schema in its defaults.")
    if not isinstance(cfg.source, ModelSourceConfig):
        raise ValueError(
            f"`saelab harvest` needs a model source (source=smollm2 or source=model), got {cfg.source}."
        )
    return run_harvest(cfg)

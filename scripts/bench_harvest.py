"""Benchmark the data path on the real SmolLM2-135M (offline assets): live harvesting vs reading the cache.

Measures, in one process:
  1. live harvest tokens/s, warm (TransformerLens backend, and the plain HF backend with forward hooks),
     and the whole `saelab harvest` run writing the cache (dataset opening and warm-up included);
  2. cache read tokens/s (memory-mapped shards, shuffled shard order);
  3. the fraction of SAE training wall time spent waiting for the next batch, training from the live
     model and from the cache (same SAE, same steps).
Ratios are against the live TransformerLens harvest. Prints a table and a JSON line.

    python scripts/fetch_assets.py && python scripts/bench_harvest.py --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from saelab.app.config import HarvestRunConfig
from saelab.app.harvest_job import run_harvest
from saelab.buffer.cache import ActivationCache
from saelab.data.assets import SHAKESPEARE_GLOB, fetch_assets
from saelab.harvest.config import ModelSourceConfig
from saelab.harvest.pipeline import build_pipeline, harvest_rows
from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.sources.harvested import CacheSource, CacheSourceConfig, ModelSource
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer


class TimedSource:
    """Wraps a source; accumulates the seconds spent inside next() of its batch stream."""

    def __init__(self, inner):
        self.inner, self.d_in, self.wait = inner, inner.d_in, 0.0

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[Tensor]:
        stream = iter(self.inner.batches(batch_size, start_batch))
        while True:
            t0 = time.perf_counter()
            x = next(stream)
            self.wait += time.perf_counter() - t0
            yield x


def live_rate(cfg: ModelSourceConfig, hook: str, tokens: int) -> float:
    """Tokens/s of harvest_rows alone: model load, dataset opening and the first (warm-up) batch excluded."""
    pipeline = build_pipeline(cfg, [hook], torch.device("cpu"))
    stream = harvest_rows(pipeline, cfg.model_batch_size)
    next(stream)
    rows, t0 = 0, time.perf_counter()
    for acts, _, _ in stream:
        rows += acts[hook].shape[0]
        if rows >= tokens:
            break
    return rows / (time.perf_counter() - t0)


def train_wait(source, d_in: int, tokens: int, batch_size: int) -> tuple[float, float]:
    """(data-wait fraction, wall seconds) of a TopK SAE training run of `tokens` tokens on `source`."""
    timed = TimedSource(source)
    sae = TopKSAE(TopKConfig(d_in=d_in, d_sae=8 * d_in, k=32))
    trainer = Trainer(sae, TrainerConfig(total_tokens=tokens, batch_size=batch_size, device="cpu"))
    t0 = time.perf_counter()
    trainer.fit(timed)
    wall = time.perf_counter() - t0
    return timed.wait / wall, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per measurement")
    parser.add_argument("--layer", type=int, default=6, help="residual stream after this block")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--model-batch", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=512, help="SAE training batch")
    parser.add_argument("--assets", default="assets")
    parser.add_argument("--json", default=None, help="also write the JSON result here")
    args = parser.parse_args()
    torch.manual_seed(0)
    fetch_assets(args.assets)
    hook = f"blocks.{args.layer}.hook_resid_post"
    cfg = ModelSourceConfig(
        hook_name=hook, assets_dir=args.assets, dataset=str(Path(args.assets) / SHAKESPEARE_GLOB),
        context_size=args.context_size, model_batch_size=args.model_batch, buffer_tokens=4 * args.batch_size,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-harvest-") as tmp:
        cache_dir = Path(tmp) / "cache"
        harvest = HarvestRunConfig(
            source=cfg, output_dir=str(cache_dir), total_tokens=args.tokens, progress=False
        )
        t0 = time.perf_counter()
        manifest = run_harvest(harvest)
        harvest_wall = time.perf_counter() - t0
        harvest_rate = manifest["total_rows"] / manifest["wall_seconds"]  # incl. warm-up and shard writes
        live_tl = live_rate(cfg, hook, args.tokens)
        live_hf = live_rate(replace(cfg, backend="hf"), f"model.layers.{args.layer}", args.tokens)

        cache = ActivationCache(cache_dir)
        stream = cache.batches(hook, args.batch_size)
        t0 = time.perf_counter()
        for _ in range(args.tokens // args.batch_size):
            next(stream)
        cache_rate = (args.tokens // args.batch_size) * args.batch_size / (time.perf_counter() - t0)

        d_in = cache.d_in(hook)
        live_source = ModelSource(cfg, torch.device("cpu"))
        wait_live, wall_live = train_wait(live_source, d_in, args.tokens, args.batch_size)
        cache_source = CacheSource(CacheSourceConfig(path=str(cache_dir)))
        wait_cache, wall_cache = train_wait(cache_source, d_in, args.tokens, args.batch_size)

    result = {
        "model": "SmolLM2-135M-Instruct",
        "hook": hook,
        "tokens": args.tokens,
        "context_size": args.context_size,
        "model_batch": args.model_batch,
        "sae_batch": args.batch_size,
        "threads": torch.get_num_threads(),
        "live_tl_tokens_per_s": live_tl,
        "live_hf_tokens_per_s": live_hf,
        "cache_read_tokens_per_s": cache_rate,
        "cache_vs_live_speedup": cache_rate / live_tl,
        "harvest_command_tokens_per_s": harvest_rate,
        "harvest_command_wall_s": harvest_wall,
        "train_wait_frac_live": wait_live,
        "train_wait_frac_cache": wait_cache,
        "train_wall_s_live": wall_live,
        "train_wall_s_cache": wall_cache,
        "train_speedup_cache_vs_live": wall_live / wall_cache,
    }
    table = Table(
        title=f"data path, SmolLM2-135M {hook}, {args.tokens} tokens, CPU threads={result['threads']}"
    )
    table.add_column("path")
    table.add_column("tokens/s", justify="right")
    table.add_column("vs live TL", justify="right")
    table.add_column("train wait frac", justify="right")
    table.add_row("live harvest, TransformerLens (warm)", f"{live_tl:,.0f}", "1.00x", f"{wait_live:.1%}")
    table.add_row("live harvest, HF forward hooks (warm)", f"{live_hf:,.0f}", f"{live_hf / live_tl:.2f}x", "")
    table.add_row(
        "`saelab harvest` to cache (whole run)", f"{harvest_rate:,.0f}", f"{harvest_rate / live_tl:.2f}x", ""
    )
    table.add_row(
        "cache read (mmap, shuffled shards)",
        f"{cache_rate:,.0f}",
        f"{cache_rate / live_tl:,.0f}x",
        f"{wait_cache:.1%}",
    )
    Console().print(table)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""saelab's default TopK next to sparsify's default on a real model's activations, judged by the language model.

Given a `saelab harvest` cache (one hook of a language model), for each expansion factor this trains, on
the same batches in the same order and for the same tokens:

- saelab: `TopKSAE` + `Trainer` with only total_tokens and batch_size set (default lr, schedule, input
  normalisation, AuxK and dead window), driven step by step as `Trainer.fit` does (including the dead-latent
  refresh every `dead_check_every` steps, `Trainer.periodic_checks`); saved in saelab's format with the input scale folded in;
- sparsify: `SparseCoder` with its trainer's defaults (signum in schedule-free, momentum 0.95, lr
  5e-3 / sqrt(latents / 2^14), no AuxK, b_dec = mean of the first batch, unit-norm decoder with the parallel
  gradient removed, raw activations), finished at the schedule-free average (`optimizer.eval()`), saved with
  `save_to_disk` in sparsify's own format.

Both folders are then loaded with `saelab.io.loading.load_sae` (sparsify's through saelab's sparsify
reader) and evaluated by the same code on text the harvest never read (the contexts after the cache's):

- `saelab.eval.evaluate` with the live model: CE loss recovered, CE increase, KL(clean || spliced), FVU, L0, dead
  fraction (latents silent on all `--eval-tokens` tokens) with the SAE spliced in at the hook;
- `--dead-tokens` more held-out activation rows of the hook (no LM passes): FVU and dead fraction there,
  since on a few thousand tokens a rare but live latent of a wide SAE looks dead.

Seeds: the cache's reading order comes from `--data-seed`; each library's initialisation from its own
stream of `--init-seed` (`saelab.core.seeds.derive_seed`), never the data seed.

`--libs` picks the libraries; `--variant NAME:field=value,...` adds saelab runs with TrainerConfig / TopKConfig
fields, `lr_mult` or `init` changed (`benchutil.parse_variant`), from the same initialisation as saelab's
default run (ablations).

    saelab harvest source=smollm2 output_dir=caches/smol total_tokens=1048576
    python scripts/bench_real.py caches/smol --out runs/bench_real --threads 2 --json real.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import benchutil
import torch
from torch import Tensor

from saelab.buffer.cache import ActivationCache
from saelab.core.atomic import atomic_directory
from saelab.core.seeds import derive_seed, generator
from saelab.eval.config import EvalConfig
from saelab.eval.evaluate import evaluate
from saelab.harvest.config import ModelSourceConfig
from saelab.harvest.pipeline import harvest_rows
from saelab.io.loading import load_sae
from saelab.metrics.codes import decode_codes, encode_codes
from saelab.metrics.dead import DeadLatentTracker
from saelab.metrics.reconstruction import ReconstructionStats
from saelab.sae.base import SAE
from saelab.sae.topk import TopKConfig
from saelab.sources.harvested import CacheSource, CacheSourceConfig, ModelSource


@dataclass(frozen=True)
class Shape:
    """One SAE shape trained by every library: d_in, latents, k, batch rows and steps."""

    d_in: int
    latents: int
    k: int
    batch: int
    steps: int

    @property
    def tokens(self) -> int:
        return self.batch * self.steps


class SaelabRun:
    """saelab's default TopK training (with a variant's `overrides`, `benchutil.parse_variant`), one
    `step(x [batch, d_in])` at a time as `Trainer.fit` runs it."""

    def __init__(
        self, shape: Shape, first: Tensor, seed: int, device: torch.device, overrides: dict[str, Any]
    ) -> None:
        topk = TopKConfig(d_in=shape.d_in, d_sae=shape.latents, k=shape.k)
        self.trainer = benchutil.saelab_topk_trainer(
            topk, shape.tokens, shape.batch, device, overrides, first, generator(seed, "sae.init")
        )
        self.lr = self.trainer.lr
        self.own_dead: float | None = None

    def step(self, x: Tensor) -> None:
        self.trainer.train_step(x)
        self.trainer.periodic_checks()

    def save(self, folder: Path) -> None:
        """Write the trained SAE (input scale folded in) in saelab's format; records its own dead report."""
        self.own_dead = self.trainer.tracker.dead_fraction()
        self.trainer.inference_sae().save(folder)


class SparsifyRun:
    """sparsify at its trainer's defaults (`benchutil.SparsifyDefaults`), initialised from `seed`; `overrides`
    is always empty (variants are saelab's)."""

    def __init__(
        self, shape: Shape, first: Tensor, seed: int, device: torch.device, overrides: dict[str, Any]
    ) -> None:
        torch.manual_seed(seed)  # SparseCoder draws its init from torch's global generator
        self.run = benchutil.SparsifyDefaults(shape.d_in, shape.k, shape.latents, first, device)
        self.lr = self.run.lr
        self.own_dead: float | None = None

    def step(self, x: Tensor) -> None:
        self.run.step(x)

    def save(self, folder: Path) -> None:
        """Switch to the schedule-free average and write sparsify's format, as its trainer's checkpoint does
        (no decoder renormalisation after the switch)."""
        self.run.average()
        with atomic_directory(folder) as tmp:
            self.run.sae.save_to_disk(tmp)


RUNNERS = {"saelab": SaelabRun, "sparsify": SparsifyRun}


def train_shape(
    shape: Shape,
    runs_wanted: dict[str, tuple[str, dict[str, Any]]],
    cache: CacheSource,
    out: Path,
    expansion: int,
    init_seed: int,
    device: torch.device,
    progress: int = 0,
) -> dict[str, dict[str, Any]]:
    """Train every run of `runs_wanted` (name -> (library, overrides)) on the same `shape.steps` cache batches
    (each run steps on batch i in turn); save them under out/x{expansion}/{name}; returns lr, own dead report
    and training seconds per run. A library's variants share its initialisation seed."""
    batches = cache.batches(shape.batch, start_batch=0)
    first = next(batches)
    runs = {
        name: RUNNERS[library](
            shape, first, derive_seed(init_seed, f"bench_real.{library}", expansion), device, overrides
        )
        for name, (library, overrides) in runs_wanted.items()
    }
    seconds = dict.fromkeys(runs, 0.0)
    x = first.to(device)
    for step in range(shape.steps):
        for name, run in runs.items():
            start = time.perf_counter()
            run.step(x)
            benchutil.sync(device)
            seconds[name] += time.perf_counter() - start
        if progress and (step + 1) % progress == 0:
            print(
                f"  x{expansion} step {step + 1}/{shape.steps}",
                {k: round(v) for k, v in seconds.items()},
                file=sys.stderr,
                flush=True,
            )
        if step + 1 < shape.steps:
            x = next(batches).to(device)
    results = {}
    for name, run in runs.items():
        run.save(out / f"x{expansion}" / name)
        results[name] = {"lr": run.lr, "own_dead": run.own_dead, "train_s": seconds[name]}
    return results


def model_source_of(cache: ActivationCache, hook: str, device: torch.device) -> ModelSource:
    """The live model source the cache was harvested from (model, dataset, contexts as in its manifest)."""
    recorded = cache.manifest.get("config", {})
    names = {f.name for f in fields(ModelSourceConfig)} - {"hook_name", "device", "buffer_device"}
    values = {k.removeprefix("source."): v for k, v in recorded.items() if k.startswith("source.")}
    cfg = ModelSourceConfig(**{k: v for k, v in values.items() if k in names}, hook_name=hook)
    return ModelSource(cfg, device)


def heldout_start_batch(cache: ActivationCache, lm_batch_size: int) -> int:
    """First LM batch (of lm_batch_size contexts) after every context the harvest read."""
    contexts = cache.manifest.get("contexts")
    if not isinstance(contexts, int) or contexts <= 0:
        raise ValueError(f"{cache.root}/manifest.json records no 'contexts'; re-harvest with this saelab.")
    return math.ceil(contexts / lm_batch_size)


def heldout_rows(source: ModelSource, skip_contexts: int, rows: int) -> Tensor:
    """The hook's activations [rows, d_in] on the contexts after the first `skip_contexts` (non-special tokens)."""
    taken: list[Tensor] = []
    have = 0
    for acts, _, _ in harvest_rows(source.pipeline, source.cfg.model_batch_size, skip=skip_contexts):
        taken.append(acts[source.cfg.hook_name].cpu())
        have += taken[-1].shape[0]
        if have >= rows:
            return torch.cat(taken)[:rows]
    raise ValueError(
        f"the dataset holds only {have} tokens after the harvested contexts; lower --dead-tokens."
    )


def heldout_evaluation(
    cache: ActivationCache,
    hook: str,
    lm_batch_size: int,
    eval_tokens: int,
    dead_tokens: int,
    device: torch.device,
) -> tuple[ModelSource, EvalConfig, Tensor | None]:
    """What every saved SAE is judged on: the cache's live model source, the EvalConfig splicing an SAE into it on
    `eval_tokens` tokens of the text after the cache's (its start_batch: `heldout_start_batch`), and `dead_tokens`
    held-out activation rows from there (None for 0)."""
    source = model_source_of(cache, hook, device)
    start = heldout_start_batch(cache, lm_batch_size)
    eval_cfg = EvalConfig(
        total_tokens=eval_tokens,
        lm_batch_size=lm_batch_size,
        start_batch=start,
        cooccurrence_latents=0,
        plots=False,
    )
    rows = heldout_rows(source, start * lm_batch_size, dead_tokens) if dead_tokens else None
    return source, eval_cfg, rows


@torch.no_grad()
def activation_metrics(sae: SAE, rows: Tensor, batch: int) -> dict[str, float]:
    """FVU and dead fraction (silent on every row) of `sae` on held-out rows [N, d_in]."""
    recon = ReconstructionStats()
    tracker = DeadLatentTracker(sae.d_sae, rows.shape[0], sae.W_dec.device)
    for x in rows.split(batch):
        x = x.to(sae.W_dec.device, sae.W_dec.dtype)
        codes = encode_codes(sae, x)
        recon.update(x, decode_codes(sae, codes), codes)
        tracker.update_codes(codes)
    return {"fvu": recon.compute()["fvu"], "dead_frac": tracker.dead_fraction()}


def evaluate_saved(
    folder: Path, source: ModelSource, eval_cfg: EvalConfig, rows: Tensor | None, device: torch.device
) -> dict[str, Any]:
    """Load `folder` with saelab's loader and evaluate it spliced into the model (and on `rows`, if given)."""
    sae = load_sae(folder, device=device)
    report = evaluate(sae, source, eval_cfg).report
    if report["tokens"] != eval_cfg.total_tokens:
        raise ValueError(
            f"only {report['tokens']} held-out tokens were left after the harvested contexts; lower "
            "--eval-tokens or harvest fewer tokens."
        )
    lm, recon = report["lm"], report["reconstruction"]
    result = {
        "ce_loss_score": lm["ce_loss_score"],
        "ce_increase": lm["ce_degradation"],
        "kl_div": lm["kl_div"],
        "ce_clean": lm["ce_clean"],
        "ce_sae": lm["ce_sae"],
        "ce_zero": lm["ce_zero"],
        "predictions": lm["predictions"],
        "fvu": recon["fvu"],
        "l0": recon["l0"],
        "dead_eval": report["dead"]["dead_frac"],
        "eval_tokens": report["tokens"],
    }
    if rows is not None:
        wide = activation_metrics(sae, rows, eval_cfg.batch_size)
        result.update(fvu_wide=wide["fvu"], dead_wide=wide["dead_frac"])
    return result


def table(results: dict[int, dict[str, dict[str, Any]]], dead_tokens: int) -> str:
    """Markdown table: one row per (expansion, library)."""
    wide = f" | FVU ({dead_tokens:,} tok) | dead ({dead_tokens:,} tok)" if dead_tokens else ""
    lines = [
        "| expansion (latents) | library | lr | CE loss recovered | CE increase | KL | FVU | L0 "
        f"| dead (eval tokens){wide} | dead (own report) | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if dead_tokens else "") + "---:|---:|",
    ]
    for expansion, runs in results.items():
        for name, r in runs.items():
            extra = f" | {r['fvu_wide']:.3f} | {100 * r['dead_wide']:.1f}%" if dead_tokens else ""
            own = "-" if r["own_dead"] is None else f"{100 * r['own_dead']:.1f}%"
            lines.append(
                f"| {expansion}x ({r['latents']}) | {name} | {r['lr']:.2e} | {r['ce_loss_score']:.3f} | "
                f"{r['ce_increase']:.3f} | {r['kl_div']:.3f} | {r['fvu']:.3f} | {r['l0']:.1f} | "
                f"{100 * r['dead_eval']:.1f}%{extra} | "
                f"{own} | {r['train_s']:.0f} |"
            )
    return "\n".join(lines)


def batches_of(args: argparse.Namespace, total_rows: int) -> int:
    """Training steps: --tokens (0: the whole cache once) in whole batches."""
    tokens = args.tokens or total_rows
    steps = tokens // args.batch
    if steps < 1:
        raise SystemExit(f"--tokens={tokens} holds no batch of --batch={args.batch} rows.")
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", help="a `saelab harvest` output folder")
    p.add_argument(
        "--out", required=True, help="folder for the trained SAEs (out/x8/saelab, out/x8/sparsify, ...)"
    )
    p.add_argument("--hook", default="", help="hook in the cache ('' when it holds one)")
    p.add_argument("--expansions", type=int, nargs="+", default=[8, 32])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=0, help="training tokens per SAE (0: the whole cache once)")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--lm-batch-size", type=int, default=8)
    p.add_argument(
        "--dead-tokens", type=int, default=65536, help="held-out rows for FVU/dead without LM (0: off)"
    )
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--init-seed", type=int, default=1)
    p.add_argument("--libs", nargs="*", default=["saelab", "sparsify"], choices=sorted(RUNNERS))
    p.add_argument("--variant", nargs="*", default=[], help="extra saelab runs: NAME:field=value,...")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--progress", type=int, default=0, help="print training seconds every this many steps")
    p.add_argument("--json")
    args = p.parse_args()
    device = benchutil.setup_peer_device(args.device, args.threads)
    cache_src = CacheSource(CacheSourceConfig(path=args.cache, hook_name=args.hook, seed=args.data_seed))
    d_in, steps = cache_src.d_in, batches_of(args, cache_src.cache.total_rows)
    out = Path(args.out)
    runs_wanted = {name: (name, {}) for name in args.libs}
    for text in args.variant:
        name, overrides = benchutil.parse_variant(text)
        runs_wanted[f"saelab[{name}]"] = ("saelab", overrides)
    trained: dict[int, dict[str, dict[str, Any]]] = {}
    for expansion in args.expansions:
        shape = Shape(d_in, expansion * d_in, args.k, args.batch, steps)
        print(f"training x{expansion}: {shape}", file=sys.stderr, flush=True)
        trained[expansion] = train_shape(
            shape, runs_wanted, cache_src, out, expansion, args.init_seed, device, args.progress
        )
        for r in trained[expansion].values():
            r["latents"] = shape.latents

    source, eval_cfg, rows = heldout_evaluation(
        cache_src.cache, cache_src.hook_name, args.lm_batch_size, args.eval_tokens, args.dead_tokens, device
    )
    start = eval_cfg.start_batch
    for expansion, runs in trained.items():
        for name, r in runs.items():
            print(f"evaluating {expansion}x {name}", file=sys.stderr, flush=True)
            r.update(evaluate_saved(out / f"x{expansion}" / name, source, eval_cfg, rows, device))
    print(
        f"\n{d_in=}, k={args.k}, batch {args.batch}, {steps * args.batch:,} training tokens per SAE; "
        f"held-out from context {start * args.lm_batch_size}"
    )
    print(table(trained, args.dead_tokens))
    benchutil.write_report(
        args.json,
        "bench_real",
        device,
        variants=runs_wanted,
        cache=str(args.cache),
        manifest_contexts=cache_src.cache.manifest.get("contexts"),
        training_tokens=steps * args.batch,
        heldout_start_context=start * args.lm_batch_size,
        results=trained,
    )


if __name__ == "__main__":
    main()

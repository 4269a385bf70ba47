"""Every SAE variant at its defaults, at matched L0: planted-feature recovery, and FVU / CE loss on a real model.

Planted data sets (`saelab.sources.synthetic`):
  uniform       d_in 64, 512 features, power-law frequencies, 5 active per row, uniform magnitudes
  hierarchical  d_in 64, 100 parents with 4 mutually exclusive children each (500 features), 4 parents
                per row, an active parent switches on one child with probability 0.75
  gba_toy       the GBA paper's toy: d_in 42, 128 features, half the rows 3-sparse and half 20-sparse,
                exponential magnitudes (`saelab.sources.synthetic.gba_toy_config`)

Each variant trains with the Trainer's and its config's defaults (lr=None: the variant's default rate) plus, on
planted data, the `sae` settings of its planted-data recipe (`configs/recipe/<variant>_synthetic.yaml`, which
`saelab train sae=<variant>` applies there), for the same steps and batch size, with one setting matched across
variants: the L0 (`--l0`, per data set), which is k for the k-sparse variants (topk, batchtopk, matryoshka, mp)
and target_l0 for the target-L0 variants (relu, jumprelu, gated); gba sets its own L0. A variant whose config has
neither (an older saelab: the "before" rows) runs at its defaults and recipe.
Metrics on held-out rows, all of the trained SAE's inference encoder (BatchTopK / Matryoshka: their threshold):
L0, FVU, dead fraction (latents that never fire on the held-out rows); MMCS and the fraction of planted features
recovered at cosine >= 0.9 (hierarchical: also parents and children apart); training samples/s.

`--set FIELD=VALUE ...` and `--lr-mult` change the planted runs' SAE settings (after the recipe and the matched L0)
and learning rate: the tuning runs of BENCHMARKS.md, on seeds the reported runs do not use. `--start-at-planted`
starts each SAE at the planted dictionary (`plant_dictionary`), to see whether its objective keeps it.

`--real CACHE` instead trains each variant on a `saelab harvest` cache (one hook of a language model) at
`--real-l0`, saves it, and judges it as `scripts/bench_real.py` does: CE loss recovered, KL and FVU with the SAE
spliced into the live model on text after the cache, FVU and dead fraction on `--dead-tokens` more rows.

    python scripts/bench_recovery.py --steps 3000 --batch-size 512 --seed 3 --json recovery.json
    python scripts/bench_recovery.py --variants relu --l0 8 --seed 11 --planted-seed 11 --set l1_warmup_frac=0.05
    python scripts/bench_recovery.py --real caches/smol --hook blocks.6.hook_resid_post --out runs/rec --json real.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch import Tensor

import saelab
from saelab.core.atomic import atomic_file
from saelab.core.seeds import generator
from saelab.sae.mp import MatchingPursuitSAE, MPConfig
from saelab.sae.registry import get_sae_class, variant_classes
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource, gba_toy_config, recovery_metrics
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

HELD_OUT = 10**7  # batch indices from here on are never trained on

#: name -> (data set, SAE width, matched L0 values)
DATASETS: dict[str, tuple[SyntheticConfig, int, tuple[int, ...]]] = {
    "uniform": (SyntheticConfig(), 1024, (8, 16)),
    "hierarchical": (SyntheticConfig(structure="hierarchical", n_features=500, mean_active=4.0), 1024, (8,)),
    "gba_toy": (gba_toy_config(), 512, (20,)),
}
#: Variants whose config has neither k nor target_l0 set their own L0: trained once per data set.
DEFAULT_VARIANTS = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu", "gated")


def config_fields(arch: str) -> set[str]:
    return {f.name for f in dataclasses.fields(get_sae_class(arch).config_class)}


def sparsity_setting(arch: str, l0: int) -> dict[str, Any]:
    """The field that sets the variant's L0 to `l0`: k, target_l0, or none (the variant sets its own)."""
    names = config_fields(arch)
    if "k" in names:
        return {"k": l0}
    if "target_l0" in names:
        return {"target_l0": float(l0)}
    return {}


def held_out_metrics(sae: Any, source: SyntheticSource, rows: int, batch_size: int) -> dict[str, float]:
    """L0, FVU (float64 sums), dead fraction over `rows` held-out rows; MMCS and recovery of the decoder."""
    err = total = l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    batches = [source.batch(HELD_OUT + i, batch_size) for i in range(max(rows // batch_size, 1))]
    mean = torch.cat(batches).double().mean(dim=0)
    with torch.no_grad():
        for x in batches:
            z = sae.encode(x)
            x_hat = sae.decode(z)
            err += (x - x_hat).double().pow(2).sum().item()
            total += (x.double() - mean).pow(2).sum().item()
            active = z != 0
            l0 += active.sum().item()
            fired |= active.any(dim=0)
    n_rows = sum(x.shape[0] for x in batches)
    return {
        "l0": l0 / n_rows,
        "fvu": err / total,
        "dead_frac": 1.0 - fired.double().mean().item(),
        **recovery_metrics(source.features, sae.W_dec.detach()),
    }


def planted_recipe(arch: str, l0: int) -> dict[str, Any]:
    """The `sae` settings of the variant's planted-data recipe but its L0 (matched here; kept for a variant that
    sets its own) and fields the config lacks; {} without a recipe."""
    path = Path(saelab.__file__).parent / "configs" / "recipe" / f"{arch}_synthetic.yaml"
    if not path.exists():
        return {}
    settings = OmegaConf.to_container(OmegaConf.load(path)).get("sae", {})
    matched = set(sparsity_setting(arch, l0))
    return {k: v for k, v in settings.items() if k in config_fields(arch) and k not in matched}


def build(
    arch: str, d_in: int, width: int, l0: int, seed: int, planted: bool = True, overrides: dict | None = None
) -> Any:
    """The variant at its defaults, its planted recipe (when `planted`), the matched L0 and then `overrides`."""
    cls = get_sae_class(arch)
    fields = {
        **(planted_recipe(arch, l0) if planted else {}),
        **sparsity_setting(arch, l0),
        **(overrides or {}),
    }
    return cls(cls.config_class(d_in=d_in, d_sae=width, **fields), generator(seed, "sae.init"))


@torch.no_grad()
def plant_dictionary(sae: Any, features: Tensor) -> None:
    """Start the SAE at the answer: its first F decoder rows and encoder columns take the planted directions
    features [F, d_in], each keeping its initial norm; the other latents stay as initialised. A diagnostic: training
    from there shows whether the variant's objective keeps the planted dictionary or leaves it (absorption)."""
    n_features = features.shape[0]
    if n_features > sae.d_sae:
        raise SystemExit(
            f"--start-at-planted needs d_sae >= the {n_features} planted features (d_sae={sae.d_sae})."
        )
    directions = features.to(sae.W_dec.dtype)
    sae.W_dec[:n_features] = directions * sae.W_dec[:n_features].norm(dim=1, keepdim=True)
    sae.W_enc[:, :n_features] = directions.T * sae.W_enc[:, :n_features].norm(dim=0, keepdim=True)


def run_one(
    dataset: str,
    arch: str,
    l0: int,
    steps: int,
    batch_size: int,
    eval_rows: int,
    seed: int,
    data_seed: int | None,
    overrides: dict[str, Any] | None = None,
    lr_mult: float = 1.0,
    start_at_planted: bool = False,
) -> dict[str, Any]:
    data_cfg, width, _ = DATASETS[dataset]
    if data_seed is not None:
        data_cfg = dataclasses.replace(data_cfg, seed=data_seed)
    source = SyntheticSource(data_cfg)
    sae = build(arch, data_cfg.d_in, width, l0, seed, overrides=overrides)
    if start_at_planted:
        plant_dictionary(sae, source.features)
    lr = None if lr_mult == 1.0 else lr_mult * sae.default_lr(batch_size)
    trainer = Trainer(
        sae,
        TrainerConfig(
            total_tokens=steps * batch_size,
            batch_size=batch_size,
            device="cpu",
            log_every=steps,
            seed=seed,
            lr=lr,
        ),
    )
    start = time.perf_counter()
    result = trainer.fit(source)
    seconds = time.perf_counter() - start
    metrics = held_out_metrics(result.sae, source, eval_rows, batch_size)
    if data_cfg.structure == "hierarchical":  # parents and children separately
        n_parents, decoder = data_cfg.n_parents, result.sae.W_dec.detach()
        metrics["frac_recovered_parents"] = recovery_metrics(source.features[:n_parents], decoder)[
            "frac_recovered"
        ]
        metrics["frac_recovered_children"] = recovery_metrics(source.features[n_parents:], decoder)[
            "frac_recovered"
        ]
    return {
        "dataset": dataset,
        "variant": arch,
        "matched_l0": l0 if sparsity_setting(arch, l0).keys() - (overrides or {}).keys() else None,
        "setting": {**planted_recipe(arch, l0), **sparsity_setting(arch, l0), **(overrides or {})},
        "start": "planted dictionary" if start_at_planted else "init",
        "lr": trainer.lr,
        **metrics,
        "summary_dead_frac": result.dead_fraction,
        "samples_per_s": result.tokens / seconds,
    }


def planted(args: argparse.Namespace) -> list[dict[str, Any]]:
    # --set's FIELD=VALUE items, e.g. l1_warmup_frac=0.3 target_l0=null (YAML values: null is None)
    overrides = OmegaConf.to_container(OmegaConf.from_dotlist(args.set))
    rows = []
    for dataset in args.datasets:
        levels = args.l0 or DATASETS[dataset][2]
        for arch in args.variants:
            for l0 in levels if sparsity_setting(arch, 1) else levels[:1]:
                rows.append(
                    run_one(
                        dataset,
                        arch,
                        l0,
                        args.steps,
                        args.batch_size,
                        args.eval_rows,
                        args.seed,
                        args.planted_seed,
                        overrides,
                        args.lr_mult,
                        args.start_at_planted,
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def planted_table(rows: list[dict[str, Any]], steps: int, batch_size: int) -> Table:
    table = Table(title=f"feature recovery: {steps} steps x {batch_size} rows, each variant at its defaults")
    for col in (
        "data set",
        "variant",
        "matched L0",
        "L0",
        "FVU",
        "MMCS",
        "recovered @0.9",
        "dead",
        "samples/s",
    ):
        table.add_column(col, justify="left" if col in ("data set", "variant") else "right")
    for r in rows:
        recovered = f"{r['frac_recovered']:.1%}"
        if "frac_recovered_parents" in r:
            recovered += f" ({r['frac_recovered_parents']:.0%}, {r['frac_recovered_children']:.1%})"
        table.add_row(
            r["dataset"],
            r["variant"],
            str(r["matched_l0"] or "-"),
            f"{r['l0']:.1f}",
            f"{r['fvu']:.3f}",
            f"{r['mmcs']:.3f}",
            recovered,
            f"{r['dead_frac']:.1%}",
            f"{r['samples_per_s']:,.0f}",
        )
    return table


def real(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each variant trained on the cache at --real-l0 (same batches, same tokens), saved, then evaluated spliced
    into the live model (bench_real's evaluation)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_real

    from saelab.sources.harvested import CacheSource, CacheSourceConfig

    cache = CacheSource(CacheSourceConfig(path=args.real, hook_name=args.hook, seed=args.data_seed))
    out = Path(args.out)
    rows = []
    for arch in args.variants:
        sae = build(arch, cache.d_in, args.expansion * cache.d_in, args.real_l0, args.seed, planted=False)
        cfg = TrainerConfig(
            total_tokens=args.tokens,
            batch_size=args.batch_size,
            device="cpu",
            log_every=10**9,
            seed=args.seed,
        )
        trainer = Trainer(sae, cfg, output_dir=out / arch)
        start = time.perf_counter()
        result = trainer.fit(cache)
        rows.append(
            {
                "variant": arch,
                "matched_l0": args.real_l0 if sparsity_setting(arch, 1) else None,
                "lr": trainer.lr,
                "summary_dead_frac": result.dead_fraction,
                "train_s": time.perf_counter() - start,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    source, eval_cfg, held = bench_real.heldout_evaluation(
        cache.cache,
        cache.hook_name,
        args.lm_batch_size,
        args.eval_tokens,
        args.dead_tokens,
        torch.device("cpu"),
    )
    for row in rows:
        print(f"evaluating {row['variant']}", file=sys.stderr, flush=True)
        row.update(
            bench_real.evaluate_saved(
                out / row["variant"] / "sae", source, eval_cfg, held, torch.device("cpu")
            )
        )
        print(json.dumps(row), flush=True)
    return rows


def real_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> Table:
    table = Table(
        title=f"{args.real} ({args.hook or 'its hook'}): {args.expansion}x, {args.tokens:,} tokens, at its defaults"
    )
    for col in ("variant", "matched L0", "L0", "CE loss recovered", "KL", "FVU", f"FVU ({args.dead_tokens:,} rows)",
                f"dead ({args.dead_tokens:,} rows)"):  # fmt: skip
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        table.add_row(
            r["variant"],
            str(r["matched_l0"] or "-"),
            f"{r['l0']:.1f}",
            f"{r['ce_loss_score']:.3f}",
            f"{r['kl_div']:.3f}",
            f"{r['fvu']:.3f}",
            f"{r['fvu_wide']:.3f}",
            f"{r['dead_wide']:.1%}",
        )
    return table


def time_pursuit(width: int, d_in: int, k: int, batch: int, rounds: int) -> dict[str, float]:
    """Median seconds of one MP pursuit forward + backward, Gram selection vs recomputed correlations."""
    x = torch.randn(batch, d_in)
    saes = {
        mode: MatchingPursuitSAE(MPConfig(d_in=d_in, d_sae=width, k=k, gram=mode))
        for mode in ("always", "never")
    }
    saes["never"].load_state_dict(saes["always"].state_dict())
    times: dict[str, list[float]] = {mode: [] for mode in saes}
    for _ in range(rounds):  # interleaved rounds, so load changes hit both alike
        for mode, sae in saes.items():
            start = time.perf_counter()
            _, _, residual = sae.pursuit(x)
            residual.pow(2).sum().backward()
            times[mode].append(time.perf_counter() - start)
            sae.zero_grad(set_to_none=True)
    gram, plain = (sorted(times[m])[rounds // 2] for m in ("always", "never"))
    return {
        "width": width,
        "d_in": d_in,
        "k": k,
        "batch": batch,
        "gram_s": gram,
        "recompute_s": plain,
        "speedup": plain / gram,
    }


def pursuit_table(speed: list[dict[str, float]]) -> Table:
    table = Table(title="MP pursuit, forward + backward (median of 3 interleaved rounds, same process)")
    for col in ("n", "d_in", "k", "batch", "Gram (ms)", "recompute (ms)", "Gram speedup"):
        table.add_column(col, justify="right")
    for s in speed:
        table.add_row(
            str(s["width"]),
            str(s["d_in"]),
            str(s["k"]),
            str(s["batch"]),
            f"{1e3 * s['gram_s']:.1f}",
            f"{1e3 * s['recompute_s']:.1f}",
            f"{s['speedup']:.2f}x",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--eval-rows", type=int, default=16384)
    parser.add_argument("--datasets", nargs="+", default=["uniform", "hierarchical"], choices=list(DATASETS))
    trainable = sorted(cls.architecture for cls in variant_classes() if cls.trainable)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=trainable)
    parser.add_argument(
        "--l0", type=int, nargs="+", default=[], help="matched L0 values (default: per data set)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the SAE initialisation stream")
    parser.add_argument(
        "--planted-seed", type=int, default=None, help="the planted features' seed (default: the data set's)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: runs stay comparable)")
    parser.add_argument(
        "--real", default="", help="a `saelab harvest` cache: train and judge on a real model"
    )
    parser.add_argument("--hook", default="", help="--real: the hook ('' when the cache holds one)")
    parser.add_argument("--out", default="runs/bench_recovery", help="--real: folder for the trained SAEs")
    parser.add_argument("--real-l0", type=int, default=32, help="--real: the matched L0")
    parser.add_argument("--expansion", type=int, default=8, help="--real: SAE width / d_in")
    parser.add_argument("--tokens", type=int, default=409600, help="--real: training tokens per SAE")
    parser.add_argument("--data-seed", type=int, default=0, help="--real: the cache's reading order")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="--real: tokens spliced into the model")
    parser.add_argument("--lm-batch-size", type=int, default=8)
    parser.add_argument("--dead-tokens", type=int, default=32768, help="--real: held-out rows for FVU / dead")
    parser.add_argument("--no-pursuit", action="store_true", help="skip the MP pursuit timing table")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="planted runs: SAE config FIELD=VALUE on top of the defaults (tuning)",
    )
    parser.add_argument(
        "--lr-mult", type=float, default=1.0, help="planted runs: a factor on the default rate"
    )
    parser.add_argument(
        "--start-at-planted",
        action="store_true",
        help="planted runs: start from the planted dictionary (does the objective keep it?)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    speed: list[dict[str, float]] = []
    if args.real:
        rows = real(args)
        console.print(real_table(rows, args))
    else:
        rows = planted(args)
        console.print(planted_table(rows, args.steps, args.batch_size))
        if not args.no_pursuit:
            speed = [time_pursuit(n, d, 16, 1024, rounds=3) for n, d in ((512, 64), (2048, 256), (4096, 768))]
            console.print(pursuit_table(speed))
    out = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "planted_seed": args.planted_seed,
        "threads": args.threads,
        "results": rows,
        "mp_pursuit": speed,
    }
    print(json.dumps(out))
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

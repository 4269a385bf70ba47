"""Sweep a variant's settings on planted-feature data; print a table and JSON. How the defaults were chosen.

Each row trains one SAE from the same init on the same batches and reports, on held-out rows, the FVU, L0 and
dead fraction of the trained SAE's inference encoder (BatchTopK: its threshold), MMCS and the fraction of
planted features recovered at cosine >= 0.9, plus the final sparsity coefficient of target-L0 variants and the
logged training L0 over the run (to see a controller settle). Any registered variant; `--grid field=v1,v2` sweeps
SAE config fields (several --grid options give their product), `--set field=value` fixes others
(`--set target_l0=null` for None). Data and init streams come from --data-seed / --init-seed: tune on seeds and
shapes you do not report (BENCHMARKS.md, "Tuning log").

    python scripts/tune_defaults.py --variant topk --d-in 64 --k 8 16 32 --lr-mult 0.5 1 2 --tokens 2e6
    python scripts/tune_defaults.py --variant relu --d-in 64 --l1 1 2 5 --set target_l0=null --tokens 2e6
    python scripts/tune_defaults.py --variant jumprelu --d-in 32 --grid target_l0=6,12 --data-seed 11
    python scripts/tune_defaults.py --variant batchtopk --grid topk_warmup_frac=0,0.8 --k 6 --d-in 32
    python scripts/tune_defaults.py --oracle --k 5 8 16 32      # FVU floor of a TopK encoder given the truth
    python scripts/tune_defaults.py --variant jumprelu --cache caches/smol --hook blocks.3.hook_resid_post \
        --expansion 8 --grid target_l0=32 --tokens 3e5 --batch 1024      # a real model's activations (no recovery)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from typing import Any

import torch

from saelab.core.seeds import generator
from saelab.sae.registry import get_sae_class
from saelab.sources.harvested import CacheSource, CacheSourceConfig
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource, recovery_metrics
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

HELD_OUT = 10**6  # batch indices from here on are never trained on


def parse_value(text: str) -> Any:
    """A command-line value: null/none -> None, true/false, int, float, a list of those separated by ';'
    (e.g. group_fractions=0.25;0.75), else the string."""
    if ";" in text:
        return [parse_value(part) for part in text.split(";")]
    lowered = text.lower()
    if lowered in ("null", "none"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_assignments(items: list[str]) -> dict[str, list[Any]]:
    """["a=1,2", "b=x"] -> {"a": [1, 2], "b": ["x"]}."""
    out = {}
    for item in items:
        name, _, values = item.partition("=")
        out[name] = [parse_value(v) for v in values.split(",")]
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--variant", default="topk", help="a registered variant (topk, relu, jumprelu, batchtopk, ...)"
    )
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--features-per-dim", type=int, default=8, help="planted features = this * d_in")
    p.add_argument("--mean-active", type=float, default=5.0, help="planted features active per row")
    p.add_argument("--structure", default="uniform", help="uniform | hierarchical | mixed_sparsity")
    p.add_argument("--expansion", type=int, default=16, help="SAE width = this * d_in")
    p.add_argument("--k", type=int, nargs="+", default=[], help="shorthand for --grid k=...")
    p.add_argument("--l1", type=float, nargs="+", default=[], help="shorthand for --grid l1_coefficient=...")
    p.add_argument("--grid", action="append", default=[], help="field=v1,v2,...: SAE config values to sweep")
    p.add_argument(
        "--set", action="append", default=[], help="field=value: an SAE config value for every row"
    )
    p.add_argument("--lr-mult", type=float, nargs="+", default=[1.0], help="multiples of the default lr")
    p.add_argument("--tokens", type=float, default=2e6)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=str, default=None, help="also write the rows to this file")
    p.add_argument("--oracle", action="store_true", help="only print the FVU of TopK with the true features")
    p.add_argument("--cache", default="", help="train on this `saelab harvest` cache instead of planted data")
    p.add_argument("--hook", default="", help="the cache's hook ('' when it holds one)")
    return p.parse_args()


def oracle_fvu(source: SyntheticSource, k: int, batch_level: bool = False) -> float:
    """FVU of a k-sparse encoder that knows the planted directions: tied encoder/decoder F, codes x F^T (ReLU)
    kept per row (the top k of each row) or, with batch_level, over the batch (its N * k largest: BatchTopK's
    rule), scaled by the least-squares factor. A reference no linear-encoder SAE of this L0 is likely to beat."""
    x = source.batch(HELD_OUT, 8192).double()
    features = source.features.double()
    pre = x @ features.T
    if batch_level:
        cutoff = pre.reshape(-1).topk(x.shape[0] * k).values.min()
        codes = pre * (pre >= cutoff)
    else:
        top = pre.topk(k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    x_hat = codes @ features
    x_hat = x_hat * (x * x_hat).sum() / x_hat.pow(2).sum()
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def heldout_rows(source: Any, first_batch: int, rows: int = 16384) -> torch.Tensor:
    """Rows [rows, d_in] the run never trained on: planted batches from HELD_OUT on, or a cache's batches from
    `first_batch` (past the training batches in the cache's reading order)."""
    if isinstance(source, SyntheticSource):
        return torch.cat([source.batch(HELD_OUT + i, 4096) for i in range(rows // 4096)])
    batches = source.batches(4096, start_batch=first_batch)
    return torch.cat([next(batches) for _ in range(rows // 4096)])


@torch.no_grad()
def heldout(sae: Any, x: torch.Tensor) -> dict[str, float]:
    """FVU (float64), mean L0 and dead fraction (no firing on any row) of the SAE's encoder on held-out rows x."""
    z = sae.encode(x)
    x_hat = sae.decode(z).double()
    xd = x.double()
    fvu = ((xd - x_hat).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum()).item()
    active = z > 0
    return {
        "fvu": fvu,
        "l0": active.sum(dim=1).float().mean().item(),
        "dead": 1.0 - active.any(dim=0).double().mean().item(),
    }


def final_coefficient(history: list[dict[str, float]]) -> float | None:
    """The last logged sparsity coefficient of a penalty-based variant (None for the others)."""
    for name in ("l1_coefficient", "sparsity_coefficient"):
        if history and name in history[-1]:
            return history[-1][name]
    return None


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.cache:
        source: Any = CacheSource(
            CacheSourceConfig(path=args.cache, hook_name=args.hook, seed=args.data_seed)
        )
    else:
        data = SyntheticConfig(
            d_in=args.d_in,
            n_features=args.features_per_dim * args.d_in,
            mean_active=args.mean_active,
            structure=args.structure,
            seed=args.data_seed,
        )
        source = SyntheticSource(data)
    d, n = source.d_in, args.expansion * source.d_in
    held = heldout_rows(source, -(-int(args.tokens) // 4096) + 1)
    if args.oracle:
        for k in args.k:
            row, batch = oracle_fvu(source, k), oracle_fvu(source, k, batch_level=True)
            print(f"k={k}: FVU with the true features, per-row top k {row:.4f}, batch top N*k {batch:.4f}")
        return
    grid = parse_assignments(args.grid)
    grid.update({"k": args.k} if args.k else {}, **({"l1_coefficient": args.l1} if args.l1 else {}))
    fixed = {name: values[0] for name, values in parse_assignments(args.set).items()}
    cls = get_sae_class(args.variant)
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted((set(grid) | set(fixed)) - names)
    if unknown:
        raise SystemExit(f"{args.variant} has no config fields {unknown}; it has {sorted(names)}.")
    rows = []
    for values, mult in itertools.product(itertools.product(*grid.values()), args.lr_mult):
        setting = {**fixed, **dict(zip(grid, values, strict=True))}
        sae = cls(cls.config_class(d_in=d, d_sae=n, **setting), generator(args.init_seed, "sae.init"))
        lr = sae.default_lr(args.batch) * mult
        steps = max(1, int(args.tokens) // args.batch)
        trainer_cfg = TrainerConfig(
            total_tokens=int(args.tokens),
            batch_size=args.batch,
            lr=lr,
            device="cpu",
            log_every=max(1, steps // 10),
        )
        start = time.perf_counter()
        result = Trainer(sae, trainer_cfg).fit(source)
        rec = recovery_metrics(source.features, result.sae.W_dec.detach()) if not args.cache else {}
        rows.append(
            {
                "variant": args.variant,
                "d_in": d,
                "n": n,
                "data_seed": args.data_seed,
                "init_seed": args.init_seed,
                "setting": setting,
                "lr": lr,
                "lr_mult": mult,
                **heldout(result.sae, held),
                "own_dead": result.dead_fraction,
                **rec,
                "coefficient": final_coefficient(result.history),
                "train_l0": [round(row["l0"], 2) for row in result.history],
                "seconds": time.perf_counter() - start,
            }
        )
        r = rows[-1]
        coefficient = "" if r["coefficient"] is None else f" coef={r['coefficient']:.3g}"
        recovery = f" mmcs={r['mmcs']:.3f} recovered={r['frac_recovered']:.3f}" if rec else ""
        print(
            f"{setting} lr={lr:<9.3g} fvu={r['fvu']:.4f} l0={r['l0']:6.2f} dead={r['dead']:.3f}{recovery}"
            f"{coefficient} ({r['seconds']:.0f} s)",
            flush=True,
        )
    print(json.dumps(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

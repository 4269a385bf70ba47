"""Sweep the learning rate (as multiples of a variant's default) on planted-feature data; print a table and JSON.

Each row trains one SAE from the same init on the same batches and reports held-out FVU and L0, the dead
fraction, MMCS and the fraction of planted features recovered at cosine >= 0.9. This is how the default
learning rates were chosen (BENCHMARKS.md, "Default learning rate").

    python scripts/tune_defaults.py --variant topk --d-in 64 --k 8 16 32 --lr-mult 0.5 1 2 --tokens 2e6
    python scripts/tune_defaults.py --variant relu --d-in 64 --l1 1 2 5 --tokens 2e6 --batch 1024
    python scripts/tune_defaults.py --oracle --k 5 8 16 32      # FVU floor of a TopK encoder given the truth
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from saelab.core.seeds import generator
from saelab.sae.registry import build_sae
from saelab.sae.relu import ReLUConfig
from saelab.sae.topk import TopKConfig
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource, recovery_metrics
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["topk", "relu"], default="topk")
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--features-per-dim", type=int, default=8, help="planted features = this * d_in")
    p.add_argument("--expansion", type=int, default=16, help="SAE width = this * d_in")
    p.add_argument("--k", type=int, nargs="+", default=[8], help="TopK k values")
    p.add_argument("--l1", type=float, nargs="+", default=[5.0], help="ReLU l1_coefficient values")
    p.add_argument("--lr-mult", type=float, nargs="+", default=[1.0], help="multiples of the default lr")
    p.add_argument("--tokens", type=float, default=2e6)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=str, default=None, help="also write the rows to this file")
    p.add_argument("--oracle", action="store_true", help="only print the FVU of TopK with the true features")
    return p.parse_args()


def oracle_fvu(source: SyntheticSource, k: int) -> float:
    """FVU of a TopK encoder that knows the planted directions: tied encoder/decoder F, top-k of x F^T (ReLU),
    codes scaled by the least-squares factor. A floor no linear-encoder TopK SAE of this k is likely to beat."""
    x = source.batch(10**6, 8192).double()
    features = source.features.double()
    pre = x @ features.T
    top = pre.topk(k, dim=1)
    x_hat = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()) @ features
    x_hat = x_hat * (x * x_hat).sum() / x_hat.pow(2).sum()
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def heldout(sae, source: SyntheticSource) -> tuple[float, float]:
    """(FVU in float64, mean L0) on 8192 rows the run never saw."""
    x = source.batch(10**6, 8192)
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z).double()
    xd = x.double()
    fvu = ((xd - x_hat).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum()).item()
    return fvu, (z > 0).sum(dim=1).float().mean().item()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    d, n = args.d_in, args.expansion * args.d_in
    source = SyntheticSource(SyntheticConfig(d_in=d, n_features=args.features_per_dim * d, seed=0))
    if args.oracle:
        for k in args.k:
            print(f"k={k}: FVU of TopK with the true features {oracle_fvu(source, k):.4f}")
        return
    settings = args.k if args.variant == "topk" else args.l1
    rows = []
    for setting, mult in itertools.product(settings, args.lr_mult):
        cfg = (
            TopKConfig(d_in=d, d_sae=n, k=int(setting))
            if args.variant == "topk"
            else ReLUConfig(d_in=d, d_sae=n, l1_coefficient=setting)
        )
        sae = build_sae(cfg, generator(0, "sae.init"))  # one init for every row
        lr = sae.default_lr(args.batch) * mult
        trainer_cfg = TrainerConfig(
            total_tokens=int(args.tokens), batch_size=args.batch, lr=lr, device="cpu", log_every=10**9
        )
        start = time.perf_counter()
        result = Trainer(sae, trainer_cfg).fit(source)
        fvu, l0 = heldout(result.sae, source)
        rec = recovery_metrics(source.features, result.sae.W_dec.detach())
        rows.append(
            {
                "variant": args.variant,
                "d_in": d,
                "n": n,
                "setting": setting,
                "lr": lr,
                "lr_mult": mult,
                "fvu": fvu,
                "l0": l0,
                "dead": result.dead_fraction,
                **rec,
                "seconds": time.perf_counter() - start,
            }
        )
        r = rows[-1]
        name = "k" if args.variant == "topk" else "l1"
        print(
            f"{name}={setting:<6g} lr={lr:<9.3g} fvu={r['fvu']:.4f} l0={r['l0']:6.1f} dead={r['dead']:.3f} "
            f"mmcs={r['mmcs']:.3f} recovered={r['frac_recovered']:.3f} ({r['seconds']:.0f} s)",
            flush=True,
        )
    print(json.dumps(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

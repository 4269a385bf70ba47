"""Feature recovery of every SAE variant on the same planted-feature data sets, with default settings.

Data sets (`saelab.sources.synthetic`):
  uniform       d_in 64, 512 features, power-law frequencies, 5 active per row, uniform magnitudes
  gba_toy       the GBA paper's toy: d_in 42, 128 features, half the rows 3-sparse and half 20-sparse,
                exponential magnitudes (`saelab.sources.synthetic.gba_toy_config`)
  hierarchical  d_in 64, 100 parents with 4 mutually exclusive children each (500 features), 4 parents
                per row, an active parent switches on one child with probability 0.75

Each variant trains with the Trainer's defaults (lr=None: the variant's default rate) for the same steps
and batch size; k for the k-sparse variants is the true mean L0 (uniform 5, hierarchical 7) and, on
gba_toy, the paper's k=20 (the densest rows' L0), plus TopK k=30. Metrics are on held-out batches: L0,
FVU, MMCS (mean over true features of the best cosine to a decoder row), fraction of true features
recovered at cosine >= 0.9, dead fraction (latents that never fire on the held-out rows) and training
samples/s; on hierarchical the JSON also splits recovery into parents and children. A second table times
one MP pursuit (forward + backward) with Gram-matrix selection against recomputed correlations.

    python scripts/bench_recovery.py --steps 3000 --batch-size 512 --json recovery.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from saelab.core.atomic import atomic_file
from saelab.core.seeds import generator
from saelab.sae.mp import MatchingPursuitSAE, MPConfig
from saelab.sae.registry import get_sae_class, variant_classes
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource, gba_toy_config, recovery_metrics
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

HELD_OUT = 10**7  # batch indices from here on are never trained on

#: name -> (data set, SAE width, k for the k-sparse variants)
DATASETS: dict[str, tuple[SyntheticConfig, int, int]] = {
    "uniform": (SyntheticConfig(), 1024, 5),
    "gba_toy": (gba_toy_config(), 512, 20),
    "hierarchical": (SyntheticConfig(structure="hierarchical", n_features=500, mean_active=4.0), 1024, 7),
}


def default_rows() -> dict[str, tuple[str, dict[str, Any]]]:
    """One row per trainable registered variant at its defaults, k from the data set where the config has a k."""
    rows = {}
    for cls in variant_classes():
        if cls.trainable:
            has_k = "k" in {f.name for f in dataclasses.fields(cls.config_class)}
            rows[cls.architecture] = (cls.architecture, {"k": "{k}"} if has_k else {})
    return rows


#: name -> (architecture, config overrides); "{k}" is replaced by the data set's k.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **default_rows(),
    "topk-k30": ("topk", {"k": 30}),
    "gba-jumprelu": ("gba", {"activation": "jumprelu"}),
}
ONLY_ON = {"topk-k30": ("gba_toy",)}


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


def run_one(
    dataset: str, variant: str, steps: int, batch_size: int, eval_rows: int, seed: int
) -> dict[str, Any]:
    data_cfg, width, k = DATASETS[dataset]
    arch, overrides = VARIANTS[variant]
    source = SyntheticSource(data_cfg)
    cls = get_sae_class(arch)
    fields = {name: (k if value == "{k}" else value) for name, value in overrides.items()}
    sae = cls(cls.config_class(d_in=data_cfg.d_in, d_sae=width, **fields), generator(seed, "sae.init"))
    trainer = Trainer(
        sae,
        TrainerConfig(
            total_tokens=steps * batch_size, batch_size=batch_size, device="cpu", log_every=steps, seed=seed
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
        "variant": variant,
        "k": fields.get("k"),
        "lr": trainer.lr,
        **metrics,
        "samples_per_s": result.tokens / seconds,
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--eval-rows", type=int, default=16384)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: runs stay comparable)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for dataset in args.datasets:
        for variant in args.variants:
            if dataset in ONLY_ON.get(variant, (dataset,)):
                rows.append(run_one(dataset, variant, args.steps, args.batch_size, args.eval_rows, args.seed))
                print(json.dumps(rows[-1]), flush=True)
    speed = [time_pursuit(n, d, 16, 1024, rounds=3) for n, d in ((512, 64), (2048, 256), (4096, 768))]

    table = Table(title=f"feature recovery: {args.steps} steps x {args.batch_size} rows, default settings")
    for col in ("data set", "variant", "k", "L0", "FVU", "MMCS", "recovered @0.9", "dead", "samples/s"):
        table.add_column(col, justify="left" if col in ("data set", "variant") else "right")
    for r in rows:
        table.add_row(
            r["dataset"],
            r["variant"],
            str(r["k"] or "-"),
            f"{r['l0']:.1f}",
            f"{r['fvu']:.3f}",
            f"{r['mmcs']:.3f}",
            f"{r['frac_recovered']:.1%}",
            f"{r['dead_frac']:.1%}",
            f"{r['samples_per_s']:,.0f}",
        )
    pursuit = Table(title="MP pursuit, forward + backward (median of 3 interleaved rounds, same process)")
    for col in ("n", "d_in", "k", "batch", "Gram (ms)", "recompute (ms)", "Gram speedup"):
        pursuit.add_column(col, justify="right")
    for s in speed:
        pursuit.add_row(
            str(s["width"]),
            str(s["d_in"]),
            str(s["k"]),
            str(s["batch"]),
            f"{1e3 * s['gram_s']:.1f}",
            f"{1e3 * s['recompute_s']:.1f}",
            f"{s['speedup']:.2f}x",
        )
    console = Console()
    console.print(table)
    console.print(pursuit)
    out = {
        "date": datetime.date.today().isoformat(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "recovery": rows,
        "mp_pursuit": speed,
    }
    print(json.dumps(out))
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""saelab training throughput and peak memory for TopK and ReLU SAEs at one (d_in, n, k, batch).

Runs, interleaved round by round in one process on the same fresh synthetic batches:

- topk: the TopK SAE as trained by default (sparse kernels: embedding-bag decoder and encoder gradient
  through the selected codes only, grouped top-k, fused Adam, bf16 autocast on CUDA).
- topk-plain: the same trainer with the plain dense-autograd TopK pass (`saelab.sae.reference`), the
  baseline of the speedup column.
- batchtopk: the BatchTopK SAE (top B * k of the whole batch; same sparse kernels as topk).
- relu: the ReLU + L1 SAE (dense by nature).
- mp: the matching-pursuit SAE (k sequential correlation passes, Gram-matrix selection).

A second table times exact top-k selection over a [B, n] matrix, torch.topk against saelab's grouped
selection, for TopK's k and AuxK's d_in / 2. Each row of the first also gives the fraction of the encoder-matmul floor reached (one [B, d] x [d, n] product in the
compute dtype, timed in the same rounds). Peak memory is measured per run in a fresh process (CUDA: max
allocated tensor memory; CPU: growth of the peak resident set) over a few steps.

    python scripts/bench_train.py --d-in 256 --n 4096 --k 32 --batch 1024
    python scripts/bench_train.py --device cuda --d-in 768 --n 32768 --k 32 --batch 8192 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys

import benchutil
import torch

from saelab.core.seeds import generator
from saelab.kernels import default_group_size, topk_select
from saelab.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from saelab.sae.mp import MatchingPursuitSAE, MPConfig
from saelab.sae.reference import plain_topk_training_forward
from saelab.sae.relu import ReLUConfig, ReLUSAE
from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

RUNS = ("topk", "topk-plain", "batchtopk", "relu", "mp")


def build(
    name: str, args: argparse.Namespace, device: torch.device, autocast: bool, first: torch.Tensor
) -> Trainer:
    init = generator(0, "sae.init")
    if name == "relu":
        sae = ReLUSAE(ReLUConfig(d_in=args.d_in, d_sae=args.n), init)
    elif name == "mp":
        sae = MatchingPursuitSAE(MPConfig(d_in=args.d_in, d_sae=args.n, k=args.k), init)
    elif name == "batchtopk":
        sae = BatchTopKSAE(BatchTopKConfig(d_in=args.d_in, d_sae=args.n, k=args.k), init)
    else:
        sae = TopKSAE(TopKConfig(d_in=args.d_in, d_sae=args.n, k=args.k), init)
    cfg = TrainerConfig(
        total_tokens=args.steps * args.batch,
        batch_size=args.batch,
        device=str(device),
        dead_window_tokens=max(args.batch, int(0.1 * args.steps * args.batch)),
        autocast_dtype="bfloat16" if autocast and name != "topk-plain" else "none",
        log_every=10**9,
    )
    trainer = Trainer(sae, cfg)
    if name == "topk-plain":
        trainer.forward = functools.partial(plain_topk_training_forward, sae)
    trainer.prepare(first)
    return trainer


def select(pre: torch.Tensor, k: int, group_size: int | None) -> None:
    topk_select(pre, k, group_size)


def step(trainer: Trainer, x: torch.Tensor) -> None:
    trainer.train_step(x)
    trainer.periodic_checks()


def data(args: argparse.Namespace, device: torch.device) -> benchutil.Activations:
    return benchutil.Activations(args.d_in, max(args.n // 4, 2 * args.k), args.k / 2, args.batch, device)


def run_probe(name: str, args: argparse.Namespace, device: torch.device, autocast: bool) -> None:
    """Peak memory of `name` over 3 steps, above the footprint just before it was built (after a tiny
    warm-up run, so lazy imports and one-time initialisation are not counted)."""
    tiny = argparse.Namespace(**{**vars(args), "d_in": 8, "n": 64, "k": 4, "batch": 16})
    tiny_batch = data(tiny, device).batch(0)
    warm = build(name, tiny, device, autocast, tiny_batch)
    for _ in range(2):
        step(warm, tiny_batch)
    del warm
    gc.collect()
    x = data(args, device).batch(0)
    benchutil.sync(device)
    base = benchutil.current_memory(device)
    benchutil.reset_peak_memory(device)
    trainer = build(name, args, device, autocast, x)
    for _ in range(3):
        step(trainer, x)
    benchutil.sync(device)
    benchutil.report_probe(benchutil.peak_memory(device) - base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--n", type=int, default=4096, help="latents")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--steps", type=int, default=60, help="steps per run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps per run before timing")
    parser.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds")
    parser.add_argument(
        "--autocast", default="auto", choices=("auto", "none", "bfloat16"), help="auto: bf16 on CUDA"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-run memory probes")
    parser.add_argument("--json", help="also write the JSON results to this file")
    parser.add_argument("--probe", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    device = benchutil.setup_device(args.device, args.threads)
    autocast = args.autocast == "bfloat16" or (args.autocast == "auto" and device.type == "cuda")
    if args.probe:
        run_probe(args.probe, args, device, autocast)
        return
    per_round = (args.steps - args.warmup) // args.rounds
    if per_round < 1:
        raise SystemExit(f"--steps={args.steps} leaves fewer than --rounds={args.rounds} timed steps.")

    source = data(args, device)
    trainers = {name: build(name, args, device, autocast, source.batch(0)) for name in args.runs}
    for trainer in trainers.values():
        for i in range(args.warmup):
            step(trainer, source.batch(i))
    dtype = torch.bfloat16 if autocast else torch.float32
    matmul = benchutil.encoder_matmul(args.batch, args.d_in, args.n, device, dtype)
    pre = torch.randn(args.batch, args.n, device=device, dtype=dtype)
    selections = {  # TopK's k and AuxK's aux_k = d_in / 2, by torch.topk and by grouped selection
        f"{how} k={k}": functools.partial(select, pre, k, group)
        for k in (args.k, args.d_in // 2)
        for how, group in (("torch.topk", 1), ("grouped", None))
    }
    seconds: dict[str, list[float]] = {name: [] for name in [*trainers, "matmul", *selections]}
    for r in range(args.rounds):
        start = args.warmup + r * per_round
        batches = [source.batch(i) for i in range(start, start + per_round)]

        def train(trainer: Trainer, batches: list[torch.Tensor] = batches) -> None:
            for x in batches:
                step(trainer, x)

        def floor(batches: list[torch.Tensor] = batches) -> None:
            for _ in batches:
                matmul()

        timed = {name: functools.partial(train, trainer) for name, trainer in trainers.items()}
        timed["matmul"] = floor
        timed.update(selections)
        for name, times in benchutil.time_interleaved(timed, 1, device, first=r).items():
            seconds[name] += times

    floor_s = benchutil.median(seconds["matmul"]) / per_round
    results: dict[str, dict[str, object]] = {}
    for name in trainers:
        step_s = benchutil.median(seconds[name]) / per_round
        probe = [f"--probe={name}", *sys.argv[1:]]
        results[name] = {
            "samples_per_s": args.batch / step_s,
            "step_ms": 1e3 * step_s,
            "floor_fraction": floor_s / step_s,
            "peak_mib": None if args.no_memory else benchutil.run_probe(__file__, probe),
        }
    if "topk" in results and "topk-plain" in results:
        results["topk"]["speedup_vs_plain"] = (
            results["topk"]["samples_per_s"] / results["topk-plain"]["samples_per_s"]
        )
    rows = [
        [
            name,
            f"{r['samples_per_s']:,.0f}",
            f"{r['step_ms']:.1f}",
            "-" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}",
            f"{100 * r['floor_fraction']:.0f}%",
            f"{r['speedup_vs_plain']:.2f}x" if "speedup_vs_plain" in r else "-",
        ]
        for name, r in results.items()
    ]
    benchutil.print_table(
        f"saelab training, d={args.d_in} n={args.n} k={args.k} B={args.batch}, {str(dtype)[6:]}; "
        f"encoder matmul {1e3 * floor_s:.2f} ms",
        ["run", "samples/s", "ms/step", "peak MiB", "of matmul floor", "vs topk-plain"],
        rows,
    )
    select_ms = {name: 1e3 * benchutil.median(seconds[name]) for name in selections}
    benchutil.print_table(
        f"top-k selection over [{args.batch}, {args.n}] (group size: k={args.k} -> "
        f"{default_group_size(args.n, args.k)}, k={args.d_in // 2} -> {default_group_size(args.n, args.d_in // 2)})",
        ["selection", "ms"],
        [[name, f"{ms:.2f}"] for name, ms in select_ms.items()],
    )
    benchutil.write_report(
        args.json,
        "bench_train",
        device,
        shape={"d_in": args.d_in, "n": args.n, "k": args.k, "batch": args.batch},
        compute_dtype=str(dtype).removeprefix("torch."),
        matmul_ms=1e3 * floor_s,
        matmul_tflops=2 * args.batch * args.d_in * args.n / floor_s / 1e12,
        results=results,
        selection_ms=select_ms,
    )


if __name__ == "__main__":
    main()

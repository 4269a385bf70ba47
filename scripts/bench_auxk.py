"""Cost of AuxK in saelab's TopK training step: the step with dead latents over the step with none.

One trainer per configuration (same init, same fresh batches), timed in interleaved rounds in one process:

- idle: no latent dead (AuxK skipped).
- gathered, at each --dead-fracs: AuxK over the gathered dead sub-dictionary (the default: a dense product
  while the dead list is short, the sparse codes past `backend.AUXK_DENSE_MAX_RATIO` * aux_k).
- per-row, same fractions: the previous path (`dead_latents=None`): a top aux_k over the dead-masked
  pre-activations of every row, decoded through the sparse kernels with the TopK codes.

The dead set is forced before every step (the tracker's counters pinned), so every step of a configuration
sees the same dead latents. Prints ms/step and the ratio to idle; --json writes them.

    python scripts/bench_auxk.py --threads 1                 # 256/4096/32/1024 on CPU
    python scripts/bench_auxk.py --device cuda --d-in 768 --n 32768 --batch 8192
"""

from __future__ import annotations

import argparse
import functools

import benchutil
import torch

from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer


class PinnedDead:
    """A trainer whose dead set is `mask` [n] before every step; `gathered` False drops the dead list."""

    def __init__(
        self,
        args: argparse.Namespace,
        device: torch.device,
        first: torch.Tensor,
        mask: torch.Tensor,
        gathered: bool,
    ):
        torch.manual_seed(0)
        sae = TopKSAE(TopKConfig(d_in=args.d_in, d_sae=args.n, k=args.k))
        cfg = TrainerConfig(
            total_tokens=10**4 * args.batch,
            batch_size=args.batch,
            device=str(device),
            autocast_dtype="bfloat16" if device.type == "cuda" else "none",
            log_every=10**9,
        )
        self.trainer, self.mask, self.gathered = Trainer(sae, cfg), mask, gathered
        self.trainer.prepare(first)
        self.pin()
        self.trainer.refresh_dead()  # the dead set never changes, so neither does the list
        if not gathered:
            self.trainer.dead_latents = None

    def pin(self) -> None:
        tracker = self.trainer.tracker
        tracker.tokens_since_fired.copy_(self.mask.long() * tracker.window)

    def steps(self, batches: list[torch.Tensor]) -> None:
        for x in batches:
            self.trainer.train_step(x)
            self.pin()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dead-fracs", type=float, nargs="+", default=[0.003, 0.03, 0.1, 0.3])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = benchutil.setup_device(args.device, args.threads)
    data = benchutil.Activations(args.d_in, max(args.n // 4, 2 * args.k), args.k / 2, args.batch, device)
    gen = torch.Generator().manual_seed(2024)  # the dead sets: their own stream, not the data's or the init's
    order = torch.randperm(args.n, generator=gen).to(device)
    runs = {
        "idle": PinnedDead(
            args, device, data.batch(0), torch.zeros(args.n, dtype=torch.bool, device=device), True
        )
    }
    for frac in args.dead_fracs:
        mask = torch.zeros(args.n, dtype=torch.bool, device=device)
        mask[order[: max(1, round(frac * args.n))]] = True
        for how, gathered in (("gathered", True), ("per-row", False)):
            runs[f"{how} {100 * frac:g}%"] = PinnedDead(args, device, data.batch(0), mask, gathered)
    for run in runs.values():  # warm-up
        run.steps([data.batch(1), data.batch(2)])
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        start = 3 + r * args.steps_per_round
        batches = [data.batch(i) for i in range(start, start + args.steps_per_round)]
        timed = {name: functools.partial(run.steps, batches) for name, run in runs.items()}
        for name, times in benchutil.time_interleaved(timed, 1, device, first=r).items():
            seconds[name] += times
    step_ms = {name: 1e3 * benchutil.median(t) / args.steps_per_round for name, t in seconds.items()}
    ratio = {name: ms / step_ms["idle"] for name, ms in step_ms.items()}
    benchutil.print_table(
        f"TopK step with AuxK, d={args.d_in} n={args.n} k={args.k} B={args.batch} ({benchutil.device_name(device)})",
        ["run", "ms/step", "vs idle"],
        [[name, f"{step_ms[name]:.1f}", f"{ratio[name]:.2f}x"] for name in runs],
    )
    benchutil.write_report(
        args.json,
        "bench_auxk",
        device,
        step_ms=step_ms,
        vs_idle=ratio,
    )


if __name__ == "__main__":
    main()

"""Many SAEs from one activation stream (hydra/launcher=together) against training them one job at a time.

Two parts (`--parts`):

- synthetic: 8 same-shape TopK SAEs (lr and seed differ) on planted-feature batches, trained three ways for the
  same steps: 8 solo runs (`Trainer.fit` each, each drawing its own batches), together stepping each SAE in
  turn (stack=off), and together as one stacked computation (stack=on). Reports ms per step (one step = all 8
  SAEs one batch further) and the largest weight difference of each SAE to its solo run.
- live: SmolLM2-135M on CPU (`saelab fetch-assets`), 4 TopK SAEs over 2 hooks (`--hooks`, default blocks.3 and
  blocks.6 resid_post; k 16 and 32), as one `saelab train -m` sweep with the basic launcher (each job runs the model
  itself) and with hydra/launcher=together (the model runs once per batch for both hooks), same tokens per job.
  Each sweep runs in a fresh process: wall time (start to exit, model loading included), its CPU time (on a
  shared machine the figure load does not stretch; single-threaded, it is the wall time of an idle machine) and
  its peak resident memory; the two sweeps' SAEs are compared.

    python scripts/bench_together.py --json together.json
    python scripts/bench_together.py --parts synthetic --device cuda --d-in 768 --n 16384 --k 32 --batch 4096
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchutil
import torch

from saelab import load_sae
from saelab.core.seeds import generator
from saelab.sae import build_sae
from saelab.sae.topk import TopKConfig
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
from saelab.train.config import TrainerConfig
from saelab.train.together import train_together
from saelab.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- synthetic
def synthetic_jobs(args: argparse.Namespace) -> list[tuple[TopKConfig, TrainerConfig, None]]:
    """8 same-shape TopK SAEs; lr and seed differ (what a sweep varies)."""
    jobs = []
    for i in range(args.saes):
        cfg = TrainerConfig(
            total_tokens=args.steps * args.batch, batch_size=args.batch, device=args.device, seed=i,
            lr=2e-3 * (1.5 ** (i % 4)), log_every=args.steps, dead_check_every=10,
        )  # fmt: skip
        jobs.append((TopKConfig(d_in=args.d_in, d_sae=args.n, k=args.k), cfg, None))
    return jobs


def solo(jobs: list, source: SyntheticSource) -> list:
    out = []
    for sae_cfg, cfg, _ in jobs:
        resolved = sae_cfg.resolved(source.d_in)
        resolved.metadata = {**source.metadata(), **resolved.metadata}
        out.append(Trainer(build_sae(resolved, generator(cfg.seed, "sae.init")), cfg).fit(source))
    return out


def timed(run) -> tuple[float, list]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, results


def max_diff(a, b) -> float:
    return max((a.sae.state_dict()[k] - v).abs().max().item() for k, v in b.sae.state_dict().items())


def bench_synthetic(args: argparse.Namespace) -> dict:
    source = SyntheticSource(SyntheticConfig(d_in=args.d_in, n_features=args.features, seed=3))
    jobs = synthetic_jobs(args)
    warm = [(c, TrainerConfig(**{**vars(t), "total_tokens": 2 * args.batch}), h) for c, t, h in jobs[:2]]
    for stack in ("off", "on"):  # first-call costs (allocations, grouped top-k set-up) out of the timings
        train_together(warm, source, stack=stack, progress=False)
    modes = {
        "8 solo runs": lambda: solo(jobs, source),
        "together, looped": lambda: train_together(jobs, source, stack="off", progress=False),
        "together, stacked": lambda: train_together(jobs, source, stack="on", progress=False),
    }
    walls: dict[str, list[float]] = {name: [] for name in modes}
    results = {}
    for _ in range(args.repeats):  # interleaved rounds: the shared machine's load hits every mode alike
        for name, run in modes.items():
            wall, results[name] = timed(run)
            walls[name].append(wall)
    best = {name: min(w) for name, w in walls.items()}
    base = best["8 solo runs"]
    rows, report = [], {}
    for name in modes:
        diff = max(max_diff(r, s) for r, s in zip(results[name], results["8 solo runs"], strict=True))
        ms = 1000 * best[name] / args.steps
        rows.append([name, f"{ms:.1f}", f"{ms / args.saes:.2f}", f"{base / best[name]:.2f}x", f"{diff:.1e}"])
        report[name] = {"ms_per_step": ms, "speedup_vs_solo": base / best[name], "max_weight_diff": diff}
    title = (
        f"{args.saes} TopK SAEs, d_in {args.d_in}, {args.n} latents, k {args.k}, batch {args.batch}, "
        f"{args.steps} steps on {args.device} (best of {args.repeats})"
    )
    benchutil.print_table(title, ["mode", "ms/step", "ms/SAE-step", "vs solo", "max |W - W_solo|"], rows)
    return report


# -------------------------------------------------------------------------------------------------- live
MEASURE = (
    "import json, resource, subprocess, sys, time; start = time.perf_counter(); "
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "use = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print(json.dumps({'rc': done.returncode, 'wall_s': time.perf_counter() - start, "
    "'cpu_s': use.ru_utime + use.ru_stime, 'peak_rss_mib': use.ru_maxrss / 1024, 'stderr': done.stderr[-3000:]}))"
)


def sweep_command(args: argparse.Namespace, launcher: str, sweep_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "saelab.app.cli", "train", "-m", f"hydra/launcher={launcher}",
        "source=smollm2", f"source.assets_dir={args.assets}", f"source.hook_name={args.hooks}",
        "sae.k=16,32", "sae.expansion_factor=4", f"source.buffer_tokens={args.buffer_tokens}",
        f"source.context_size={args.context}", f"trainer.batch_size={args.live_batch}",
        f"trainer.total_tokens={args.live_tokens}", "trainer.device=cpu", "logging.progress=false",
        f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip


def bench_live(args: argparse.Namespace) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "disabled",
    }
    rounds: dict[str, list[dict]] = {"basic": [], "together": []}
    dirs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.live_repeats):  # interleaved: the shared machine's load hits both alike
            for launcher in ("basic", "together"):
                dirs[launcher] = Path(tmp) / f"{launcher}{round_}"
                command = [sys.executable, "-c", MEASURE, *sweep_command(args, launcher, dirs[launcher])]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                run = json.loads(done.stdout.strip().splitlines()[-1])
                if run["rc"] != 0:
                    raise SystemExit(f"the {launcher} sweep failed:\n{run['stderr']}")
                rounds[launcher].append(run)
        measured = {name: min(runs, key=lambda r: r["wall_s"]) for name, runs in rounds.items()}
        cpu = {name: min(r["cpu_s"] for r in runs) for name, runs in rounds.items()}
        runs = sorted(p.name for p in dirs["basic"].iterdir() if p.is_dir())
        diff = 0.0
        for run in runs:
            want, got = load_sae(dirs["basic"] / run / "sae"), load_sae(dirs["together"] / run / "sae")
            diff = max(
                diff, *((got.state_dict()[k] - v).abs().max().item() for k, v in want.state_dict().items())
            )
    basic, together = measured["basic"], measured["together"]
    ratio = basic["wall_s"] / together["wall_s"]
    rows = [
        [name, f"{m['wall_s']:.1f}", f"{cpu[key]:.1f}", f"{m['peak_rss_mib']:.0f}"]
        for key, name, m in (("basic", "basic launcher", basic), ("together", "together", together))
    ]
    title = (
        f"SmolLM2-135M on CPU ({args.threads} thread(s)): 4 TopK SAEs (k 16, 32) on {args.hooks}, "
        f"{args.live_tokens} tokens each; wall ratio {ratio:.2f}x, max |W_together - W_basic| {diff:.1e}"
    )
    benchutil.print_table(title, ["launcher", "wall s", "CPU s", "peak RSS MiB"], rows)
    return {
        "basic": {k: basic[k] for k in ("wall_s", "peak_rss_mib")},
        "together": {k: together[k] for k in ("wall_s", "peak_rss_mib")},
        "rounds_wall_s": {name: [r["wall_s"] for r in runs] for name, runs in rounds.items()},
        "wall_ratio_basic_over_together": ratio,
        "cpu_s": cpu,
        "cpu_ratio_basic_over_together": cpu["basic"] / cpu["together"],
        "max_weight_diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="synthetic,live", help="comma-separated: synthetic, live")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--saes", type=int, default=8)
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--n", type=int, default=2048, help="latents per SAE")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--features", type=int, default=512, help="planted features")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--assets", default=str(REPO / "assets"))
    parser.add_argument(
        "--hooks", default="blocks.3.hook_resid_post,blocks.6.hook_resid_post", help="two hooks"
    )
    parser.add_argument("--live-tokens", type=int, default=2048, help="tokens each live SAE trains on")
    parser.add_argument("--live-batch", type=int, default=256)
    parser.add_argument("--buffer-tokens", type=int, default=2048)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--live-repeats", type=int, default=1, help="interleaved rounds; the fastest counts")
    parser.add_argument("--json", help="also write the JSON results to this file")
    args = parser.parse_args()
    device = benchutil.setup_device(args.device, args.threads)
    args.device = str(device)
    parts = args.parts.split(",")
    results = {}
    if "synthetic" in parts:
        results["synthetic"] = bench_synthetic(args)
    if "live" in parts:
        results["live"] = bench_live(args)
    benchutil.write_report(args.json, "bench_together", device, args=vars(args), **results)


if __name__ == "__main__":
    main()

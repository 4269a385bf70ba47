"""TopK SAE training speed, memory and quality: saelab vs SAELens (`sae-lens`) vs EleutherAI sparsify
(`eai-sparsify`), on the same synthetic activations in one process.

Each library trains its own TopK SAE (AuxK on, decoder rows unit norm where the library does so) for the
same number of steps on the same batches, with the same Adam hyperparameters and learning-rate schedule
(saelab's width- and batch-scaled default lr, 2% warm-up, 20% linear decay). Every library runs its own
training step as a user would:

- saelab: `Trainer.prepare` then `Trainer.train_step` (bf16 autocast on CUDA by default).
- SAELens: `SAETrainer.step` on a `TopKTrainingSAE` (its default AuxK coefficient; autocast on CUDA).
- sparsify: `SparseCoder.forward` -> fvu + auxk_alpha * auxk_loss, backward, parallel-gradient removal,
  Adam step, decoder renormalisation, dead-latent counting and b_dec = batch mean at step 0, as in its
  `Trainer.fit`; auxk_alpha = 1/32 (its default 0 turns AuxK off); it always autocasts to bf16 on CUDA.

Timing interleaves the libraries round by round (rotating order) and reports the median round, so load on
a shared machine hits all of them alike, in three phases: the whole run (each library's own dead-latent
counters over a dead window of --dead-window-frac of the run), then AuxK idle (every library's counters
forced to "no latent dead") and AuxK active (the same random --dead-frac of the latents forced dead in every
library, before every step), so that the cost of AuxK shows on its own. Peak memory is measured for each library in a fresh process
(CUDA: max allocated tensor memory; CPU: growth of the peak resident set) over a few steps. FVU is
measured on held-out batches. The encoder-matmul floor is one [B, d] x [d, n] product in the training
compute dtype, timed in the same rounds.

The peers are installed with `pip install -e '.[dev,bench]'` (sae-lens comes with dev, eai-sparsify with both).

    python scripts/bench_vs_peers.py                       # CPU-sized shape on CPU, GPU shapes on CUDA
    python scripts/bench_vs_peers.py --shapes 768,32768,32,8192 --steps 300 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import sys
from dataclasses import dataclass
from typing import Protocol

import benchutil
import torch

from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.train.config import TrainerConfig
from saelab.train.schedule import lr_multiplier
from saelab.train.trainer import Trainer

SHAPES = {  # name -> (d_in, n latents, k, batch)
    "cpu": (256, 4096, 32, 1024),
    "gpu-small": (768, 32768, 32, 8192),
    "gpu-large": (2304, 65536, 64, 4096),
}
LIBRARIES = ("saelab", "saelens", "sparsify")
PACKAGES = {"saelab": "saelab", "saelens": "sae-lens", "sparsify": "eai-sparsify"}
WARMUP_FRAC, DECAY_FRAC, AUX_K_COEF = 0.02, 0.2, 1.0 / 32.0


@dataclass
class Spec:
    """One benchmark configuration shared by all libraries."""

    d_in: int
    n: int
    k: int
    batch: int
    steps: int
    dead_window_tokens: int
    device: torch.device
    autocast: bool

    @property
    def lr(self) -> float:
        """saelab's default TopK learning rate for this width and batch (built on the meta device)."""
        with torch.device("meta"):
            return TopKSAE(TopKConfig(d_in=self.d_in, d_sae=self.n, k=self.k)).default_lr(self.batch)

    @property
    def label(self) -> str:
        return f"d={self.d_in} n={self.n} k={self.k} B={self.batch}"


class Run(Protocol):
    """A library's training run: one optimisation step per call, inference for the FVU, and a switch that
    pins its dead-latent counters so that exactly `mask` [n] is dead before every step (None: its own)."""

    def step(self, x: torch.Tensor) -> None: ...

    def force_dead(self, mask: torch.Tensor | None) -> None: ...

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor: ...


class SaelabRun:
    def __init__(self, spec: Spec, first: torch.Tensor):
        cfg = TrainerConfig(
            total_tokens=spec.steps * spec.batch,
            batch_size=spec.batch,
            lr=spec.lr,
            lr_warmup_frac=WARMUP_FRAC,
            lr_decay_frac=DECAY_FRAC,
            dead_window_tokens=spec.dead_window_tokens,
            device=str(spec.device),
            autocast_dtype="bfloat16" if spec.autocast else "none",
            log_every=10**9,
        )
        sae = TopKSAE(TopKConfig(d_in=spec.d_in, d_sae=spec.n, k=spec.k, aux_k_coef=AUX_K_COEF))
        self.trainer = Trainer(sae, cfg)
        self.trainer.prepare(first)
        self.forced: torch.Tensor | None = None

    def force_dead(self, mask: torch.Tensor | None) -> None:
        self.forced = mask
        self.pin_dead()
        self.trainer.refresh_dead()

    def pin_dead(self) -> None:
        if self.forced is not None:
            tracker = self.trainer.tracker
            tracker.tokens_since_fired.copy_(self.forced.long() * tracker.window)

    def step(self, x: torch.Tensor) -> None:
        self.trainer.train_step(x)
        self.pin_dead()  # the forced set stays dead for the next step and the periodic dead-list refresh
        self.trainer.periodic_checks()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.trainer.inference_sae()(x)


class SAELensRun:
    def __init__(self, spec: Spec, first: torch.Tensor):
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        device = str(spec.device)
        self.sae = TopKTrainingSAE(
            TopKTrainingSAEConfig(d_in=spec.d_in, d_sae=spec.n, k=spec.k, device=device)
        )
        cfg = SAETrainerConfig(
            total_training_samples=spec.steps * spec.batch,
            train_batch_size_samples=spec.batch,
            lr=spec.lr,
            lr_end=spec.lr,  # the constant schedule decays from lr to 0 over lr_decay_steps
            lr_warm_up_steps=int(WARMUP_FRAC * spec.steps),
            lr_decay_steps=int(DECAY_FRAC * spec.steps),
            device=device,
            autocast=spec.autocast,
            dead_feature_window=max(1, spec.dead_window_tokens // spec.batch),
            logger=LoggingConfig(log_to_wandb=False),
        )
        self.trainer = SAETrainer(cfg, self.sae, data_provider=iter([first]))
        self.window = cfg.dead_feature_window
        self.forced: torch.Tensor | None = None

    def force_dead(self, mask: torch.Tensor | None) -> None:
        self.forced = mask

    def step(self, x: torch.Tensor) -> None:
        if self.forced is not None:
            counter = self.trainer.n_forward_passes_since_fired
            counter.copy_(self.forced.to(counter.dtype) * (self.window + 1))
        self.trainer.step(x)
        self.trainer.n_training_steps += 1  # what SAETrainer.fit does after each step

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae(x)


class SparsifyRun:
    def __init__(self, spec: Spec, first: torch.Tensor):
        from sparsify import SparseCoder, SparseCoderConfig

        self.sae = SparseCoder(
            spec.d_in, SparseCoderConfig(k=spec.k, num_latents=spec.n), spec.device, dtype=torch.float32
        )
        self.sae.b_dec.data = first.mean(0).to(self.sae.dtype)  # sparsify's Trainer does this at step 0
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=spec.lr)
        steps = spec.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, steps, WARMUP_FRAC, DECAY_FRAC)
        )
        self.threshold = spec.dead_window_tokens
        self.tokens_since_fired = torch.zeros(spec.n, dtype=torch.long, device=spec.device)
        self.did_fire = torch.zeros(spec.n, dtype=torch.bool, device=spec.device)
        self.forced: torch.Tensor | None = None

    def force_dead(self, mask: torch.Tensor | None) -> None:
        self.forced = mask

    def step(self, x: torch.Tensor) -> None:
        if self.forced is not None:
            self.tokens_since_fired.copy_(self.forced.long() * (self.threshold + 1))
        sae = self.sae
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=self.tokens_since_fired > self.threshold)
        (out.fvu + AUX_K_COEF * out.auxk_loss).backward()
        self.did_fire[out.latent_indices.flatten()] = True
        sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        with torch.no_grad():
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[self.did_fire] = 0
            self.did_fire.zero_()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae(x).sae_out


RUNS: dict[str, type] = {"saelab": SaelabRun, "saelens": SAELensRun, "sparsify": SparsifyRun}


def activations(spec: Spec) -> benchutil.Activations:
    """Planted features (n / 4 of them, k / 2 active per row on average) in d_in dimensions."""
    return benchutil.Activations(spec.d_in, max(spec.n // 4, 2 * spec.k), spec.k / 2, spec.batch, spec.device)


def fvu(run: Run, batches: list[torch.Tensor]) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean x||^2 over all held-out rows, in float64."""
    x = torch.cat(batches).double()
    x_hat = torch.cat([run.reconstruct(b).double() for b in batches])
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def library_version(name: str) -> str:
    try:
        return importlib.metadata.version(PACKAGES[name])
    except importlib.metadata.PackageNotFoundError:  # e.g. saelab run from a source tree on PYTHONPATH
        return "not installed"


def build_runs(spec: Spec, names: list[str], first: torch.Tensor) -> tuple[dict[str, Run], dict[str, str]]:
    """Instantiate each library's run; a library that cannot be imported is skipped with its error."""
    runs, skipped = {}, {}
    for name in names:
        try:
            runs[name] = RUNS[name](spec, first)
        except ImportError as err:
            skipped[name] = f"{type(err).__name__}: {err}"
            print(f"skipping {name}: {skipped[name]}", file=sys.stderr)
    return runs, skipped


PHASES = ("whole_run", "auxk_idle", "auxk_active")


def benchmark_shape(spec: Spec, args: argparse.Namespace) -> dict[str, object]:
    data = activations(spec)
    runs, skipped = build_runs(spec, args.libs, data.batch(0))
    rounds = {"whole_run": args.rounds, "auxk_idle": args.phase_rounds, "auxk_active": args.phase_rounds}
    per_round = (spec.steps - args.warmup) // sum(rounds.values())
    dtype = torch.bfloat16 if spec.autocast else torch.float32
    matmul = benchutil.encoder_matmul(spec.batch, spec.d_in, spec.n, spec.device, dtype)
    gen = torch.Generator().manual_seed(12345)  # the forced dead set: its own stream, shared by all libraries
    forced = {
        "whole_run": None,
        "auxk_idle": torch.zeros(spec.n, dtype=torch.bool, device=spec.device),
        "auxk_active": (torch.rand(spec.n, generator=gen) < args.dead_frac).to(spec.device),
    }

    def train(name: str, batches: list[torch.Tensor]) -> None:
        for x in batches:
            runs[name].step(x)

    def floor(batches: list[torch.Tensor]) -> None:
        for _ in batches:
            matmul()

    for name in runs:
        train(name, [data.batch(i) for i in range(args.warmup)])
    seconds = {phase: {name: [] for name in [*runs, "matmul"]} for phase in PHASES}
    start = args.warmup
    for phase in PHASES:
        for run in runs.values():
            run.force_dead(forced[phase])
        for r in range(rounds[phase]):  # every library trains on the same fresh batches in each round
            batches = [data.batch(i) for i in range(start, start + per_round)]
            start += per_round
            timed = {name: (lambda name=name, batches=batches: train(name, batches)) for name in runs}
            timed["matmul"] = lambda batches=batches: floor(batches)
            for name, times in benchutil.time_interleaved(timed, 1, spec.device, first=r).items():
                seconds[phase][name] += times
    for run in runs.values():
        run.force_dead(None)
    for name in runs:  # finish the schedule so every library trains for exactly spec.steps
        train(name, [data.batch(i) for i in range(start, spec.steps)])
    held_out = data.held_out(2)

    def step_s(phase: str, name: str) -> float:
        return benchutil.median(seconds[phase][name]) / per_round

    floor_s = step_s("whole_run", "matmul")
    libs: dict[str, dict[str, object]] = {}
    for name, run in runs.items():
        whole = step_s("whole_run", name)
        libs[name] = {
            "version": library_version(name),
            "samples_per_s": spec.batch / whole,
            "step_ms": 1e3 * whole,
            "phase_step_ms": {phase: 1e3 * step_s(phase, name) for phase in PHASES},
            "active_over_idle": step_s("auxk_active", name) / step_s("auxk_idle", name),
            "fvu": fvu(run, held_out),
            "peak_mib": None if args.no_memory else probe_memory(spec, name, args),
            "floor_fraction": floor_s / whole,
        }
    ratios = {
        f"saelab/{peer}": {phase: step_s(phase, peer) / step_s(phase, "saelab") for phase in PHASES}
        for peer in libs
        if peer != "saelab" and "saelab" in libs
    }
    return {
        "shape": {"d_in": spec.d_in, "n": spec.n, "k": spec.k, "batch": spec.batch},
        "steps": spec.steps,
        "timed_rounds": rounds,
        "steps_per_round": per_round,
        "forced_dead_fraction": forced["auxk_active"].float().mean().item(),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "matmul_ms": 1e3 * floor_s,
        "matmul_tflops": 2 * spec.batch * spec.d_in * spec.n / floor_s / 1e12,
        "libraries": libs,
        "speedup": ratios,
        "skipped": skipped,
    }


def probe_memory(spec: Spec, name: str, args: argparse.Namespace) -> float | None:
    probe_args = [
        f"--probe={name}",
        f"--shapes={spec.d_in},{spec.n},{spec.k},{spec.batch}",
        f"--device={spec.device}",
        f"--autocast={'bfloat16' if spec.autocast else 'none'}",
        f"--threads={args.threads}",
        f"--steps={spec.steps}",
    ]
    return benchutil.run_probe(__file__, probe_args)


def run_probe(spec: Spec, name: str) -> None:
    """Peak memory of `name` training for 3 steps, above the process's footprint just before it was built.

    A tiny run of the same library goes first, so lazy imports and one-time initialisation are not counted.
    """
    tiny = Spec(8, 64, 4, 16, spec.steps, 16, spec.device, spec.autocast)
    tiny_batch = activations(tiny).batch(0)
    warm = RUNS[name](tiny, tiny_batch)
    for _ in range(2):
        warm.step(tiny_batch)
    del warm
    gc.collect()
    batch = activations(spec).batch(0)
    benchutil.sync(spec.device)
    base = benchutil.current_memory(spec.device)
    benchutil.reset_peak_memory(spec.device)
    run = RUNS[name](spec, batch)
    for _ in range(3):
        run.step(batch)
    benchutil.sync(spec.device)
    benchutil.report_probe(benchutil.peak_memory(spec.device) - base)


def parse_shape(text: str) -> tuple[int, int, int, int]:
    if text in SHAPES:
        return SHAPES[text]
    try:
        d_in, n, k, batch = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(
            f"--shapes entry {text!r} must be one of {sorted(SHAPES)} or 'd_in,n,k,batch'."
        ) from None
    return d_in, n, k, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", nargs="+", help="names from SHAPES or d_in,n,k,batch (default: by device)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--libs", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument(
        "--steps", type=int, default=0, help="training steps per library (0: 200 CPU, 400 GPU)"
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per library before timing")
    parser.add_argument(
        "--rounds", type=int, default=8, help="timed interleaved rounds of the whole-run phase"
    )
    parser.add_argument("--phase-rounds", type=int, default=4, help="timed rounds of each forced AuxK phase")
    parser.add_argument("--dead-window-frac", type=float, default=0.1, help="dead window, fraction of tokens")
    parser.add_argument(
        "--dead-frac", type=float, default=0.2, help="latents forced dead in the AuxK-active phase"
    )
    parser.add_argument(
        "--autocast", default="auto", choices=("auto", "none", "bfloat16"), help="auto: bf16 on CUDA"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (0: torch default); see BENCHMARKS.md"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the per-library memory probes")
    parser.add_argument("--json", help="also write the JSON results to this file")
    parser.add_argument("--probe", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = benchutil.setup_peer_device(args.device, args.threads)
    cuda = device.type == "cuda"
    autocast = args.autocast == "bfloat16" or (args.autocast == "auto" and cuda)
    steps = args.steps or (400 if cuda else 200)
    if steps - args.warmup < args.rounds + 2 * args.phase_rounds:
        raise SystemExit(
            f"--steps={steps} leaves fewer than one step per timed round (--rounds={args.rounds}, "
            f"2 x --phase-rounds={args.phase_rounds}) after the warm-up."
        )
    shapes = [parse_shape(s) for s in args.shapes or (["gpu-small", "gpu-large"] if cuda else ["cpu"])]
    specs = [
        Spec(*shape, steps, int(args.dead_window_frac * steps * shape[3]), device, autocast)
        for shape in shapes
    ]
    if args.probe:
        run_probe(specs[0], args.probe)
        return

    results = []
    for spec in specs:
        result = benchmark_shape(spec, args)
        results.append(result)
        rows = []
        for name, lib in result["libraries"].items():
            speedup = result["speedup"].get(f"saelab/{name}")
            phase_ms = lib["phase_step_ms"]
            rows.append(
                [
                    f"{name} {lib['version']}",
                    f"{lib['samples_per_s']:,.0f}",
                    f"{lib['step_ms']:.1f}",
                    f"{phase_ms['auxk_idle']:.1f}",
                    f"{phase_ms['auxk_active']:.1f}",
                    f"{lib['active_over_idle']:.2f}",
                    "-" if lib["peak_mib"] is None else f"{lib['peak_mib']:,.0f}",
                    f"{lib['fvu']:.4f}",
                    f"{100 * lib['floor_fraction']:.0f}%",
                    "-" if speedup is None else "/".join(f"{speedup[p]:.2f}" for p in PHASES),
                ]
            )
        dead = f"{100 * result['forced_dead_fraction']:.0f}%"
        columns = [
            "library", "samples/s", "ms run", "ms idle", f"ms {dead} dead", "dead/idle",
            "peak MiB", "FVU", "of floor", "saelab x (run/idle/dead)",
        ]  # fmt: skip
        benchutil.print_table(
            f"TopK training, {spec.label}, {result['compute_dtype']}, {steps} steps; encoder matmul "
            f"{result['matmul_ms']:.2f} ms ({result['matmul_tflops']:.2f} TFLOP/s)",
            columns,
            rows,
        )
    benchutil.write_report(
        args.json,
        "bench_vs_peers",
        device,
        results=results,
    )


if __name__ == "__main__":
    main()

"""Quality of each library's untuned TopK defaults along a ladder of shapes, on planted features.

Every rung plants `features` unit-norm directions in d_in dimensions (power-law firing frequencies with
`active` features per row on average, magnitudes |N(0, 1)| + 0.5, noise 0.01, rows scaled to
E||x|| = sqrt(d_in)) and trains, on the same batches and for the same tokens:

- saelab: `Trainer` with nothing but total_tokens and batch_size set (default lr, dead window, AuxK, init;
  autocast per the trainer default), driven step by step as `Trainer.fit` does;
- sparsify: `SparseCoder` with its trainer's defaults: signum wrapped in schedule-free (momentum 0.95) at
  5e-3 / sqrt(latents / 2^14), AuxK off (auxk_alpha 0), b_dec = mean of the first batch, unit-norm decoder
  with the parallel gradient removed; evaluated at the schedule-free average (`optimizer.eval()`);
- SAELens (`--libs ... saelens`; slow on CPU): `TopKTrainingSAE` + `SAETrainer` at their defaults (Adam 3e-4,
  constant schedule, dead window 1000 steps, no autocast).

Extra saelab variants test hypotheses: `--variant NAME:field=value,...` sets TrainerConfig / TopKConfig
fields (and `lr_mult`, a factor on the default lr). `--saelab-variants batchtopk jumprelu ...` adds saelab's other
SAE variants at their defaults and their planted-data recipe (`scripts/bench_recovery.py`), at the rung's L0
(k, or target_l0 for the target-L0 variants); they report the SAE's inference encoder (BatchTopK: its threshold).
`ARCH:field=value;field=value` changes config fields of one of them (`matryoshka:group_fractions=[1.0]`).

Metrics, the same for every library, on a held-out window (`--heldout-rows`, batches never trained on):
FVU (float64), dead = latents that fire on none of those rows; MMCS and the fraction of planted features
whose best decoder row has cosine >= 0.9 (the JSON also splits it by frequency: the planted features' four
quarters, most frequent first). Also saelab's own training-time dead report. Wall time counts
training steps only (batches are generated once per step and fed to every library).
The data stream and the SAE initialisations use separate seeds (`--data-seed`, `--init-seed`), each expanded
into named streams (`saelab.core.seeds.derive_seed`: features, batch i, each library's init), so no two coincide;
saelab's variants start from the same init as its default run.

    python scripts/bench_scale.py --rungs 768s --json out.json           # CPU: a few minutes
    python scripts/bench_scale.py --rungs 768-gpu 2304-gpu --device cuda   # the GPU rungs
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchutil
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from saelab.core.seeds import derive_seed, generator
from saelab.sae.topk import TopKConfig
from saelab.sources.synthetic import power_law_frequencies
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer


@dataclass(frozen=True)
class Rung:
    """One shape of the ladder."""

    d_in: int
    features: int
    active: float
    latents: int
    k: int
    batch: int
    steps: int

    @property
    def label(self) -> str:
        return f"d{self.d_in} F{self.features} n{self.latents} k{self.k} B{self.batch} x{self.steps}"


RUNGS = {
    "64": Rung(64, 512, 6, 1024, 8, 2048, 300),
    "256xs": Rung(256, 2048, 24, 4096, 32, 1024, 300),
    "256": Rung(256, 4096, 16, 8192, 32, 2048, 300),
    "768xs": Rung(768, 2048, 24, 4096, 32, 1024, 300),
    "768s": Rung(768, 2048, 24, 4096, 32, 2048, 300),
    "768": Rung(768, 4096, 24, 8192, 32, 2048, 300),
    "768-gpu": Rung(768, 16384, 24, 32768, 32, 8192, 1200),
    "2304-gpu": Rung(2304, 32768, 48, 65536, 64, 4096, 2400),
}


class PlantedData:
    """Batches [batch, d_in] of planted features, generated sparsely (cost O(batch * active * d_in)).

    Batch i is a pure function of (seed, i); indices >= HELD_OUT are reserved for evaluation.
    """

    HELD_OUT = 10**7

    def __init__(self, rung: Rung, seed: int, device: torch.device):
        self.rung, self.seed, self.device = rung, seed, device
        gen = generator(seed, "bench_scale.features")
        dirs = torch.randn(rung.features, rung.d_in, generator=gen, dtype=torch.float64)
        self.features = F.normalize(dirs, dim=1).float().to(device)  # [features, d_in]
        self.frequencies = power_law_frequencies(rung.features, rung.active, 0.5).to(device)  # [features]
        self.scale = 1.0
        probe = torch.cat([self.batch(self.HELD_OUT - 1 - i) for i in range(4)])
        self.scale = math.sqrt(rung.d_in) / probe.norm(dim=1).mean().item()

    def batch(self, index: int) -> Tensor:
        """x [batch, d_in]: sum of active features times |N(0,1)| + 0.5, plus N(0, 0.01^2) noise, scaled."""
        r = self.rung
        gen = generator(self.seed, "bench_scale.batch", index, device=self.device)
        active = torch.rand(r.batch, r.features, generator=gen, device=self.device) < self.frequencies
        rows, cols = active.nonzero(as_tuple=True)
        magnitudes = torch.randn(cols.shape[0], generator=gen, device=self.device).abs() + 0.5
        offsets = torch.searchsorted(rows, torch.arange(r.batch, device=self.device))
        x = F.embedding_bag(cols, self.features, offsets, mode="sum", per_sample_weights=magnitudes)
        x += 0.01 * torch.randn(r.batch, r.d_in, generator=gen, device=self.device)
        return self.scale * x

    def held_out(self, rows: int) -> list[Tensor]:
        return [self.batch(self.HELD_OUT + i) for i in range(max(1, rows // self.rung.batch))]


class Library:
    """A training run: `step(x)` trains on one batch; `encode(x)` -> (values [B, k], indices [B, k]) and
    `decode(values, indices)` -> x_hat [B, d_in] for evaluation; `decoder()` -> [n, d_in]."""

    own_dead: float | None = None  # saelab's own report: silent for its dead window of training tokens
    silent_last: dict[int, float] | None = None  # saelab: fraction silent for the last N training rows
    lr: float = float("nan")

    def step(self, x: Tensor) -> None: ...

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def decode(self, values: Tensor, indices: Tensor) -> Tensor: ...

    def decoder(self) -> Tensor: ...

    def finish(self) -> None:
        """Called once after the last step, before evaluation."""


class Saelab(Library):
    def __init__(self, rung: Rung, first: Tensor, device: torch.device, overrides: dict) -> None:
        topk = TopKConfig(d_in=rung.d_in, d_sae=rung.latents, k=rung.k)
        self.trainer = benchutil.saelab_topk_trainer(
            topk, rung.steps * rung.batch, rung.batch, device, overrides, first
        )
        self.lr = self.trainer.lr

    def step(self, x: Tensor) -> None:
        self.trainer.train_step(x)
        self.trainer.periodic_checks()

    def finish(self) -> None:
        tracker = self.trainer.tracker
        self.own_dead = tracker.dead_fraction()
        self.silent_last = {
            rows: (tracker.tokens_since_fired >= rows).double().mean().item()
            for rows in (32768, tracker.window)
        }
        self.sae = self.trainer.inference_sae()

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.sae.encode_sparse(x)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        return self.sae.decode_sparse(values, indices)

    def decoder(self) -> Tensor:
        return self.sae.W_dec


class Sparsify(Library):
    def __init__(self, rung: Rung, first: Tensor, device: torch.device, overrides: dict) -> None:
        self.run = benchutil.SparsifyDefaults(rung.d_in, rung.k, rung.latents, first, device)
        self.sae, self.lr = self.run.sae, self.run.lr

    def step(self, x: Tensor) -> None:
        self.run.step(x)

    def finish(self) -> None:
        self.run.average()

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.sae.encode(x)
        return out.top_acts, out.top_indices

    @torch.no_grad()
    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        return self.sae.decode(values, indices)

    def decoder(self) -> Tensor:
        return self.sae.W_dec


class SAELens(Library):
    def __init__(self, rung: Rung, first: Tensor, device: torch.device, overrides: dict) -> None:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        self.sae = TopKTrainingSAE(
            TopKTrainingSAEConfig(d_in=rung.d_in, d_sae=rung.latents, k=rung.k, device=str(device))
        )
        cfg = SAETrainerConfig(
            total_training_samples=rung.steps * rung.batch,
            train_batch_size_samples=rung.batch,
            lr_end=3e-5,  # what its runner config's post-init sets (lr / 10); unused by the constant schedule
            device=str(device),
            logger=LoggingConfig(log_to_wandb=False),
        )
        self.lr = cfg.lr
        self.trainer = SAETrainer(cfg, self.sae, data_provider=iter([first]))

    def step(self, x: Tensor) -> None:
        self.trainer.step(x)
        self.trainer.n_training_steps += 1  # what SAETrainer.fit does after each step

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.sae.encode(x).topk(self.sae.cfg.k, dim=1)

    @torch.no_grad()
    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        z = torch.zeros(values.shape[0], self.sae.cfg.d_sae, device=values.device).scatter_(
            1, indices, values
        )
        return self.sae.decode(z)

    def decoder(self) -> Tensor:
        return self.sae.W_dec


class SaelabVariant(Library):
    """Another saelab variant (`overrides["architecture"]`) at its defaults and planted-data recipe, with the rung's
    k as its L0 and then `overrides["settings"]` (config fields); trained by `Trainer.train_step` as `Trainer.fit`
    does."""

    def __init__(self, rung: Rung, first: Tensor, device: torch.device, overrides: dict) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_recovery import build

        settings = dict(overrides.get("settings", {}))
        sae = build(
            str(overrides["architecture"]),
            rung.d_in,
            rung.latents,
            rung.k,
            int(overrides["seed"]),
            overrides=settings,
        )
        cfg = TrainerConfig(
            total_tokens=rung.steps * rung.batch, batch_size=rung.batch, device=str(device), log_every=10**9
        )
        self.trainer = Trainer(sae, cfg)
        self.trainer.prepare(first)
        self.lr = self.trainer.lr

    def step(self, x: Tensor) -> None:
        self.trainer.train_step(x)
        self.trainer.periodic_checks()

    def finish(self) -> None:
        self.own_dead = self.trainer.inference_tracker.dead_fraction()
        self.sae = self.trainer.inference_sae()

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The inference codes as (values [B, w], indices [B, w]), w the batch's largest row L0."""
        z = self.sae.encode(x)
        width = max(int((z != 0).sum(dim=1).max()), 1)
        return z.topk(width, dim=1)

    @torch.no_grad()
    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        z = torch.zeros(values.shape[0], self.sae.d_sae, device=values.device).scatter_(1, indices, values)
        return self.sae.decode(z)

    def decoder(self) -> Tensor:
        return self.sae.W_dec


LIBRARIES: dict[str, Callable[..., Library]] = {
    "saelab": Saelab,
    "sparsify": Sparsify,
    "saelens": SAELens,
    "saelab_variant": SaelabVariant,
}


def parse_variant_settings(text: str) -> tuple[str, dict[str, Any]]:
    """`ARCH` or `ARCH:field=value;field=value` (config fields of ARCH, values read as bench_recovery's `--set`
    reads them, e.g. `matryoshka:group_fractions=[0.5, 0.5]`) -> (ARCH, settings)."""
    arch, _, fields = text.partition(":")
    items = [item.strip() for item in fields.split(";") if item.strip()]
    if any(not key.strip() or not sep for key, sep, _ in (item.partition("=") for item in items)):
        raise SystemExit(f"--saelab-variants {text!r}: write each setting as field=value, separated by ';'.")
    return arch, OmegaConf.to_container(OmegaConf.from_dotlist(items))


@torch.no_grad()
def best_cosines(features: Tensor, decoder: Tensor, chunk: int = 8192) -> Tensor:
    """For each planted feature [F, d], its max cosine with any decoder row [n, d]; [F], float32 on the
    device (float64 on the CPU would take hours at the GPU rungs' 32k x 65k x 2304)."""
    rows = F.normalize(decoder, dim=1)
    best = torch.full((features.shape[0],), -1.0, device=features.device)
    for start in range(0, rows.shape[0], chunk):
        best = torch.maximum(best, (features @ rows[start : start + chunk].T).max(dim=1).values)
    return best


@torch.no_grad()
def evaluate(lib: Library, data: PlantedData, held_out: list[Tensor]) -> dict[str, float]:
    """Held-out FVU and dead fraction (no fire on any held-out row), MMCS and recovered at cos 0.9."""
    n = lib.decoder().shape[0]
    fires = torch.zeros(n, dtype=torch.long, device=data.device)
    error = total = 0.0
    mean = torch.cat(held_out).double().mean(0)
    for x in held_out:
        values, indices = lib.encode(x)
        x_hat = lib.decode(values, indices)
        fires.index_add_(0, indices.reshape(-1), (values > 0).reshape(-1).long())
        error += (x.double() - x_hat.double()).pow(2).sum().item()
        total += (x.double() - mean).pow(2).sum().item()
    best = best_cosines(data.features, lib.decoder().detach().float())
    recovered = (best >= 0.9).double()
    return {
        "mmcs": best.mean().item(),
        "recovered": recovered.mean().item(),
        # the features are in decreasing order of frequency: recovery of each quarter, most frequent first
        "recovered_by_frequency_quarter": [part.mean().item() for part in recovered.chunk(4)],
        "fvu": error / total,
        "dead_heldout": (fires == 0).double().mean().item(),
        "l0": (fires.sum() / (len(held_out) * held_out[0].shape[0])).item(),
    }


def run_rung(rung: Rung, runs: dict[str, tuple[str, dict]], args: argparse.Namespace, device) -> dict:
    """Train every run on the same batches, one step each in turn; returns metrics per run."""
    data = PlantedData(rung, args.data_seed, device)
    first = data.batch(0)
    libs: dict[str, Library] = {}
    for name, (kind, overrides) in runs.items():
        # Each library's init stream (its variants share it: ablations start from the same weights); the
        # peers draw from torch's global generator.
        torch.manual_seed(derive_seed(args.init_seed, f"bench_scale.init.{kind}"))
        libs[name] = LIBRARIES[kind](rung, first, device, overrides)
    seconds = dict.fromkeys(libs, 0.0)
    data_s = 0.0
    for step in range(rung.steps):
        start = time.perf_counter()
        x = data.batch(step)
        benchutil.sync(device)
        data_s += time.perf_counter() - start
        for name, lib in libs.items():
            start = time.perf_counter()
            lib.step(x)
            benchutil.sync(device)
            seconds[name] += time.perf_counter() - start
        if args.progress and (step + 1) % args.progress == 0:
            print(
                f"  step {step + 1}/{rung.steps}", {k: round(v) for k, v in seconds.items()}, file=sys.stderr
            )
    held_out = data.held_out(args.heldout_rows)
    results = {}
    for name, lib in libs.items():
        lib.finish()
        results[name] = {
            "lr": lib.lr,
            **evaluate(lib, data, held_out),
            "own_dead": lib.own_dead,
            "silent_last_rows": lib.silent_last,
            "wall_s": seconds[name],
        }
    return {"rung": dataclasses.asdict(rung), "label": rung.label, "data_s": data_s, "runs": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rungs", nargs="+", default=["64", "256", "768s"], help=f"names from {sorted(RUNGS)}")
    p.add_argument("--steps", type=int, default=0, help="override every rung's step count")
    p.add_argument("--latents", type=int, default=0, help="override every rung's SAE width")
    p.add_argument("--batch", type=int, default=0, help="override every rung's batch size (rows per step)")
    p.add_argument("--libs", nargs="+", default=["saelab", "sparsify"], choices=sorted(LIBRARIES))
    p.add_argument("--variant", nargs="*", default=[], help="extra saelab runs: NAME:field=value,...")
    p.add_argument(
        "--saelab-variants",
        nargs="*",
        default=[],
        help="saelab's other SAE variants at their defaults: ARCH, or ARCH:field=value;field=value (YAML values)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--heldout-rows", type=int, default=32768)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--init-seed", type=int, default=1)
    p.add_argument("--progress", type=int, default=0, help="print wall times every this many steps")
    p.add_argument("--json")
    args = p.parse_args()
    device = benchutil.setup_peer_device(args.device, args.threads)
    runs: dict[str, tuple[str, dict]] = {name: (name, {}) for name in args.libs}
    for text in args.variant:
        name, overrides = benchutil.parse_variant(text)
        runs[f"saelab[{name}]"] = ("saelab", overrides)
    for text in args.saelab_variants:
        arch, settings = parse_variant_settings(text)
        runs[f"saelab {text}"] = (
            "saelab_variant",
            {"architecture": arch, "seed": args.init_seed, "settings": settings},
        )
    results = []
    for name in args.rungs:
        rung = RUNGS[name]
        overrides = {"steps": args.steps, "latents": args.latents, "batch": args.batch}
        rung = dataclasses.replace(rung, **{k: v for k, v in overrides.items() if v})
        print(f"rung {rung.label}", file=sys.stderr, flush=True)
        result = run_rung(rung, runs, args, device)
        results.append(result)
        rows = [
            [
                lib,
                f"{r['lr']:.2e}",
                f"{r['mmcs']:.3f}",
                f"{100 * r['recovered']:.1f}%",
                f"{r['fvu']:.3f}",
                f"{100 * r['dead_heldout']:.1f}%",
                "-" if r["own_dead"] is None else f"{100 * r['own_dead']:.1f}%",
                f"{r['wall_s']:.0f}",
            ]
            for lib, r in result["runs"].items()
        ]
        print(
            f"\n{rung.label} ({rung.batch * rung.steps / 1e6:.2f}M tokens; batch generation {result['data_s']:.0f} s)"
        )
        print("| run | lr | MMCS | recovered @0.9 | FVU | dead held-out | dead (own report) | wall s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            print("| " + " | ".join(row) + " |", flush=True)
    benchutil.write_report(
        args.json,
        "bench_scale",
        device,
        variants={name: spec for name, spec in runs.items()},
        results=results,
    )


if __name__ == "__main__":
    main()

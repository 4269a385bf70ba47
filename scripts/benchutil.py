"""Shared helpers of the benchmark scripts: devices, interleaved timing, the encoder-matmul floor, peak-memory
probes in fresh processes, sparsify trained at its own defaults, and table + JSON output."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.table import Table

from saelab.core.atomic import atomic_file
from saelab.core.seeds import generator
from saelab.kernels.backend import CHOICES
from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

#: Prefix of the single stdout line a memory probe prints.
PROBE_TAG = "PEAK_MEMORY_JSON "


class Activations:
    """Fresh synthetic batches [batch, d_in] drawn on the device: planted features as in `saelab.sources.synthetic`
    (uniform structure), scaled so that E||x|| = sqrt(d_in). Batch i is the same on every call."""

    HELD_OUT = 10**6  # batch indices from here on are never trained on

    def __init__(
        self, d_in: int, n_features: int, mean_active: float, batch: int, device: torch.device, seed: int = 0
    ):
        self.cfg = SyntheticConfig(d_in=d_in, n_features=n_features, mean_active=mean_active, seed=seed)
        source = SyntheticSource(self.cfg)
        self.batch_size, self.device = batch, device
        self.features = source.features.to(device)
        self.frequencies = source.frequencies.to(device)
        self.scale = 1.0
        self.scale = math.sqrt(d_in) / self.batch(self.HELD_OUT - 1).norm(dim=1).mean().item()

    def batch(self, index: int) -> torch.Tensor:
        cfg, device = self.cfg, self.device
        gen = generator(cfg.seed, "synthetic.batch", index, device=device)
        shape = (self.batch_size, cfg.n_features)
        active = torch.rand(shape, generator=gen, device=device) < self.frequencies
        magnitudes = cfg.min_magnitude + (cfg.max_magnitude - cfg.min_magnitude) * torch.rand(
            shape, generator=gen, device=device
        )
        noise = torch.randn(self.batch_size, cfg.d_in, generator=gen, device=device)
        return self.scale * ((active * magnitudes) @ self.features + cfg.noise_std * noise)

    def held_out(self, count: int) -> list[torch.Tensor]:
        return [self.batch(self.HELD_OUT + i) for i in range(count)]


def setup_device(name: str, threads: int) -> torch.device:
    """'auto' -> cuda if available else cpu; threads > 0 sets torch's CPU thread count."""
    if threads > 0:
        torch.set_num_threads(threads)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but CUDA is not available; use --device cpu.")
    return torch.device(name)


def setup_peer_device(name: str, threads: int) -> torch.device:
    """`setup_device` for scripts that run the peer libraries: wandb off unless asked for, and on CPU sparsify's
    eager decoder (it picks its Triton decoder whenever Triton imports, which needs CUDA)."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    device = setup_device(name, threads)
    if device.type == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    return device


TRAINER_FIELDS = {f.name for f in dataclasses.fields(TrainerConfig)}
TOPK_FIELDS = {f.name for f in dataclasses.fields(TopKConfig)}


def parse_variant(text: str) -> tuple[str, dict[str, float | int | str]]:
    """`NAME:field=value,...` (TrainerConfig / TopKConfig fields; `lr_mult`, a factor on the default lr; `init`,
    one of INIT_ABLATIONS) -> (NAME, overrides)."""
    name, _, fields = text.partition(":")
    out: dict[str, float | int | str] = {}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition("=")
        if key not in TRAINER_FIELDS | TOPK_FIELDS | {"lr_mult", "init"}:
            raise SystemExit(
                f"--variant field {key!r} is not a TrainerConfig/TopKConfig field, lr_mult or init."
            )
        if key == "init" and value not in INIT_ABLATIONS:
            raise SystemExit(f"--variant init={value!r}: choose one of {sorted(INIT_ABLATIONS)}.")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return name, out


@torch.no_grad()
def untie_encoder(sae: TopKSAE, first: torch.Tensor, init: torch.Generator | None) -> None:
    """Ablation: replace the tied encoder by independent random unit columns (drawn from `init`, which drew the
    decoder before), scaled as the trainer's init scaled the tied ones (its least-squares factor)."""
    scale = sae.W_enc.norm(dim=0, keepdim=True)  # [1, n]
    fresh = torch.randn(sae.d_in, sae.d_sae, generator=init).to(sae.W_enc.device)
    sae.W_enc.copy_(fresh / fresh.norm(dim=0, keepdim=True) * scale)


@torch.no_grad()
def unscale_encoder(sae: TopKSAE, first: torch.Tensor, init: torch.Generator | None) -> None:
    """Ablation: undo the least-squares scale of the tied encoder (unit columns, b_enc 0)."""
    sae.W_enc.div_(sae.W_enc.norm(dim=0, keepdim=True))
    sae.b_enc.zero_()


@torch.no_grad()
def mean_decoder_bias(sae: TopKSAE, first: torch.Tensor, init: torch.Generator | None) -> None:
    """Ablation: b_dec = the mean of the first (normalised) batch instead of its geometric median."""
    sae.b_dec.copy_(first.mean(0))


#: `init=NAME` variants: a change applied right after `Trainer.prepare` (saelab's init: tied weights, b_dec =
#: geometric median of the first batch, encoder scaled to the least-squares fit; `saelab.sae.topk`).
INIT_ABLATIONS: dict[str, Callable[[TopKSAE, torch.Tensor, torch.Generator | None], None]] = {
    "untied": untie_encoder,
    "unscaled": unscale_encoder,
    "mean_bias": mean_decoder_bias,
}


def saelab_topk_trainer(
    topk: TopKConfig,
    tokens: int,
    batch: int,
    device: torch.device,
    overrides: dict[str, Any],
    first: torch.Tensor,
    init: torch.Generator | None = None,
) -> Trainer:
    """saelab's TopK `Trainer` with only total_tokens and batch_size set, then `overrides` (`parse_variant`)
    applied to the SAE config, the trainer config, the default lr and the init; prepared on `first` [B, d_in]."""
    over = dict(overrides)
    lr_mult = float(over.pop("lr_mult", 1.0))
    ablation = over.pop("init", None)
    topk = dataclasses.replace(topk, **{k: v for k, v in over.items() if k in TOPK_FIELDS})
    sae = TopKSAE(topk, init)
    cfg = TrainerConfig(total_tokens=tokens, batch_size=batch, device=str(device), log_every=10**9)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if k in TRAINER_FIELDS})
    if lr_mult != 1.0:
        cfg = dataclasses.replace(cfg, lr=lr_mult * (cfg.lr or sae.default_lr(batch)))
    trainer = Trainer(sae, cfg)
    first = trainer.prepare(first)
    if ablation is not None:
        INIT_ABLATIONS[str(ablation)](trainer.sae, first * trainer.input_scale, init)
    return trainer


class SparsifyDefaults:
    """sparsify's `SparseCoder` trained as its `Trainer` does by default, one `step(x [B, d_in])` at a time:
    signum in schedule-free (momentum 0.95) at 5e-3 / sqrt(latents / 2^14), AuxK off, b_dec = the mean of the
    first batch, unit-norm decoder with the gradient parallel to it removed. Its init draws from torch's global
    generator (seed it first). `average()` switches to the schedule-free average, which its trainer saves as
    is (decoder rows not renormalised)."""

    def __init__(self, d_in: int, k: int, latents: int, first: torch.Tensor, device: torch.device) -> None:
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.sign_sgd import SignSGD

        self.sae = SparseCoder(d_in, SparseCoderConfig(k=k, num_latents=latents), device, dtype=torch.float32)
        self.sae.b_dec.data = first.mean(0).to(device, self.sae.dtype)
        self.lr = 5e-3 / math.sqrt(latents / 2**14)
        self.optimizer = ScheduleFreeWrapper(
            SignSGD([{"params": self.sae.parameters(), "lr": self.lr}]), momentum=0.95
        )
        self.optimizer.train()

    def step(self, x: torch.Tensor) -> None:
        sae = self.sae
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x.to(sae.device, sae.dtype), dead_mask=None)  # auxk_alpha defaults to 0: no AuxK
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def average(self) -> None:
        self.optimizer.eval()


def device_name(device: torch.device) -> str:
    """Human-readable device, e.g. 'NVIDIA H100 80GB HBM3' or 'CPU (AMD EPYC), 2 threads of 2 cores'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        model = names[0] if names else model
    threads = torch.get_num_threads()
    return f"CPU ({model}), {threads} thread{'s' if threads > 1 else ''} of {psutil.cpu_count()} cores"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    runs: dict[str, Callable[[], None]], rounds: int, device: torch.device, first: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each run, over `rounds` rounds that call every run once in a rotating order
    (round r starts at run number first + r), so that load changes on a shared machine hit all alike."""
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(first, first + rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = time.perf_counter()
            runs[name]()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def encoder_matmul(
    batch: int, d_in: int, n: int, device: torch.device, dtype: torch.dtype
) -> Callable[[], None]:
    """A call of the encoder's [batch, d_in] x [d_in, n] product (2 * batch * d_in * n FLOPs), the floor."""
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, d_in, device=device, dtype=dtype, generator=gen)
    w = torch.randn(d_in, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(batch, n, device=device, dtype=dtype)

    def matmul() -> None:
        torch.mm(x, w, out=out)

    return matmul


def current_memory(device: torch.device) -> int:
    """Bytes in use now: CUDA tensor memory, or the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return psutil.Process().memory_info().rss


def reset_peak_memory(device: torch.device) -> None:
    """Restart the high-water mark: CUDA allocator stats, or Linux's peak resident set (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as err:
        raise SystemExit(
            f"CPU peak-memory probes need Linux's /proc/self/clear_refs ({err}); pass --no-memory."
        ) from err


def peak_memory(device: torch.device) -> int:
    """Bytes at the high-water mark since `reset_peak_memory`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status; pass --no-memory.")


def report_probe(extra_bytes: int) -> None:
    """Print a memory probe's result for `run_probe` to parse."""
    print(PROBE_TAG + json.dumps({"peak_bytes": extra_bytes}), flush=True)


def run_probe(script: str, args: list[str]) -> float | None:
    """Run `python script *args` in a fresh process and return its reported peak memory in MiB."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(PROBE_TAG):
            return json.loads(line[len(PROBE_TAG) :])["peak_bytes"] / 2**20
    print(f"memory probe {args} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[str(v) for v in row])
    Console().print(table)


def write_report(path: str | None, benchmark: str, device: torch.device, **results: Any) -> None:
    """`write_json` of the results under a header naming the benchmark, device, torch version, date, command
    and the kernel choices set in the environment (`saelab.kernels.backend.CHOICES`)."""
    header = {
        "benchmark": benchmark,
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "kernel_env": {name: os.environ[name] for name in CHOICES if name in os.environ},
    }
    write_json(path, {**header, **results})


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Print the JSON and, if `path` is given, write it there atomically."""
    text = json.dumps(payload, indent=2)
    print(text)
    if path:
        with atomic_file(path) as tmp:
            tmp.write_text(text + "\n")

"""Transcoders: planted-pair recovery per variant with and without skip, against sparsify's transcoder, and
CE loss recovered on SmolLM2's block-6 MLP against an SAE of the same width and L0 (BENCHMARKS.md "Transcoders").

Planted pairs (`saelab.sources.pairs`): sparse codes a drive x = a F + noise and y = a G + x L^T (a planted
linear part of relative size `--linear-scale`). Every run reads the same batches for the same tokens:

- saelab: each transcodable variant as `<variant>_transcoder` and `<variant>_skip_transcoder` (skip_init from
  `--skip-inits`), built and trained with saelab's defaults (`Trainer`, default learning rate), k = `--k` for the
  TopK family (ReLU, JumpReLU and gated set their own L0 through their sparsity penalty);
- sparsify: `SparseCoder(transcode=True)` (and `skip_connection=True`) at its trainer's defaults: signum in
  schedule-free, lr 5e-3 / sqrt(latents / 2^14), zero decoder, encoder bias centring the first batch's mean
  input, b_dec = the first batch's mean output, free decoder norms, no AuxK (sparsify's transcoders need d_out
  = d_in, so both sizes use d_out = d_in).

`--lr-mult` and `--override FIELD=VALUE` change the saelab runs' rate and config (the tuning runs of
BENCHMARKS.md); `--decoder-init random` ablates saelab's data-dependent transcoder init (decoder rows from the first batch's
codes, least-squares code scale): decoder rows stay at the variant's random init.

Scored on `--eval-rows` held-out pairs (batch indices from 10^6, never trained on): FVU of y, L0, dead fraction
(latents silent on all of them), recovery of G by the decoder rows and of F by the encoder columns (MMCS, the
mean over planted features of the best cosine, and the fraction found at cosine >= 0.9). With a skip term the
sparse part can trade any linear map M of x with the skip (decoder rows G_i - F_i M^T fit equally well), so skip
runs also report recovery of G_skip = G + F (L - W_skip)^T, the rows the decoder must hold given its skip.

Real model (`--real CACHE`, a `saelab harvest` cache holding `--input-hook` and `--output-hook`): a TopK
transcoder from the MLP's input to its output and a TopK SAE on the output, same width, k and tokens, both
spliced into the model on text after the cache's (`saelab.eval.evaluate`): CE loss recovered against zero- and
mean-ablating the MLP output.

    python scripts/bench_transcoders.py --threads 1 --json transcoders.json
    saelab harvest source=smollm2 source.backend=hf output_dir=caches/mlp6 \\
        hook_names='[model.layers.6.mlp:input,model.layers.6.mlp]' total_tokens=600000
    python scripts/bench_transcoders.py --real caches/mlp6 --real-tokens 400000 --json transcoders_real.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import benchutil
import torch
from torch import Tensor

from saelab.core.seeds import generator
from saelab.sae import build_sae
from saelab.sae.base import SAE
from saelab.sae.transcoder import TRANSCODABLE, Transcoder, resolve_for_data, transcoder_class
from saelab.sources.pairs import PairsConfig, PairsSource
from saelab.sources.synthetic import recovery_metrics
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

SIZES = {  # name: (d_in = d_out, planted features, latents)
    "small": (32, 256, 512),
    "medium": (64, 512, 1024),
}
HELD_OUT = 10**6
VARIANTS = sorted(cls.architecture for cls in TRANSCODABLE)


@dataclasses.dataclass
class Setting:
    size: str
    d: int
    features: int
    latents: int
    k: int
    batch: int
    tokens: int
    linear_scale: float
    data_seed: int
    init_seed: int

    @property
    def steps(self) -> int:
        return self.tokens // self.batch


def planted(s: Setting) -> PairsSource:
    return PairsSource(
        PairsConfig(d_in=s.d, d_out=s.d, n_features=s.features, linear_scale=s.linear_scale, seed=s.data_seed)
    )


def saelab_run(
    s: Setting, source: PairsSource, variant: str, skip: bool, skip_init: str, lr_mult: float = 1.0,
    overrides: dict[str, float] | None = None,
) -> tuple[SAE, float]:  # fmt: skip
    """Train one saelab transcoder at its defaults (or with config `overrides` and lr_mult times its default
    rate); returns (transcoder on raw pairs, base lr)."""
    cls = transcoder_class(variant, skip)
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    fields: dict[str, Any] = {"d_sae": s.latents, **({"k": s.k} if "k" in names else {})}
    fields.update({k: v for k, v in (overrides or {}).items() if k in names})
    if skip:
        fields["skip_init"] = skip_init
    cfg = resolve_for_data(cls.config_class(**fields), s.d, s.d)
    sae = build_sae(cfg, generator(s.init_seed, "sae.init"))
    lr = lr_mult * sae.default_lr(s.batch)
    trainer = Trainer(sae, TrainerConfig(total_tokens=s.tokens, batch_size=s.batch, device="cpu", lr=lr))
    result = trainer.fit(source)
    return result.sae, result.base_lr


class SparsifyTranscoder:
    """sparsify's `SparseCoder(transcode=True)` trained as its `Trainer` does by default (module docstring)."""

    def __init__(self, s: Setting, skip: bool, first: Tensor) -> None:
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.sign_sgd import SignSGD

        torch.manual_seed(s.init_seed)  # SparseCoder draws its init from torch's global generator
        cfg = SparseCoderConfig(k=s.k, num_latents=s.latents, transcode=True, skip_connection=skip)
        self.sae = SparseCoder(s.d, cfg, "cpu", dtype=torch.float32)
        x, y = first[:, : s.d], first[:, s.d :]
        with torch.no_grad():  # sparsify's trainer at step 0: centred pre-activations, b_dec = mean output
            self.sae.encoder.bias.copy_(-x.mean(0) @ self.sae.encoder.weight.T)
            self.sae.b_dec.copy_(y.mean(0))
        self.lr = 5e-3 / math.sqrt(s.latents / 2**14)
        self.optimizer = ScheduleFreeWrapper(
            SignSGD([{"params": self.sae.parameters(), "lr": self.lr}]), momentum=0.95
        )
        self.optimizer.train()

    def step(self, rows: Tensor) -> None:
        d = self.sae.d_in
        out = self.sae(rows[:, :d], rows[:, d:], dead_mask=None)
        out.fvu.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def finish(self, folder_root: Path) -> SAE:
        """The schedule-free average, saved in sparsify's format and loaded with saelab's reader."""
        from saelab import load_sae

        self.optimizer.eval()
        folder = folder_root / "layers.0.mlp"
        self.sae.save_to_disk(folder)
        return load_sae(folder)


def sparsify_run(s: Setting, source: PairsSource, skip: bool, tmp: Path) -> tuple[SAE, float]:
    batches = source.batches(s.batch)
    first = next(batches)
    run = SparsifyTranscoder(s, skip, first)
    run.step(first)
    for _ in range(s.steps - 1):
        run.step(next(batches))
    return run.finish(tmp), run.lr


@torch.no_grad()
def score(sae: SAE, source: PairsSource, rows: int) -> dict[str, float]:
    """FVU of y, L0 and dead fraction on held-out pairs; recovery of G, F (and G given the skip)."""
    x, y = (
        torch.cat(t)
        for t in zip(*(source.pair(HELD_OUT + i, 4096) for i in range(rows // 4096)), strict=True)
    )
    z = torch.cat([sae.encode(part) for part in x.split(4096)])
    y_hat = torch.cat([sae(part) for part in x.split(4096)])
    fvu = float((y - y_hat).double().pow(2).sum() / (y - y.mean(0)).double().pow(2).sum())
    out = {
        "fvu": fvu,
        "l0": float((z != 0).sum(1).double().mean()),
        "dead": float(((z != 0).sum(0) == 0).double().mean()),
        **{f"G_{k}": v for k, v in recovery_metrics(source.features, sae.W_dec).items()},
        **{f"F_{k}": v for k, v in recovery_metrics(source.input_features, sae.W_enc.T).items()},
    }
    if getattr(sae, "has_skip", False):
        linear = source.linear if source.linear is not None else torch.zeros_like(sae.W_skip)
        g_skip = source.features + source.input_features @ (linear - sae.W_skip).T
        out.update({f"Gskip_{k}": v for k, v in recovery_metrics(g_skip, sae.W_dec).items()})
    return out


def planted_runs(args: argparse.Namespace) -> list[tuple[str, str | None, bool, str]]:
    """(name, saelab variant or None for sparsify, skip, skip_init) of every run of a size."""
    runs: list[tuple[str, str | None, bool, str]] = []
    for variant in args.variants:
        runs.append((f"{variant}_transcoder", variant, False, "zero"))
        runs += [(f"{variant}_skip_transcoder[{init}]", variant, True, init) for init in args.skip_inits]
    if args.sparsify:
        runs += [
            (f"sparsify transcoder{' +skip' if skip else ''}", None, skip, "zero") for skip in (False, True)
        ]
    return runs


def planted_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for size in args.sizes:
        d, features, latents = SIZES[size]
        s = Setting(size, d, features, latents, args.k, args.batch, args.tokens, args.linear_scale, args.data_seed,
                    args.init_seed)  # fmt: skip
        source = planted(s)
        for name, variant, skip, skip_init in planted_runs(args):
            start = time.perf_counter()
            if variant is None:
                sae, lr = sparsify_run(s, source, skip, Path(tempfile.mkdtemp()))
            else:
                sae, lr = saelab_run(s, source, variant, skip, skip_init, args.lr_mult, args.override)
            seconds = time.perf_counter() - start
            row = {
                "size": size,
                "run": name,
                "lr": lr,
                "seconds": seconds,
                **score(sae, source, args.eval_rows),
            }
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            results.append(row)
    return results


def print_planted(results: list[dict[str, Any]]) -> None:
    columns = [
        "size",
        "run",
        "fvu",
        "l0",
        "dead",
        "G mmcs",
        "G >=0.9",
        "G|skip >=0.9",
        "F mmcs",
        "F >=0.9",
        "s",
    ]
    rows = [
        [r["size"], r["run"], f"{r['fvu']:.3f}", f"{r['l0']:.1f}", f"{r['dead']:.3f}", f"{r['G_mmcs']:.3f}",
         f"{r['G_frac_recovered']:.3f}", f"{r['Gskip_frac_recovered']:.3f}" if "Gskip_mmcs" in r else "-",
         f"{r['F_mmcs']:.3f}", f"{r['F_frac_recovered']:.3f}", f"{r['seconds']:.0f}"]
        for r in results
    ]  # fmt: skip
    benchutil.print_table(
        "Transcoders on planted pairs (held-out FVU of y; recovery of G and F)", columns, rows
    )


def real_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    """A TopK transcoder (and skip transcoder) from the MLP's input to its output against a TopK SAE on the output,
    same width, k and training tokens from the cache; each spliced into the live model on held-out text."""
    from bench_real import heldout_start_batch

    from saelab.buffer.cache import ActivationCache
    from saelab.eval.config import EvalConfig
    from saelab.eval.evaluate import evaluate
    from saelab.harvest.config import ModelSourceConfig
    from saelab.sae.topk import TopKSAE
    from saelab.sources.harvested import CacheSource, CacheSourceConfig, ModelSource

    cache = ActivationCache(args.real)
    recorded = cache.manifest.get("config", {})
    names = {f.name for f in dataclasses.fields(ModelSourceConfig)} - {"hook_name", "target_hook", "device"}
    model_fields = {k.removeprefix("source."): v for k, v in recorded.items() if k.startswith("source.")}
    model_fields = {k: v for k, v in model_fields.items() if k in names}
    pair = CacheSourceConfig(path=args.real, hook_name=args.input_hook, target_hook=args.output_hook)
    single = CacheSourceConfig(path=args.real, hook_name=args.output_hook)
    runs = [
        ("topk_transcoder", transcoder_class("topk"), pair),
        ("topk_skip_transcoder", transcoder_class("topk", True), pair),
        ("topk SAE on the output", TopKSAE, single),
    ]
    start = heldout_start_batch(cache, args.lm_batch_size)
    eval_cfg = EvalConfig(
        total_tokens=args.eval_tokens, lm_batch_size=args.lm_batch_size, start_batch=start,
        cooccurrence_latents=0, plots=False,
    )  # fmt: skip
    live: dict[bool, ModelSource] = {}
    results = []
    for name, cls, source_cfg in runs:
        source = CacheSource(source_cfg)
        fields = {"d_sae": args.real_latents, "k": args.k_real, "metadata": source.metadata()}
        cfg = resolve_for_data(cls.config_class(**fields), source.d_in, source.d_out)
        sae = build_sae(cfg, generator(args.init_seed, "sae.init"))
        started = time.perf_counter()
        trainer = Trainer(
            sae, TrainerConfig(total_tokens=args.real_tokens, batch_size=args.real_batch, device="cpu")
        )
        trained = trainer.fit(source).sae
        seconds = time.perf_counter() - started
        transcoder = cls is not TopKSAE
        if transcoder not in live:
            hooks = (
                {"hook_name": args.input_hook, "target_hook": args.output_hook}
                if transcoder
                else {"hook_name": args.output_hook}
            )
            live[transcoder] = ModelSource(ModelSourceConfig(**model_fields, **hooks), torch.device("cpu"))
        report = evaluate(trained, live[transcoder], eval_cfg).report
        row = {"run": name, "latents": args.real_latents, "k": args.k_real, "train_seconds": seconds,
               "fvu": report["reconstruction"]["fvu"], "l0": report["reconstruction"]["l0"],
               "dead": report["dead"]["dead_frac"], **{k: report["lm"][k] for k in report["lm"]},
               "held_out": report["data"]["held_out"]}  # fmt: skip
        print(row, flush=True)
        results.append(row)
    mean = next(
        r["ce_mean"] for r in results if "ce_mean" in r
    )  # the transcoders' mean ablation of the output
    for r in results:  # every run's CE recovered against it (the SAE's own report has the zero baseline only)
        r["ce_loss_score_mean"] = (mean - r["ce_sae"]) / (mean - r["ce_clean"])
    return results


def print_real(results: list[dict[str, Any]]) -> None:
    columns = ["run", "FVU of y", "L0", "dead", "CE clean", "CE spliced", "CE zero", "CE mean", "recovered (zero)",
               "recovered (mean)", "train s"]  # fmt: skip
    rows = [
        [r["run"], f"{r['fvu']:.3f}", f"{r['l0']:.1f}", f"{r['dead']:.3f}", f"{r['ce_clean']:.3f}",
         f"{r['ce_sae']:.3f}", f"{r['ce_zero']:.3f}", f"{r.get('ce_mean', float('nan')):.3f}",
         f"{r['ce_loss_score']:.3f}", f"{r['ce_loss_score_mean']:.3f}", f"{r['train_seconds']:.0f}"]
        for r in results
    ]  # fmt: skip
    benchutil.print_table("SmolLM2 block-6 MLP: transcoder vs SAE on the output, spliced in", columns, rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--skip-inits", nargs="*", default=["zero", "lstsq"], choices=["zero", "lstsq"])
    parser.add_argument("--no-sparsify", dest="sparsify", action="store_false")
    parser.add_argument(
        "--decoder-init", default="data", choices=["data", "random"],
        help="random: an ablation of saelab's init, decoder rows left at the variant's random init and codes unscaled",
    )  # fmt: skip
    parser.add_argument("--tokens", type=int, default=500_000)
    parser.add_argument(
        "--lr-mult", type=float, default=1.0, help="saelab runs: this times their default rate"
    )
    parser.add_argument(
        "--override", nargs="*", default=[], metavar="FIELD=VALUE", help="saelab runs: config fields, e.g. l1_coefficient=5"
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--linear-scale", type=float, default=0.5)
    parser.add_argument("--eval-rows", type=int, default=32768)
    parser.add_argument("--data-seed", type=int, default=1)
    parser.add_argument("--init-seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--real", default=None, help="a saelab harvest cache: run the real-model part only")
    parser.add_argument("--input-hook", default="model.layers.6.mlp:input")
    parser.add_argument("--output-hook", default="model.layers.6.mlp")
    parser.add_argument("--real-tokens", type=int, default=131072)
    parser.add_argument("--real-batch", type=int, default=1024)
    parser.add_argument("--real-latents", type=int, default=2304)
    parser.add_argument("--k-real", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--lm-batch-size", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.override = {k: float(v) for k, _, v in (item.partition("=") for item in args.override)}
    device = benchutil.setup_peer_device("cpu", args.threads)
    if args.real:
        results = real_part(args)
        print_real(results)
        benchutil.write_report(args.json, "bench_transcoders", device, real=results, settings=vars(args))
        return
    if args.decoder_init == "random":  # the ablation: skip the two data-dependent steps of the init
        Transcoder.init_decoder_from_codes = lambda self, codes, residual: None
        Transcoder.scale_encoder_to_fit = lambda self, target, decoded: None
    results = planted_part(args)
    print_planted(results)
    benchutil.write_report(args.json, "bench_transcoders", device, planted=results, settings=vars(args))


if __name__ == "__main__":
    main()

"""Absorption, sparse probing and core metrics, each with its random baselines, for SAEs trained on one
harvested cache: saelab's (trained with `saelab train -m ... sae=topk,batchtopk,jumprelu`) and two peers'
(trained here on the same cache batches, saved in their own formats, loaded with `saelab.load_sae`).

    saelab harvest source=smollm2 output_dir=CACHE 'hook_names=[blocks.6.hook_resid_post]' total_tokens=393216
    saelab train -m source=cache source.path=CACHE sae=topk,batchtopk,jumprelu sae.d_sae=4608 \\
        trainer.total_tokens=262144 trainer.batch_size=4096 hydra.sweep.dir=SWEEP
    python scripts/bench_evals.py train-peers CACHE --out PEERS --tokens 262144 --batch 4096 --latents 4608 --k 32
    python scripts/bench_evals.py warm CACHE      # the probe datasets' activations, timed (once per model and hook)
    python scripts/bench_evals.py eval CACHE SAES... --suite core --out EVAL --json core.json
    python scripts/bench_evals.py eval CACHE SAES... --suite absorption sparse_probing --out EVAL --json probes.json
    python scripts/bench_evals.py show core.json probes.json      # the markdown table
    (SAES: SWEEP/0_*/sae SWEEP/1_*/sae SWEEP/2_*/sae PEERS/saelens PEERS/sparsify)

`train-peers`: SAELens's `TopKTrainingSAE` with its `SAETrainer` defaults (Adam 3e-4, constant rate) and
sparsify's `SparseCoder` with its trainer's defaults (`benchutil.SparsifyDefaults`), each stepping on the
cache's batches 0..steps-1 in order, as `saelab train source=cache` reads them.
`eval`: every SAE on the same held-out text (the contexts after the harvested ones) and the same probe
datasets (one model pass for all, cached on disk); per SAE the seconds of each metric; then the first SAE
again in a fresh process state with the probe cache warm (its probe metrics cost only the encode).
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402
from bench_real import heldout_start_batch, model_source_of  # noqa: E402

from saelab.buffer.cache import ActivationCache  # noqa: E402
from saelab.core.atomic import atomic_directory  # noqa: E402
from saelab.core.seeds import derive_seed  # noqa: E402
from saelab.eval.config import AbsorptionConfig, EvalConfig, SparseProbingConfig  # noqa: E402
from saelab.eval.evaluate import evaluate, probe_session, write_report  # noqa: E402
from saelab.eval.frontier import report_point, write_frontier  # noqa: E402
from saelab.io.loading import load_sae  # noqa: E402
from saelab.sources.harvested import CacheSource, CacheSourceConfig  # noqa: E402


def train_peers(args: argparse.Namespace) -> None:
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # CPU: sparsify's eager decoder, not its Triton one
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cache = CacheSource(CacheSourceConfig(path=args.cache))
    steps = args.tokens // args.batch
    batches = cache.batches(args.batch, start_batch=0)
    first = next(batches)
    torch.manual_seed(derive_seed(args.seed, "bench_evals.saelens"))
    lens = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=cache.d_in, d_sae=args.latents, k=args.k, device="cpu"))
    lens_trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=steps * args.batch, train_batch_size_samples=args.batch, device="cpu", lr=3e-4,
            lr_end=3e-4,  # its default constant schedule (the field is filled in by its runner config)
            logger=LoggingConfig(log_to_wandb=False),
        ),
        lens,
        data_provider=iter([first]),
    )  # fmt: skip
    torch.manual_seed(derive_seed(args.seed, "bench_evals.sparsify"))
    sparsify = benchutil.SparsifyDefaults(cache.d_in, args.k, args.latents, first, torch.device("cpu"))
    seconds = {"saelens": 0.0, "sparsify": 0.0}
    x = first
    for step in range(steps):
        start = time.perf_counter()
        lens_trainer.step(x)
        lens_trainer.n_training_steps += 1
        seconds["saelens"] += time.perf_counter() - start
        start = time.perf_counter()
        sparsify.step(x)
        seconds["sparsify"] += time.perf_counter() - start
        if step + 1 < steps:
            x = next(batches)
    out = Path(args.out)
    with atomic_directory(out / "saelens") as tmp:
        lens.save_inference_model(str(tmp))
    sparsify.average()
    with atomic_directory(out / "sparsify") as tmp:
        sparsify.sae.save_to_disk(tmp)
    print(json.dumps({"steps": steps, "train_s": seconds}))


def eval_config(args: argparse.Namespace, start_batch: int) -> EvalConfig:
    return EvalConfig(
        total_tokens=args.eval_tokens, lm_batch_size=8, start_batch=start_batch, cooccurrence_latents=0,
        suite=["core", "absorption", "sparse_probing"], probe_cache=args.probe_cache,
        absorption=AbsorptionConfig(max_words=args.words),
        sparse_probing=SparseProbingConfig(
            tasks=["first_letter", "shakespeare_play", "shakespeare_speaker", "shakespeare_prose_verse"],
            train_size=args.probe_train, test_size=args.probe_test, context_length=args.context,
        ),
    )  # fmt: skip


def warm(args: argparse.Namespace) -> None:
    """Compute the probe datasets' activations into the cache (the model-side cost, once per model and hook)."""
    cache = ActivationCache(args.cache)
    source = model_source_of(cache, cache.check_hook(None), torch.device("cpu"))
    session = probe_session(source, eval_config(args, 0))
    start = time.perf_counter()
    data = session.first_letter()
    first_letter_s = time.perf_counter() - start
    probe, f1 = session.letter_probes()
    probes_s = time.perf_counter() - start - first_letter_s
    datasets = session.probing()[0]
    total = time.perf_counter() - start
    print(json.dumps({
        "words": int(data.acts.shape[0]), "first_letter_s": first_letter_s, "letter_probes_s": probes_s,
        "text_tasks_s": total - first_letter_s - probes_s,
        "texts": {d.name: d.train.n + d.test.n for d in datasets},
        "tokens": {d.name: int(d.train.rows.shape[0] + d.test.rows.shape[0]) for d in datasets},
        "letters_f1_over_0.6": sum(v > 0.6 for v in f1), "probe_f1": [round(v, 3) for v in f1],
    }))  # fmt: skip


def run_eval(args: argparse.Namespace) -> None:
    cache = ActivationCache(args.cache)
    hook = cache.check_hook(None)
    source = model_source_of(cache, hook, torch.device("cpu"))
    cfg = dataclasses.replace(eval_config(args, heldout_start_batch(cache, 8)), suite=args.suite)
    session = probe_session(source, cfg)
    results, points = {}, []
    for path in args.saes:
        name = (
            Path(path).parent.name.split("sae=")[-1].split(",")[0]
            if Path(path).name == "sae"
            else Path(path).name
        )
        sae = load_sae(path)
        result = evaluate(sae, source, cfg, session=session)
        write_report(result, Path(args.out) / name)
        results[name] = result.report
        if "core" in cfg.suite:
            points.append(report_point(name, result.report))
        print(name, json.dumps(result.report["timing_s"]), file=sys.stderr, flush=True)
    if points:
        write_frontier(points, args.out, title="SmolLM2 block 6: L0 vs fidelity")
    warm_s = None
    if session is not None:  # the first SAE again, a fresh session: probe data from the disk cache only
        first = load_sae(args.saes[0])
        start = time.perf_counter()
        evaluate(first, source, cfg, session=probe_session(source, cfg))
        warm_s = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps({"warm_probe_s": warm_s, "reports": results}, indent=1))


def show(args: argparse.Namespace) -> None:
    """Merge the JSON of a core run and of a probe run; print the table."""
    merged: dict[str, dict] = {}
    warm = None
    for path in args.jsons:
        data = json.loads(Path(path).read_text())
        warm = data.get("warm_probe_s") or warm
        for name, report in data["reports"].items():
            timing = {**merged.get(name, {}).get("timing_s", {}), **report.get("timing_s", {})}
            merged[name] = {**merged.get(name, {}), **report, "timing_s": timing}
    summary = {name: summarise(report) for name, report in merged.items()}
    print(table(summary))
    if warm is not None:
        print(f"\nprobe metrics of the first SAE again, probe data from the warm disk cache: {warm:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


def summarise(report: dict) -> dict:
    """The headline figures: SAE value and each baseline's."""
    absorption = report["absorption_first_letter"]
    probing = report["sparse_probing"]
    out = {
        "l0": report["reconstruction"]["l0"],
        "fvu": report["reconstruction"]["fvu"],
        "ce_loss_score": report["lm"]["ce_loss_score"],
        "timing_s": report["timing_s"],
        "probing": {
            "sae": probing["eval_result_metrics"]["sae"],
            "llm": probing["eval_result_metrics"]["llm"],
            **{n: b["eval_result_metrics"]["sae"] for n, b in probing["baselines"].items()},
        },
        "baseline_fvu": {n: b["reconstruction"]["fvu"] for n, b in report["core"]["baselines"].items()},
    }
    if "eval_result_metrics" in absorption:
        out["absorption"] = {
            "sae": absorption["eval_result_metrics"]["mean"],
            **{n: b.get("eval_result_metrics", {}).get("mean") for n, b in absorption["baselines"].items()},
        }
    else:
        out["absorption"] = {"skipped": absorption["skipped"]}
    return out


def table(summary: dict) -> str:
    def f(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "| SAE | L0 | FVU | CE rec. | abs. frac (rd / rdir / init) | full abs. (rd / rdir / init) | split F1 "
        "| top-1 acc (rdir / init) | top-5 acc (rdir / init) | core s | absorption s | probing s |",
        "|---|---:|---:|---:|---|---|---:|---|---|---:|---:|---:|",
    ]
    for name, s in summary.items():
        a, p, t = s["absorption"], s["probing"], s["timing_s"]
        if "sae" in a:
            base = [a.get(n) or {} for n in ("random_decoder", "random_directions", "init")]
            frac = f"{f(a['sae']['mean_absorption_fraction_score'])} ({' / '.join(f(b.get('mean_absorption_fraction_score')) for b in base)})"
            full = f"{f(a['sae']['mean_full_absorption_score'])} ({' / '.join(f(b.get('mean_full_absorption_score')) for b in base)})"
            split = f(a["sae"]["mean_split_feature_f1"])
        else:
            frac = full = split = "skipped"
        top = {
            k: f"{f(p['sae'][f'sae_top_{k}_test_accuracy'])} ({f(p['random_directions'][f'sae_top_{k}_test_accuracy'])} / "
            f"{f(p['init'][f'sae_top_{k}_test_accuracy'])})"
            for k in (1, 5)
        }
        lines.append(
            f"| {name} | {s['l0']:.1f} | {f(s['fvu'])} | {f(s['ce_loss_score'])} | {frac} | {full} | {split} | {top[1]} | "
            f"{top[5]} | {t['core']:.0f} | {t['absorption']:.0f} | {t['sparse_probing']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    peers = sub.add_parser("train-peers")
    peers.add_argument("cache")
    peers.add_argument("--out", required=True)
    peers.add_argument("--tokens", type=int, default=262144)
    peers.add_argument("--batch", type=int, default=4096)
    peers.add_argument("--latents", type=int, default=4608)
    peers.add_argument("--k", type=int, default=32)
    peers.add_argument("--seed", type=int, default=0)
    shown = sub.add_parser("show")
    shown.add_argument("jsons", nargs="+")
    shown.add_argument("--out")
    for command in ("warm", "eval"):
        ev = sub.add_parser(command)
        ev.add_argument("cache")
        if command == "eval":
            ev.add_argument("saes", nargs="+")
            ev.add_argument("--out", required=True)
            ev.add_argument("--json")
            ev.add_argument("--suite", nargs="+", default=["core", "absorption", "sparse_probing"])
        ev.add_argument("--eval-tokens", type=int, default=2048)
        ev.add_argument("--words", type=int, default=1500)
        ev.add_argument("--probe-train", type=int, default=200)
        ev.add_argument("--probe-test", type=int, default=100)
        ev.add_argument("--context", type=int, default=48)
        ev.add_argument("--probe-cache", default="caches/probe_activations")
        ev.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(getattr(args, "threads", 1))
    {"train-peers": train_peers, "warm": warm, "eval": run_eval, "show": show}[args.command](args)


if __name__ == "__main__":
    main()

"""Benchmark `saelab inspect` on the real SmolLM2-135M (offline assets): collection time, peak memory, site size.

For each width (`--d-sae`, default 2048 and 32768 latents) an untrained TopK SAE (k=32, seeded) reads the same
Shakespeare contexts (128 tokens, 8 per forward pass) at `--hook`; `collect_features` runs with the default
`InspectConfig` (only total_tokens and batch_size set), then `write_site` writes the browser. Reported: the
collection's seconds and tokens/s, its peak memory above the start (CPU: resident set, Linux VmHWM; CUDA:
allocated), the site's size by part (example data, contexts, index, the rest) and the writer's seconds.
Times are CPU seconds of this process (`time.process_time`; with `--threads 1` they do not grow when other
jobs share the machine) and wall seconds. `--baseline` also times the model to the hook plus the SAE's encoder
alone, before and after (what any use of the SAE costs), to report collection as a multiple of it.

The script uses only the public API (`InspectConfig`, `collect_features`, `write_site`), so the same file
measures an older checkout: `PYTHONPATH=/path/to/old/tree python scripts/bench_inspect.py ...`.

    python scripts/fetch_assets.py
    python scripts/bench_inspect.py --d-sae 2048 32768 --tokens 65536 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import (  # noqa: E402
    current_memory,
    device_name,
    peak_memory,
    print_table,
    reset_peak_memory,
    setup_device,
    sync,
    write_json,
)

from saelab.data.assets import SHAKESPEARE_GLOB, fetch_assets  # noqa: E402
from saelab.data.tokens import keep_mask  # noqa: E402
from saelab.harvest.config import ModelSourceConfig  # noqa: E402
from saelab.harvest.pipeline import build_pipeline  # noqa: E402
from saelab.inspect import InspectConfig, collect_features, write_site  # noqa: E402
from saelab.metrics.codes import encode_codes  # noqa: E402
from saelab.sae.topk import TopKConfig, TopKSAE  # noqa: E402

#: Site files by part: (label, glob under the site folder).
PARTS = (
    ("examples", "data/latents_*.js"),
    ("contexts", "data/contexts_*.js"),
    ("index", "data/index.js"),
)


def baseline_rate(pipeline, sae, hook: str, tokens: int, batch: int, device: torch.device) -> float:
    """Tokens/s of model-to-hook + SAE encode over the first contexts (no statistics kept)."""
    kept = 0
    sync(device)
    start = time.perf_counter()
    for ids in pipeline.contexts.batches(batch):
        x = pipeline.harvester(ids)[hook]
        encode_codes(sae, rearrange(x, "b t d -> (b t) d").to(sae.W_dec.device))
        kept += int(keep_mask(ids, pipeline.excluded).sum())
        if kept >= tokens:
            break
    sync(device)
    return kept / (time.perf_counter() - start)


def site_sizes(out: Path) -> dict[str, float]:
    """MiB of the site's files by part ("other": everything not in PARTS), and "total"."""
    sizes = {label: sum(p.stat().st_size for p in out.glob(pattern)) / 2**20 for label, pattern in PARTS}
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    sizes["other"] = total - sum(sizes.values())
    sizes["total"] = total
    return {k: round(v, 2) for k, v in sizes.items()}


def measure(args, pipeline, d_sae: int, device: torch.device) -> dict:
    """Collect and write the site for one untrained TopK SAE of d_sae latents."""
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=576, d_sae=d_sae, k=args.k)).to(device).eval()
    base = []
    if args.baseline:
        with torch.no_grad():
            base.append(baseline_rate(pipeline, sae, args.hook, args.tokens, args.batch, device))
    cfg = InspectConfig(total_tokens=args.tokens, batch_size=args.batch)
    before = current_memory(device)
    reset_peak_memory(device)
    start, cpu = time.perf_counter(), time.process_time()
    data = collect_features(
        pipeline.harvester.model, sae, pipeline.contexts.batches(args.batch), hook_name=args.hook,
        tokenizer=pipeline.contexts.tokenizer, excluded_ids=pipeline.excluded, cfg=cfg,
    )  # fmt: skip
    sync(device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    extra = (peak_memory(device) - before) / 2**20
    if args.baseline:
        with torch.no_grad():
            base.append(baseline_rate(pipeline, sae, args.hook, args.tokens, args.batch, device))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.site or tmp) / f"inspect_{d_sae}"
        start, site_cpu = time.perf_counter(), time.process_time()
        write_site(data, out, metadata={"sae": f"untrained TopK {d_sae}", "model": "smollm2"})
        site_seconds, site_cpu = time.perf_counter() - start, time.process_time() - site_cpu
        sizes = site_sizes(out)
    result = {
        "d_sae": d_sae,
        "k": args.k,
        "tokens": data.n_tokens,
        "collect_cpu_seconds": round(cpu, 1),
        "collect_seconds": round(seconds, 1),
        "collect_tokens_per_s": round(data.n_tokens / seconds, 1),
        "peak_extra_mib": round(extra, 1),
        "site_cpu_seconds": round(site_cpu, 1),
        "site_seconds": round(site_seconds, 1),
        "site_mib": sizes,
        "dead_latents": int(data.dead.sum()),
    }
    if base:
        result["baseline_tokens_per_s"] = [round(b, 1) for b in base]
        result["collect_vs_baseline"] = round(result["collect_tokens_per_s"] / (sum(base) / len(base)), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-sae", type=int, nargs="+", default=[2048, 32768])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="contexts per forward pass")
    parser.add_argument("--hook", default="blocks.0.hook_resid_post")
    parser.add_argument("--assets", default="assets")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="also time model-to-hook + encode alone")
    parser.add_argument("--site", default=None, help="keep the sites here (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = setup_device(args.device, args.threads)
    assets = Path(args.assets)
    fetch_assets(assets)
    src = ModelSourceConfig(dataset=str(assets / SHAKESPEARE_GLOB), context_size=128, assets_dir=str(assets))
    pipeline = build_pipeline(src, [args.hook], device)
    results = [measure(args, pipeline, d_sae, device) for d_sae in args.d_sae]
    rows = []
    for r in results:
        s = r["site_mib"]
        rows.append(
            [
                r["d_sae"],
                r["tokens"],
                f"{r['collect_cpu_seconds']:.0f} ({r['collect_seconds']:.0f} wall)",
                f"{r['peak_extra_mib']:.0f}",
                f"{s['total']:.1f} = {s['examples']:.1f} + {s['contexts']:.1f} + {s['index']:.1f} + {s['other']:.1f}",
                f"{r['site_cpu_seconds']:.0f} ({r['site_seconds']:.0f} wall)",
            ]
        )
    print_table(
        f"saelab inspect on SmolLM2-135M {args.hook}, untrained TopK k={args.k}, {device_name(device)}",
        [
            "latents",
            "tokens",
            "collect s",
            "peak MiB",
            "site MiB (examples + contexts + index + rest)",
            "write s",
        ],
        rows,
    )
    write_json(
        args.json,
        {"device": device_name(device), "date": datetime.date.today().isoformat(), "hook": args.hook,
         "results": results},
    )  # fmt: skip


if __name__ == "__main__":
    main()

"""Benchmark `saelab inspect` on the real SmolLM2-135M (offline assets): tokens/s and peak memory.

In one process, on the same contexts (Shakespeare, 128 tokens each, batches of 8): the baseline is the model
run to the hook plus the SAE's encoder (what any use of the SAE costs), run before and after and averaged; `collect_features` adds the per-latent
tables (top examples with windows, reservoir samples, histogram, co-firing) and the weight analyses; the site
writer is timed apart. Since the machine may be shared, the time spent in the per-latent tables
(`LatentCollector.update`) is also measured batch by batch inside the same run, as a share of its time. Peak memory: the high-water mark of the process (CPU: resident set; CUDA: allocated)
during `collect_features`, above what was in use before it. Prints a table and a JSON line.

    python scripts/fetch_assets.py && python scripts/bench_inspect.py --tokens 8192
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
from saelab.inspect.collect import LatentCollector  # noqa: E402
from saelab.io.loading import load_sae  # noqa: E402
from saelab.metrics.codes import encode_codes  # noqa: E402
from saelab.sae.topk import TopKConfig, TopKSAE  # noqa: E402


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


def time_table_updates(device: torch.device) -> list[float]:
    """Instrument `LatentCollector.update` (the per-latent tables) so its seconds add up in the list returned;
    measured batch by batch inside the same run, so load changes on a shared machine hit both parts alike."""
    spent = [0.0]
    update = LatentCollector.update

    def timed(self, *args, **kwargs):
        sync(device)
        start = time.perf_counter()
        update(self, *args, **kwargs)
        sync(device)
        spent[0] += time.perf_counter() - start

    LatentCollector.update = timed
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--sae", default=None, help="an SAE to load (default: untrained TopK 576 x 8, k=32)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="contexts per forward pass")
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--assets", default="assets")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--site", default=None, help="write the site here (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = setup_device(args.device, args.threads)
    assets = Path(args.assets)
    fetch_assets(assets)
    hook = args.hook
    src = ModelSourceConfig(dataset=str(assets / SHAKESPEARE_GLOB), context_size=128, assets_dir=str(assets))
    pipeline = build_pipeline(src, [hook], device)
    if args.sae:
        sae = load_sae(args.sae, device=device)
    else:
        torch.manual_seed(0)
        sae = TopKSAE(TopKConfig(d_in=576, d_sae=576 * 8, k=args.k)).to(device).eval()
    with torch.no_grad():
        base_before = baseline_rate(pipeline, sae, hook, args.tokens, args.batch, device)
    cfg = InspectConfig(total_tokens=args.tokens, batch_size=args.batch)
    table_seconds = time_table_updates(device)
    before = current_memory(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    data = collect_features(
        pipeline.harvester.model, sae, pipeline.contexts.batches(args.batch), hook_name=hook,
        tokenizer=pipeline.contexts.tokenizer, excluded_ids=pipeline.excluded, cfg=cfg,
    )  # fmt: skip
    sync(device)
    seconds = time.perf_counter() - start
    extra = (peak_memory(device) - before) / 2**20
    rate = data.n_tokens / seconds
    with torch.no_grad():  # the baseline again after, so a load change on a shared machine shows and averages
        base_after = baseline_rate(pipeline, sae, hook, args.tokens, args.batch, device)
    base = (base_before + base_after) / 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.site or tmp) / "inspect"
        start = time.perf_counter()
        write_site(data, out, metadata={"sae": args.sae or "untrained TopK", "model": "smollm2"})
        site_seconds = time.perf_counter() - start
        site_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    result = {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "d_sae": sae.d_sae,
        "k": getattr(sae.cfg, "k", None),
        "tokens": data.n_tokens,
        "baseline_tokens_per_s": round(base, 1),
        "baseline_before_after": [round(base_before, 1), round(base_after, 1)],
        "inspect_tokens_per_s": round(rate, 1),
        "inspect_vs_baseline": round(rate / base, 3),
        "inspect_seconds": round(seconds, 2),
        "table_update_seconds": round(table_seconds[0], 2),
        "table_share_of_inspect": round(table_seconds[0] / seconds, 3),
        "peak_extra_mib": round(extra, 1),
        "site_seconds": round(site_seconds, 2),
        "site_mib": round(site_mb, 1),
        "dead_latents": int(data.dead.sum()),
    }
    print_table(
        f"saelab inspect on SmolLM2-135M {hook}, {sae.d_sae} latents, {data.n_tokens} tokens, {result['device']}",
        ["run", "tokens/s", "vs baseline", "peak memory above start (MiB)"],
        [
            [
                f"model to hook + SAE encode (baseline; {base_before:.0f} before, {base_after:.0f} after)",
                f"{base:.0f}",
                "1.00x",
                "",
            ],
            ["collect_features", f"{rate:.0f}", f"{rate / base:.2f}x", f"{extra:.0f}"],
            [f"  of which per-latent tables: {table_seconds[0] / seconds:.0%} of its time", "", "", ""],
            [f"write_site ({site_mb:.1f} MiB)", f"{data.n_tokens / site_seconds:.0f}", "", ""],
        ],
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()

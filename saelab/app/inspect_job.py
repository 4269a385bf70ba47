"""`saelab inspect` from a composed Hydra config: load the SAE and the model, collect, write the site, explain,
serve.

The model is run over the source's text (source=smollm2 or source=model): activation caches hold rows without
their context windows, so they cannot supply examples; `source=cache` and `source=synthetic` are refused.
By default the text starts past what the SAE was trained on (as in `saelab eval`, `saelab.eval.provenance`).
`collect=false` works on the site already written: `saelab inspect-serve` serves it with the text box,
`saelab inspect-explain` explains its latents or imports explanations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from saelab.app.config import InspectRunConfig
from saelab.app.train_job import hydra_output_dir
from saelab.core.device import resolve_device
from saelab.eval.provenance import check_hook, evaluation_start
from saelab.harvest.config import ModelSourceConfig
from saelab.harvest.pipeline import HarvestPipeline, build_pipeline
from saelab.inspect.collect import collect_features
from saelab.inspect.data import FeatureData
from saelab.inspect.explain import explain_site, import_explanations, make_client
from saelab.inspect.live import LiveModel
from saelab.inspect.server import serve
from saelab.inspect.site import read_explanations, read_script, write_site
from saelab.io.loading import load_sae
from saelab.sae.base import SAE
from saelab.sources.harvested import transcoder_source_config


def default_output_dir(sae_path: str) -> Path:
    """<sae_path>/inspect for a local SAE, run or checkpoint directory; <hydra run dir>/inspect otherwise."""
    local = Path(sae_path).expanduser()
    if local.is_dir():
        return local / "inspect"
    return (hydra_output_dir() or Path("outputs")) / "inspect"


@dataclass
class Loaded:
    """The SAE and the model pipeline, loaded once for collection and the text box."""

    sae: SAE
    pipeline: HarvestPipeline


def load(cfg: InspectRunConfig) -> Loaded:
    device = resolve_device(cfg.inspect.device, "inspect.device")
    sae = load_sae(cfg.sae_path, device=device)
    src = cfg.source
    if sae.is_transcoder:  # examples at its input hook (an HF module's input: "<module>:input")
        src = transcoder_source_config(src, sae.cfg.metadata.get("hook_name_out"))
    check_hook(sae.cfg.metadata.get("hook_name"), src.hook_name)
    model_device = device if src.device == "auto" else resolve_device(src.device, "source.device")
    return Loaded(sae, build_pipeline(src, [src.hook_name], model_device))


def start_context(cfg: InspectRunConfig, loaded: Loaded) -> tuple[int, bool | None]:
    """(contexts to skip, whether the text from there is held out from the SAE's training; None: unknown)."""
    from saelab.sources.harvested import ModelSource
    from saelab.sources.registry import source_metadata

    source = ModelSource(cfg.source, loaded.sae.W_dec.device, pipeline=loaded.pipeline)
    trained_on = dict(loaded.sae.cfg.metadata)
    return evaluation_start(
        trained_on, source_metadata(source), source, cfg.inspect.start_context, 1, cfg.inspect.total_tokens
    )


def kept_explanations(out: Path, metadata: dict[str, Any], d_sae: int) -> dict[str, Any] | None:
    """The explanations of the site at `out` if it shows the same SAE (path and width), else None."""
    index = out / "data" / "index.js"
    if not index.is_file():
        return None
    try:
        meta = read_script(index)["meta"]
    except (ValueError, KeyError, OSError):
        return None
    if meta.get("sae") != metadata["sae"] or meta.get("d_sae") != d_sae:
        return None
    return read_explanations(out)


def collect(cfg: InspectRunConfig, loaded: Loaded, out: Path) -> FeatureData:
    src, pipeline = cfg.source, loaded.pipeline
    start, held_out = start_context(cfg, loaded)
    data = collect_features(
        pipeline.harvester.model,
        loaded.sae,
        pipeline.contexts.batches(cfg.inspect.batch_size, skip=start),
        hook_name=src.hook_name,
        tokenizer=pipeline.contexts.tokenizer,
        excluded_ids=pipeline.excluded,
        cfg=cfg.inspect,
        progress=cfg.logging.progress,
    )
    meta = {
        "sae": str(cfg.sae_path),
        "model": src.model,
        "dataset": src.dataset,
        "start_context": start,
        "held_out": held_out,
    }
    index = write_site(
        data, out, cfg.inspect.latents_per_file, meta, kept_explanations(out, meta, data.d_sae)
    )
    dead = int(data.dead.sum())
    where = {True: "held out from training", False: "NOT held out from training", None: "held-out unknown"}
    print(
        f"inspected {data.d_sae} latents on {data.n_tokens:,} tokens from context {start} ({where[held_out]}; {dead} dead)"
    )
    print(f"open {index.resolve().as_uri()}", flush=True)
    return data


def explain(cfg: InspectRunConfig, out: Path) -> None:
    ex = cfg.explain
    if ex.import_file:
        _, added = import_explanations(out, ex.import_file, ex.overwrite)
        print(f"imported {added} explanations from {ex.import_file}")
    if ex.explainer != "none":
        device = str(resolve_device(cfg.inspect.device, "inspect.device"))
        payload = explain_site(out, make_client(ex, device), ex, progress=cfg.logging.progress)
        print(f"{len(payload['latents'])} latents explained; stored in {out / 'data' / 'explanations.js'}")


def inspect_from_config(node: DictConfig) -> FeatureData | None:
    """Entry of the `saelab inspect` Hydra app (configs/inspect.yaml)."""
    cfg = OmegaConf.to_object(node)
    if not isinstance(cfg, InspectRunConfig):
        raise TypeError("configs/inspect.yaml must list inspect_schema in its defaults.")
    cfg.inspect.validate()
    cfg.explain.validate()
    cfg.logging.validate()
    if not 0 <= cfg.port < 65536:
        raise ValueError(f"port={cfg.port} must be in [0, 65535] (0: any free port).")
    needs_model = cfg.collect or (cfg.serve and cfg.live)
    if needs_model and not isinstance(cfg.source, ModelSourceConfig):
        raise ValueError(
            f"`saelab inspect` runs the model over text, so it needs source=smollm2 or source=model, not "
            f"source.kind={getattr(cfg.source, 'kind', None)!r} (caches hold no context windows)."
        )
    if not cfg.sae_path and (needs_model or not cfg.output_dir):
        raise ValueError(
            "pass sae=PATH (the SAE to inspect; without it, output_dir= an existing site to explain)."
        )
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg.sae_path)
    if not cfg.collect and not (out / "data" / "index.js").is_file():
        raise FileNotFoundError(
            f"{out} holds no feature browser to {'serve' if cfg.serve else 'explain'}; run `saelab inspect sae=... "
            "source=...` first, or pass output_dir= the folder it wrote."
        )
    loaded = load(cfg) if needs_model else None
    if loaded is not None and not cfg.collect:
        site_width = read_script(out / "data" / "index.js")["meta"]["d_sae"]
        if site_width != loaded.sae.d_sae:
            raise ValueError(
                f"the site in {out} shows {site_width} latents but sae={cfg.sae_path} has {loaded.sae.d_sae}; "
                "serve it with the SAE it was collected for, or collect again (collect=true)."
            )
    data = collect(cfg, loaded, out) if cfg.collect and loaded is not None else None
    if cfg.explain.enabled:
        explain(cfg, out)
    if cfg.serve:
        live = None
        if loaded is not None and cfg.live:
            pipeline = loaded.pipeline
            live = LiveModel(
                pipeline.harvester.model,
                loaded.sae,
                cfg.source.hook_name,
                pipeline.contexts.tokenizer,
                pipeline.excluded.tolist(),
                prepend_bos=cfg.source.prepend_bos,
            )
        serve(out, cfg.port, live, cfg.log_requests)
    return data

"""`saelab inspect` from a composed Hydra config: load the SAE and the model, collect, write the site, serve.

The model is run over the source's text (source=smollm2 or source=model): activation caches hold rows without
their context windows, so they cannot supply examples; `source=cache` and `source=synthetic` are refused.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from saelab.app.config import InspectRunConfig
from saelab.app.train_job import hydra_output_dir
from saelab.core.device import resolve_device
from saelab.eval.provenance import check_hook
from saelab.harvest.config import ModelSourceConfig
from saelab.harvest.pipeline import build_pipeline
from saelab.inspect.collect import collect_features
from saelab.inspect.data import FeatureData
from saelab.inspect.site import serve, write_site
from saelab.io.loading import load_sae
from saelab.sources.harvested import transcoder_source_config


def default_output_dir(sae_path: str) -> Path:
    """<sae_path>/inspect for a local SAE, run or checkpoint directory; <hydra run dir>/inspect otherwise."""
    local = Path(sae_path).expanduser()
    if local.is_dir():
        return local / "inspect"
    return (hydra_output_dir() or Path("outputs")) / "inspect"


def inspect_from_config(node: DictConfig) -> FeatureData:
    """Entry of the `saelab inspect` Hydra app (configs/inspect.yaml)."""
    cfg = OmegaConf.to_object(node)
    if not isinstance(cfg, InspectRunConfig):
        raise TypeError("configs/inspect.yaml must list inspect_schema in its defaults.")
    cfg.inspect.validate()
    cfg.logging.validate()
    if not isinstance(cfg.source, ModelSourceConfig):
        raise ValueError(
            f"`saelab inspect` runs the model over text, so it needs source=smollm2 or source=model, not "
            f"source.kind={getattr(cfg.source, 'kind', None)!r} (caches hold no context windows)."
        )
    if not 0 <= cfg.port < 65536:
        raise ValueError(f"port={cfg.port} must be in [0, 65535] (0: any free port).")
    device = resolve_device(cfg.inspect.device)
    sae = load_sae(cfg.sae_path, device=device)
    src = cfg.source
    if sae.is_transcoder:  # examples at its input hook (an HF module's input: "<module>:input")
        src = transcoder_source_config(src, sae.cfg.metadata.get("hook_name_out"))
    check_hook(sae.cfg.metadata.get("hook_name"), src.hook_name)
    model_device = device if src.device == "auto" else resolve_device(src.device)
    pipeline = build_pipeline(src, [src.hook_name], model_device)
    data = collect_features(
        pipeline.harvester.model,
        sae,
        pipeline.contexts.batches(cfg.inspect.batch_size),
        hook_name=src.hook_name,
        tokenizer=pipeline.contexts.tokenizer,
        excluded_ids=pipeline.excluded,
        cfg=cfg.inspect,
        progress=cfg.logging.progress,
    )
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg.sae_path)
    meta = {"sae": str(cfg.sae_path), "model": src.model, "dataset": src.dataset}
    index = write_site(data, out, cfg.inspect.latents_per_file, meta)
    dead = int(data.dead.sum())
    print(f"inspected {data.d_sae} latents on {data.n_tokens:,} tokens ({dead} dead)")
    print(f"open {index.resolve().as_uri()}", flush=True)
    if cfg.serve:
        serve(out, cfg.port)
    return data

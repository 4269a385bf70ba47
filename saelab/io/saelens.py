"""The SAELens on-disk format: `cfg.json` + `sae_weights.safetensors`, row-vector weights.

`to_saelab` turns a SAELens config (the SAELens-6 layout with a nested `metadata`, or the older flat layout)
and its tensors into saelab's config dict and state dict. Every input transform SAELens applies that is
affine is folded into the weights, so the SAE takes raw activations and gives SAELens's exact outputs:

- `rescale_acts_by_decoder_norm` (TopK): W_enc[:, i] *= |W_dec[i]|, b_enc[i] *= |W_dec[i]|, W_dec[i] /= |W_dec[i]|
- `apply_b_dec_to_input=False`: b_enc += b_dec @ W_enc (saelab SAEs subtract b_dec before encoding; a gated
  SAE's b_gate and b_mag take it). Transcoders (`transcoder`, `skip_transcoder`, `jumprelu_transcoder`,
  `jumprelu_skip_transcoder`) never centre their input by b_dec, which lives in the output space: for them
  apply_b_dec_to_input=False is the only value (as in SAELens) and nothing is folded.
- `scaling_factor` (older SAELens fine-tuning factor on the codes): W_dec[i] *= s[i]
- `log_threshold` (older JumpReLU checkpoints): threshold = exp(log_threshold)
- `normalize_activations="expected_average_only_in"`: the factor s SAELens multiplied activations by is not
  in these files; `saelab.load_sae` takes it (argument or activation_scaler.json) and folds it with
  `SAE.fold_input_scale` (W_enc *= s, W_dec /= s, b_dec /= s).

Per-token runtime normalisations ("layer_norm", "constant_norm_rescale") and unfolded covariance
whitening cannot be folded and are refused. `export_saelens` writes a saelab SAE in SAELens-6 layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from saelab.core.atomic import atomic_directory
from saelab.io.files import json_flag
from saelab.sae.base import CONFIG_FILE, DTYPES, SAE, SAELENS_LAYOUT_VERSION, WEIGHTS_FILE
from saelab.sae.registry import available_architectures, get_sae_class, variant_classes

EXPECTED_AVERAGE = "expected_average_only_in"

#: Keys older (flat) SAELens configs keep at the top level that describe the model and hook.
_FLAT_METADATA_KEYS = {
    "model_name",
    "model_class_name",
    "hook_name",
    "hook_point",
    "hook_layer",
    "hook_point_layer",
    "hook_head_index",
    "hook_point_head_index",
    "context_size",
    "dataset_path",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "model_from_pretrained_kwargs",
    "seqpos_slice",
    "training_tokens",
    "sae_lens_training_version",
}
_RENAMED_METADATA = {
    "hook_point": "hook_name",
    "hook_point_layer": "hook_layer",
    "hook_point_head_index": "hook_head_index",
}
_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|layer|h)\.(\d+)(?:\.|$)")


def dtype_name(value: Any, where: str) -> str:
    """'float32' / 'torch.float32' -> 'float32'; anything else raises naming the field."""
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"{where}: dtype={value!r} is not one of {sorted(DTYPES)}.")
    return name


def hook_layer(hook_name: str) -> int | None:
    """Layer index in a hook / module name ('blocks.6.hook_resid_post', 'model.layers.6') or None."""
    match = _LAYER.search(hook_name)
    return int(match.group(1)) if match else None


def saelens_metadata(raw: dict[str, Any]) -> dict[str, Any]:
    """Model/hook/training facts from either config layout, with SAELens's older key names updated."""
    meta = {k: v for k, v in raw.items() if k in _FLAT_METADATA_KEYS}
    meta.update(raw.get("metadata") or {})
    for old, new in _RENAMED_METADATA.items():
        if old in meta:
            meta.setdefault(new, meta.pop(old))
    meta.pop("sae_lens_version", None)
    if isinstance(meta.get("hook_name"), str) and meta.get("hook_layer") is None:
        layer = hook_layer(meta["hook_name"])
        if layer is not None:
            meta["hook_layer"] = layer
    return meta


def _architecture(raw: dict[str, Any], where: str) -> str:
    """The saelab registry name for a config's architecture: `saelab_architecture` where saelab wrote it (its
    `architecture` is then the SAELens equivalent), else SAELens's name (older configs name an activation fn)."""
    own = raw.get("saelab_architecture")
    if own is not None:
        try:
            cls = get_sae_class(own)
        except ValueError:
            raise ValueError(
                f"{where}: saelab_architecture={own!r} is unknown; saelab has {available_architectures()}."
            ) from None
        written = str(raw.get("architecture", ""))
        if written != cls.saelens_architecture and not written.startswith(cls.architecture):
            raise ValueError(
                f"{where}: architecture={written!r} contradicts saelab_architecture={own!r} (saelab writes "
                f"{cls.saelens_architecture or cls.architecture!r} there); fix one of the two fields."
            )
        return cls.architecture
    name = raw.get("architecture")
    if name is None:
        activation = raw.get("activation_fn") or raw.get("activation_fn_str")
        if activation is None:
            raise ValueError(f"{where} has no 'architecture' field; cannot tell which SAE variant it holds.")
        name = {"relu": "standard", "topk": "topk"}.get(activation)
        if name is None:
            raise ValueError(f"{where}: activation_fn={activation!r} is not supported (only relu or topk).")
    readers = saelens_readers()
    if name in readers:
        return readers[name]
    try:
        return get_sae_class(name).architecture
    except ValueError:
        raise ValueError(
            f"{where}: architecture={raw.get('architecture', name)!r} is unknown; saelab reads SAELens's "
            f"{sorted(readers)} and its own {available_architectures()}."
        ) from None


def saelens_readers() -> dict[str, str]:
    """SAELens architecture name -> the saelab variant that loads it (each class's `saelens_reads`)."""
    return {name: cls.architecture for cls in variant_classes() for name in cls.saelens_reads}


def needs_input_scale(raw: dict[str, Any]) -> bool:
    """Whether a config says the SAE was trained on activations multiplied by a factor not folded in."""
    return raw.get("normalize_activations") in (True, EXPECTED_AVERAGE)


def to_saelab(
    raw: dict[str, Any], state: dict[str, Tensor], *, where: str, dtype: str | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(cfg.json dict, tensors) in SAELens or saelab layout -> (saelab config dict, saelab state dict).

    The config's dtype is `dtype` if given, else the file's. An "expected_average_only_in" input scale is
    not folded here (the factor is not in these files): fold it with `SAE.fold_input_scale`. `where` names the
    source in error messages.
    """
    if "topk_threshold" in state:
        raise ValueError(
            f"{where} is a SAELens BatchTopK *training* save (SAE.save_model: tensor 'topk_threshold', no "
            "inference 'threshold'); save it with save_inference_model() and load that directory instead."
        )
    arch = _architecture(raw, where)
    if not isinstance(raw.get("metadata") or {}, dict):
        raise ValueError(f"{where}: metadata={raw['metadata']!r} must be a JSON object (or absent).")
    cfg = {k: v for k, v in raw.items() if k not in _FLAT_METADATA_KEYS}
    cfg["architecture"] = arch
    cfg["dtype"] = dtype_name(dtype or raw.get("dtype", "float32"), where)
    cfg["metadata"] = saelens_metadata(raw)
    kwargs = raw.get("activation_fn_kwargs") or {}
    if arch == "topk" and "k" not in cfg and "k" in kwargs:
        cfg["k"] = kwargs["k"]
    if cfg.get("reshape_activations", "none") != "none":
        cfg["metadata"]["reshape_activations"] = cfg["reshape_activations"]
    norm = raw.get("normalize_activations") or "none"
    if not (norm == "none" or needs_input_scale(raw)):
        raise ValueError(
            f"{where}: normalize_activations={norm!r} is a per-input runtime transform (or an unfolded "
            f"whitening) that saelab cannot fold into the weights; only 'none' and '{EXPECTED_AVERAGE}' "
            "SAEs can be loaded."
        )
    cfg["normalize_activations"] = "none"
    cfg["apply_b_dec_to_input"] = True
    cls = get_sae_class(arch)
    tensors = cls.from_file_tensors(dict(state), where)
    _fold_saelens_extras(raw, tensors, where, cls)
    return cfg, tensors


def _fold_saelens_extras(raw: dict[str, Any], t: dict[str, Tensor], where: str, cls: type[SAE]) -> None:
    """Fold SAELens-only tensors and flags into W_enc/b_enc/W_dec, in place (folded ones become float64)."""
    if "log_threshold" in t:
        t["threshold"] = t.pop("log_threshold").double().exp()
    factor = t.pop("scaling_factor", t.pop("finetuning_scaling_factor", None))
    rescale = json_flag(raw, "rescale_acts_by_decoder_norm", False, where)
    b_dec_in = json_flag(raw, "apply_b_dec_to_input", True, where)
    if cls.is_transcoder and b_dec_in:
        raise ValueError(
            f"{where}: apply_b_dec_to_input=true, but a transcoder's b_dec is in its output space and cannot "
            "centre its input (SAELens refuses this too); a transcoder's file says false."
        )
    no_b_dec_in = not b_dec_in and not cls.is_transcoder
    if factor is None and not rescale and not no_b_dec_in:
        return
    for name in ("W_enc", "W_dec", "b_dec", *(("b_enc",) if rescale else ())):
        if name not in t:
            raise ValueError(f"{where}: the weights have no tensor {name!r} (found {sorted(t)}).")
        t[name] = t[name].double()
    factor = factor.double() if factor is not None else None
    if factor is not None and raw.get("finetuning_scaling_factor"):
        t["W_dec"] = t["W_dec"] * factor[:, None]
    elif factor is not None and not torch.allclose(factor, torch.ones_like(factor)):
        raise ValueError(
            f"{where}: the weights hold a non-trivial 'scaling_factor' but finetuning_scaling_factor is false; "
            "SAELens refuses this file too."
        )
    if rescale:
        norms = t["W_dec"].norm(dim=1)
        t["W_enc"] = t["W_enc"] * norms
        t["b_enc"] = t["b_enc"] * norms
        t["W_dec"] = t["W_dec"] / norms[:, None]
    if no_b_dec_in:
        cls.absorb_input_offset(t, t["b_dec"])


def saelens_config(sae: SAE) -> dict[str, Any]:
    """The SAELens-6 inference cfg.json for a saelab SAE (raises for variants SAELens has no equivalent of)."""
    arch = type(sae).saelens_architecture
    if arch is None:
        exportable = sorted(cls.architecture for cls in variant_classes() if cls.saelens_architecture)
        raise ValueError(
            f"SAELens has no equivalent of saelab's {sae.cfg.architecture!r} SAE; export supports {exportable}."
        )
    metadata = {
        **sae.cfg.metadata,
        "sae_lens_version": SAELENS_LAYOUT_VERSION,
        "saelab_architecture": sae.cfg.architecture,
    }
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": dtype_name(sae.W_enc.dtype, "sae"),
        "device": "cpu",
        "apply_b_dec_to_input": not sae.is_transcoder,  # a transcoder's files hold no input centring
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if arch == "topk":
        cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    if sae.is_transcoder:
        cfg["d_out"] = sae.d_out
    return cfg


def saelens_tensors(sae: SAE) -> dict[str, Tensor]:
    """The SAE's weights for SAELens (same names); a scalar threshold (BatchTopK) becomes one per latent [n]."""
    threshold = sae.state_dict().get("threshold")
    if threshold is not None and threshold.ndim == 0 and not bool(threshold >= 0):
        raise ValueError(
            f"this {sae.cfg.architecture} SAE has no usable inference threshold ({threshold.item()}); "
            "train it before exporting."
        )
    return sae.file_tensors()


def export_saelens(sae: SAE, path: str | Path) -> Path:
    """Write `sae` into directory `path` in SAELens's format (cfg.json + sae_weights.safetensors), atomically.

    The SAE must take raw activations (saelab's trainer folds its input scale in before saving), so the
    export declares normalize_activations="none" and apply_b_dec_to_input=True.
    """
    cfg = saelens_config(sae)
    tensors = saelens_tensors(sae)
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return Path(path).expanduser()

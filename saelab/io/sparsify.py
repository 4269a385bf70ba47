"""EleutherAI sparsify's on-disk format: `cfg.json` + `sae.safetensors`, one folder per hookpoint.

`cfg.json` holds sparsify's `SparseCoderConfig` fields plus `d_in`; the tensors are `encoder.weight` [n, d_in],
`encoder.bias` [n], `W_dec` [n, d_in], `b_dec` [d_in] (and `W_skip` [d_in, d_in] with a skip connection).
A hub repo or training run holds one such folder per hookpoint (`layers.6/`, `layers.6.mlp/`). sparsify's
inference rule is saelab's TopK SAE:

    z = top-k(ReLU((x - b_dec) @ encoder.weight^T + encoder.bias)),   x_hat = z @ W_dec + b_dec

so W_enc = encoder.weight^T and the other tensors keep their values. Options:

- `multi_topk`, `normalize_decoder`, `expansion_factor` only shape training: any value loads. saelab
  reproduces sparsify's k-latent `encode` / `decode`; with `multi_topk=True` sparsify's `forward` returns
  the top-4k-latent reconstruction of its training loss instead, which saelab does not compute.
- `transcode=True` (a transcoder: the input is not centred by b_dec, and the output predicts the hookpoint
  module's output): loads as saelab's `topk_transcoder` (d_out = d_in), tensors unchanged.
- `skip_connection=True` (`W_skip` [d_in, d_in], x @ W_skip^T added to the output): loads as
  `topk_skip_transcoder`; a coder with skip_connection but not transcode (an SAE with a skip) too, its input
  centring folded into b_enc = encoder.bias - b_dec @ encoder.weight^T (float64). `export_sparsify` writes
  each back as it came (`transcode` from metadata `sparsify`; saelab's own transcoders as transcode=true).
- `activation="groupmax"` (the max of each of k groups instead of a top-k): refused.
- Any other field (from forks: `signed`, `batch_topk`, `input_unit_norm`, ...) is refused unless false/0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from saelab.core.atomic import atomic_directory
from saelab.io.files import json_flag, read_json_object
from saelab.io.saelens import dtype_name, hook_layer
from saelab.sae.base import SAE, load_weights

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
#: SparseCoderConfig fields that only shape training: any value loads.
_TRAINING_ONLY = {"expansion_factor", "normalize_decoder", "num_latents", "multi_topk"}
_KNOWN_FIELDS = _TRAINING_ONLY | {"activation", "k", "skip_connection", "transcode", "d_in"}
_TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
#: saelab architectures sparsify has an equivalent of: (no skip, skip).
_TOPK = ("topk", "topk_transcoder", "topk_skip_transcoder")


def read_sparsify(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(saelab config dict, saelab state dict) of a sparsify folder (`cfg.json` + `sae.safetensors`).

    A folder named after a hookpoint ("layers.6", "h.3.mlp") records it as metadata `hookpoint` and
    `hook_layer` (sparsify names hookpoints relative to the model's base module).
    """
    raw = read_json_object(folder / CONFIG_FILE)
    state = load_weights(folder / WEIGHTS_FILE)
    cfg, tensors = sparsify_to_saelab(raw, state, where=str(folder))
    layer = hook_layer(folder.name)
    if layer is not None:
        cfg["metadata"].update(hookpoint=folder.name, hook_layer=layer)
    return cfg, tensors


def sparsify_to_saelab(
    raw: dict[str, Any], state: dict[str, Tensor], *, where: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """sparsify (cfg.json dict, tensors) -> (saelab config dict, state dict): `topk`, or `topk_transcoder` /
    `topk_skip_transcoder` for transcoders and skip connections. `where` names the source folder in errors;
    unsupported options raise naming the cfg.json field."""
    _check_options(raw, where)
    d_in = raw.get("d_in")
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in <= 0:
        raise ValueError(f"{where}/{CONFIG_FILE}: d_in={d_in!r} must be a positive integer.")
    skip = json_flag(raw, "skip_connection", False, f"{where}/{CONFIG_FILE}")
    names = (*_TENSORS, "W_skip") if skip else _TENSORS
    if not all(name in state for name in names) or set(state) - set(names):
        raise ValueError(
            f"{where}/{WEIGHTS_FILE} holds tensors {sorted(state)}; a sparsify sparse coder with "
            f"skip_connection={str(skip).lower()} has exactly {sorted(names)}."
        )
    n = state["encoder.weight"].shape[0]
    expected = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    if skip:
        expected["W_skip"] = (d_in, d_in)
    wrong = {k: (tuple(state[k].shape), v) for k, v in expected.items() if tuple(state[k].shape) != v}
    if wrong:
        raise ValueError(
            f"{where}/{WEIGHTS_FILE} does not match d_in={d_in} in {CONFIG_FILE}: wrong shapes (found, "
            f"expected) {wrong}."
        )
    for name in ("num_latents", "expansion_factor"):
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{where}/{CONFIG_FILE}: {name}={value!r} must be a non-negative integer.")
    latents = raw.get("num_latents") or d_in * (raw.get("expansion_factor") or 32)
    if latents != n:
        raise ValueError(
            f"{where}/{CONFIG_FILE}: num_latents={raw.get('num_latents')} / expansion_factor="
            f"{raw.get('expansion_factor')} give {latents} latents but the weights have {n}."
        )
    k = raw.get("k", 32)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= n:
        raise ValueError(f"{where}/{CONFIG_FILE}: k={k!r} must be an integer in [1, {n}].")
    dtype = dtype_name(state["encoder.weight"].dtype, f"{where}/{WEIGHTS_FILE}")
    w_enc = state["encoder.weight"].T.contiguous()
    b_enc = state["encoder.bias"]
    transcode = json_flag(raw, "transcode", False, f"{where}/{CONFIG_FILE}")
    metadata: dict[str, Any] = {"sparsify": {k: v for k, v in raw.items() if k != "d_in"}}
    cfg = {"architecture": _TOPK[0], "d_in": d_in, "d_sae": n, "k": k, "dtype": dtype, "metadata": metadata}
    tensors = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    if (
        transcode or skip
    ):  # saelab's transcoder layout: pre = x @ W_enc + b_enc, output = ... (+ x @ W_skip^T)
        cfg.update(architecture=_TOPK[2 if skip else 1], d_out=d_in, apply_b_dec_to_input=False)
        if not transcode:  # sparsify centres an SAE's input by b_dec
            tensors["b_enc"] = b_enc.double() - state["b_dec"].double() @ w_enc.double()
        if skip:
            tensors["W_skip"] = state["W_skip"]
    return cfg, tensors


def _check_options(raw: dict[str, Any], where: str) -> None:
    """Raise naming the cfg.json field for any option saelab's TopK SAE cannot reproduce exactly."""
    place = f"{where}/{CONFIG_FILE}"
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise ValueError(
            f"{place}: activation={activation!r} is not supported; saelab loads sparsify's 'topk' coders only "
            "('groupmax' keeps the largest latent of each of k groups, which no saelab SAE computes)."
        )
    unknown = sorted(k for k, v in raw.items() if k not in _KNOWN_FIELDS and v)
    if unknown:
        raise ValueError(
            f"{place}: field(s) {unknown} = {[raw[k] for k in unknown]} are not sparsify SparseCoderConfig "
            f"options saelab knows ({sorted(_KNOWN_FIELDS)}); it cannot tell whether they change the SAE's "
            "outputs, so it refuses the folder."
        )


def sparsify_config(sae: SAE) -> dict[str, Any]:
    """sparsify's cfg.json (SparseCoderConfig fields + d_in) for a saelab TopK SAE or TopK (skip) transcoder;
    other variants raise."""
    if sae.cfg.architecture not in _TOPK:
        raise ValueError(
            f"sparsify's sparse coder is a TopK SAE or transcoder; saelab's {sae.cfg.architecture!r} has no "
            f"sparsify equivalent (it takes {list(_TOPK)}; export_saelens or export_dictionary_learning may take it)."
        )
    if sae.is_transcoder and sae.d_out != sae.d_in:
        raise ValueError(
            f"sparsify's coders predict an output as wide as their input (W_dec [n, d_in]), but this transcoder "
            f"maps d_in={sae.d_in} to d_out={sae.d_out}; export it with export_saelens or keep saelab's files."
        )
    previous = sae.cfg.metadata.get("sparsify") or {}
    transcode = (
        bool(previous.get("transcode", True))
        if sae.is_transcoder
        else bool(sae.cfg.metadata.get("transcoder", False))
    )
    return {
        "activation": "topk",
        "expansion_factor": max(sae.d_sae // sae.d_in, 1),
        "normalize_decoder": bool(previous.get("normalize_decoder", True)),
        "num_latents": sae.d_sae,
        "k": sae.cfg.k,
        "multi_topk": bool(previous.get("multi_topk", False)),
        "skip_connection": bool(getattr(sae, "has_skip", False)),
        "transcode": transcode,
        "d_in": sae.d_in,
    }


def sparsify_tensors(sae: SAE, transcode: bool = False) -> dict[str, Tensor]:
    """The SAE's file tensors under sparsify's names. encoder.bias is computed in float64 where the centring
    differs: a saelab SAE centres by b_dec and a sparsify transcoder does not (b_enc - b_dec @ W_enc); a saelab
    transcoder does not and a sparsify SAE does (b_enc + b_dec @ W_enc)."""
    p = sae.file_tensors()
    bias = p["b_enc"]
    if transcode != sae.is_transcoder:
        sign = -1.0 if transcode else 1.0
        bias = (bias.double() + sign * p["b_dec"].double() @ p["W_enc"].double()).to(bias.dtype)
    out = {
        "encoder.weight": p["W_enc"].T.contiguous(),
        "encoder.bias": bias.contiguous(),
        "W_dec": p["W_dec"].contiguous(),
        "b_dec": p["b_dec"].contiguous(),
    }
    if "W_skip" in p:
        out["W_skip"] = p["W_skip"].contiguous()
    return out


def export_sparsify(sae: SAE, path: str | Path) -> Path:
    """Write a saelab TopK SAE or TopK (skip) transcoder with d_out = d_in into directory `path` in sparsify's
    format (cfg.json + sae.safetensors),
    atomically; `SparseCoder.load_from_disk(path)` then gives the same outputs. For sparsify's hub layout
    name the folder after the hookpoint (`repo/layers.6`).
    """
    cfg = sparsify_config(sae)
    tensors = sparsify_tensors(sae, transcode=cfg["transcode"])
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return Path(path).expanduser()

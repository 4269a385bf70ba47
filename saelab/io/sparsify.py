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
- `transcode=True` (a transcoder: the input is not centred by b_dec, and the output predicts another
  hookpoint): loads exactly with b_enc = encoder.bias + b_dec @ encoder.weight^T (folded in float64); the
  SAE's metadata says `transcoder: true` and `export_sparsify` writes it back as a transcoder.
- `skip_connection=True` adds x @ W_skip^T to the output, which saelab's decode(z) cannot: refused.
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
    """sparsify (cfg.json dict, tensors) -> (saelab TopK config dict, state dict). `where` names the source
    folder in errors; unsupported options raise naming the cfg.json field."""
    _check_options(raw, where)
    d_in = raw.get("d_in")
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in <= 0:
        raise ValueError(f"{where}/{CONFIG_FILE}: d_in={d_in!r} must be a positive integer.")
    if not all(name in state for name in _TENSORS) or set(state) - set(_TENSORS):
        raise ValueError(
            f"{where}/{WEIGHTS_FILE} holds tensors {sorted(state)}; a sparsify sparse coder has exactly "
            f"{sorted(_TENSORS)}."
        )
    n = state["encoder.weight"].shape[0]
    expected = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
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
    if transcode:  # sparsify does not subtract b_dec before encoding a transcoder's input
        b_enc = b_enc.double() + state["b_dec"].double() @ w_enc.double()
    metadata: dict[str, Any] = {"sparsify": {k: v for k, v in raw.items() if k != "d_in"}}
    if transcode:
        metadata["transcoder"] = True
    cfg = {"architecture": "topk", "d_in": d_in, "d_sae": n, "k": k, "dtype": dtype, "metadata": metadata}
    tensors = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
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
    if json_flag(raw, "skip_connection", False, place):
        raise ValueError(
            f"{place}: skip_connection=true is not supported: the output adds x @ W_skip^T, which saelab's "
            "decode(z) has no input for. Load it with sparsify (SparseCoder.load_from_disk)."
        )
    unknown = sorted(k for k, v in raw.items() if k not in _KNOWN_FIELDS and v)
    if unknown:
        raise ValueError(
            f"{place}: field(s) {unknown} = {[raw[k] for k in unknown]} are not sparsify SparseCoderConfig "
            f"options saelab knows ({sorted(_KNOWN_FIELDS)}); it cannot tell whether they change the SAE's "
            "outputs, so it refuses the folder."
        )


def sparsify_config(sae: SAE) -> dict[str, Any]:
    """sparsify's cfg.json (SparseCoderConfig fields + d_in) for a saelab TopK SAE; other variants raise."""
    if sae.cfg.architecture != "topk":
        raise ValueError(
            f"sparsify's sparse coder is a TopK SAE; saelab's {sae.cfg.architecture!r} SAE has no sparsify "
            "equivalent (export_saelens or export_dictionary_learning may take it)."
        )
    previous = sae.cfg.metadata.get("sparsify") or {}
    return {
        "activation": "topk",
        "expansion_factor": max(sae.d_sae // sae.d_in, 1),
        "normalize_decoder": bool(previous.get("normalize_decoder", True)),
        "num_latents": sae.d_sae,
        "k": sae.cfg.k,
        "multi_topk": bool(previous.get("multi_topk", False)),
        "skip_connection": False,
        "transcode": bool(sae.cfg.metadata.get("transcoder", False)),
        "d_in": sae.d_in,
    }


def sparsify_tensors(sae: SAE, transcode: bool = False) -> dict[str, Tensor]:
    """The SAE's weights under sparsify's names; for a transcoder b_dec @ W_enc leaves encoder.bias (float64)."""
    p = {k: v.detach().cpu() for k, v in sae.state_dict().items()}
    bias = p["b_enc"]
    if transcode:
        bias = (bias.double() - p["b_dec"].double() @ p["W_enc"].double()).to(bias.dtype)
    return {
        "encoder.weight": p["W_enc"].T.contiguous(),
        "encoder.bias": bias.contiguous(),
        "W_dec": p["W_dec"].contiguous(),
        "b_dec": p["b_dec"].contiguous(),
    }


def export_sparsify(sae: SAE, path: str | Path) -> Path:
    """Write a saelab TopK SAE into directory `path` in sparsify's format (cfg.json + sae.safetensors),
    atomically; `SparseCoder.load_from_disk(path)` then gives the same outputs. For sparsify's hub layout
    name the folder after the hookpoint (`repo/layers.6`).
    """
    cfg = sparsify_config(sae)
    tensors = sparsify_tensors(sae, transcode=cfg["transcode"])
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return Path(path).expanduser()

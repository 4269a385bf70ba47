"""saprmarks/dictionary_learning's on-disk format: `ae.pt` (a torch state dict) + `config.json`.

`config.json` is {"trainer": {"dict_class", "activation_dim", "dict_size", "k", "lm_name", "layer", ...},
"buffer": {...}}; `trainer.dict_class` names the module class whose state dict `ae.pt` holds. Each class
that saelab loads, with its inference rule (pre = the encoder's pre-activation) and saelab equivalent:

- AutoEncoder: bias [d], encoder.weight [n, d], encoder.bias [n], decoder.weight [d, n];
  z = ReLU(encoder(x - bias)), x_hat = decoder(z) + bias -> `relu` (W_enc = encoder.weight^T,
  W_dec = decoder.weight^T, b_dec = bias).
- AutoEncoderNew: z = ReLU(encoder(x)), x_hat = decoder(z) (decoder.bias) -> `relu`, b_dec = decoder.bias,
  b_enc = encoder.bias + decoder.bias @ W_enc.
- AutoEncoderTopK: encoder, decoder (no bias), b_dec, buffers k and threshold; z = top-k(ReLU(pre)) ->
  `topk` (its threshold, used only with use_threshold=True, is kept as metadata `inference_threshold`).
- BatchTopKSAE / MatryoshkaBatchTopKSAE: z = ReLU(pre) * (ReLU(pre) > threshold) -> `batchtopk` (or the variant
  that exports MatryoshkaBatchTopKSAE) with that threshold (equal to saelab's pre * (pre > threshold) for
  threshold >= 0; a threshold of -1 means training never estimated it, and is refused).
- JumpReluAutoEncoder: W_enc [d, n], b_enc, W_dec [n, d], b_dec, threshold [n];
  z = ReLU(pre * (pre > threshold)) with pre = x @ W_enc + b_enc (apply_b_dec_to_input=False) -> `jumprelu`,
  b_enc + b_dec @ W_enc.
- GatedAutoEncoder: encoder.weight [n, d] (no bias), decoder.weight [d, n], decoder_bias [d], gate_bias,
  mag_bias, r_mag [n]; u = encoder(x - decoder_bias), z = [u + gate_bias > 0] * ReLU(exp(r_mag) * u + mag_bias),
  x_hat = decoder(z) + decoder_bias -> `gated` (W_enc = encoder.weight^T, W_dec = decoder.weight^T, b_dec =
  decoder_bias, b_gate / b_mag / r_mag = gate_bias / mag_bias / r_mag).
- Any other class: refused, naming trainer.dict_class.

Folded biases are computed in float64. `trainer.norm_factor` (normalize_activations) needs no folding:
dictionary_learning scales the biases back before saving, so `ae.pt` takes raw activations. Note that
dictionary_learning's own `AutoEncoder.from_pretrained` rescales decoder columns to unit norm (codes
scaled by the old norms, same reconstructions); saelab loads the weights as stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.core.atomic import atomic_directory
from saelab.io.files import read_json_object
from saelab.io.saelens import dtype_name
from saelab.sae.base import SAE, check_float_tensors
from saelab.sae.registry import variant_classes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "ae.pt"
_LINEAR = ("encoder.weight", "encoder.bias", "decoder.weight")
_PLAIN = ("W_enc", "b_enc", "W_dec", "b_dec")
#: dict_class -> (its weight tensors, its other state entries). Which saelab variant a class maps to is the
#: variant's own declaration (`dictionary_learning_class` / `dictionary_learning_reads`).
CLASSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "AutoEncoder": (("bias", *_LINEAR), ()),
    "AutoEncoderNew": ((*_LINEAR, "decoder.bias"), ()),
    "AutoEncoderTopK": ((*_LINEAR, "b_dec"), ("k", "threshold")),
    "BatchTopKSAE": ((*_LINEAR, "b_dec"), ("k", "threshold")),
    "MatryoshkaBatchTopKSAE": (_PLAIN, ("threshold", "k", "group_sizes")),
    "JumpReluAutoEncoder": (_PLAIN, ("threshold",)),
    "GatedAutoEncoder": (
        ("encoder.weight", "decoder.weight", "decoder_bias"),
        ("gate_bias", "mag_bias", "r_mag"),
    ),
}
#: Classes whose encoder does not subtract b_dec from its input (pre = x @ W_enc + b_enc).
_NO_B_DEC_IN = ("JumpReluAutoEncoder",)


def variant_for(dict_class: str) -> type[SAE] | None:
    """The saelab variant that loads `dict_class`: the one exporting it, else one that declares reading it."""
    classes = variant_classes()
    for cls in classes:
        if cls.dictionary_learning_class == dict_class:
            return cls
    return next((cls for cls in classes if dict_class in cls.dictionary_learning_reads), None)


def read_dictionary_learning(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(saelab config dict, saelab state dict) of a dictionary_learning folder (`config.json` + `ae.pt`)."""
    config = read_json_object(folder / CONFIG_FILE)
    path = folder / WEIGHTS_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling raises many types for truncated or non-tensor files
        raise ValueError(f"could not read {path}: {err}. The file is corrupt or not a state dict.") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (found {type(state).__name__}).")
    return dictionary_learning_to_saelab(config, state, where=str(folder))


def dictionary_learning_to_saelab(
    config: dict[str, Any], state: dict[str, Tensor], *, where: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """dictionary_learning (config.json dict, ae.pt state dict) -> (saelab config dict, state dict).
    `where` names the source folder in errors."""
    trainer = config.get("trainer")
    if not isinstance(trainer, dict) or "dict_class" not in trainer:
        raise ValueError(f"{where}/{CONFIG_FILE} has no trainer.dict_class; cannot tell which SAE it holds.")
    name = trainer["dict_class"]
    if not isinstance(name, str) or name not in CLASSES:
        raise ValueError(
            f"{where}/{CONFIG_FILE}: trainer.dict_class={name!r} is not supported; saelab loads "
            f"{sorted(CLASSES)}."
        )
    weights, extras = CLASSES[name]
    cls = variant_for(name)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved from a torch.compile'd module
    if cls is None:
        raise ValueError(f"{where}/{CONFIG_FILE}: no saelab variant loads trainer.dict_class={name!r}.")
    if set(state) != {*weights, *extras}:
        raise ValueError(
            f"{where}/{WEIGHTS_FILE} holds tensors {sorted(state)}; a {name} has exactly {sorted({*weights, *extras})}."
        )
    check_float_tensors(state, f"{where}/{WEIGHTS_FILE}", weights)
    for scalar in ("k", "threshold") if "k" in extras else ():  # the TopK family's (JumpReLU's is per latent)
        if scalar in extras and state[scalar].numel() != 1:
            raise ValueError(
                f"{where}/{WEIGHTS_FILE}: {scalar} holds {state[scalar].numel()} values; a {name} stores one."
            )
    t = _saelab_tensors(name, state)
    d, n = t["W_enc"].shape
    _check_shapes(t, d, n, f"{where}/{WEIGHTS_FILE}")
    for field, value in (("activation_dim", d), ("dict_size", n)):
        if trainer.get(field, value) != value:
            raise ValueError(
                f"{where}/{CONFIG_FILE}: trainer.{field}={trainer[field]} but {WEIGHTS_FILE} has {value}."
            )
    metadata: dict[str, Any] = {"dictionary_learning": config}
    if trainer.get("lm_name") is not None:
        metadata["model_name"] = trainer["lm_name"]
    if isinstance(trainer.get("layer"), int):
        metadata["hook_layer"] = trainer["layer"]
    dtype = dtype_name(state[weights[0]].dtype, f"{where}/{WEIGHTS_FILE}")
    fields, tensors = cls.config_from_dictionary_learning(
        {k: state[k] for k in extras}, trainer, f"{where}/{WEIGHTS_FILE}"
    )
    metadata.update(fields.pop("metadata", {}))
    cfg = {
        "architecture": cls.architecture,
        "d_in": d,
        "d_sae": n,
        "dtype": dtype,
        "metadata": metadata,
        **fields,
    }
    return cfg, {**t, **tensors}


def _saelab_tensors(name: str, s: dict[str, Tensor]) -> dict[str, Tensor]:
    """saelab's W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d] (+ threshold) from a dict_class's state dict."""
    if CLASSES[name][0] == _PLAIN:
        t = {k: s[k] for k in _PLAIN}
        if name in _NO_B_DEC_IN:  # pre = x @ W_enc + b_enc: fold b_dec, which saelab subtracts first
            t["b_enc"] = t["b_enc"].double() + t["b_dec"].double() @ t["W_enc"].double()
        return t
    t = {"W_enc": s["encoder.weight"].T, "W_dec": s["decoder.weight"].T}
    if "encoder.bias" in s:
        t["b_enc"] = s["encoder.bias"]
    if name == "AutoEncoder":
        t["b_dec"] = s["bias"]
    elif name == "AutoEncoderNew":  # pre = encoder(x): fold the decoder bias saelab subtracts first
        t["b_dec"] = s["decoder.bias"]
        t["b_enc"] = t["b_enc"].double() + t["b_dec"].double() @ t["W_enc"].double()
    elif name == "GatedAutoEncoder":
        t["b_dec"] = s["decoder_bias"]
    else:
        t["b_dec"] = s["b_dec"]
    return {k: v.contiguous() for k, v in t.items()}


def _check_shapes(t: dict[str, Tensor], d: int, n: int, where: str) -> None:
    expected = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}  # b_enc: not in gated SAEs
    wrong = {k: (tuple(v.shape), expected[k]) for k, v in t.items() if tuple(v.shape) != expected[k]}
    if wrong:
        raise ValueError(f"{where}: inconsistent shapes (found, expected) {wrong}.")


def dictionary_learning_state(sae: SAE) -> dict[str, Tensor]:
    """The state dict of the dictionary_learning class the SAE's variant exports to: its weights in that class's
    layout, plus the variant's `dictionary_learning_extras` (k, threshold, ...)."""
    name = _export_class(sae)
    p = {k: v.detach().cpu() for k, v in sae.state_dict().items()}
    weights, extras = CLASSES[name]
    if weights == _PLAIN:
        out = {k: p[k].contiguous() for k in _PLAIN}
        if name in _NO_B_DEC_IN:  # its encoder does not subtract b_dec: move b_dec @ W_enc into b_enc
            out["b_enc"] = (p["b_enc"].double() - p["b_dec"].double() @ p["W_enc"].double()).to(
                p["b_enc"].dtype
            )
    else:
        out = {"encoder.weight": p["W_enc"].T.contiguous(), "decoder.weight": p["W_dec"].T.contiguous()}
        if "encoder.bias" in weights:
            out["encoder.bias"] = p["b_enc"].contiguous()
        bias = next(k for k in weights if k not in _LINEAR)
        out[bias] = p["b_dec"].contiguous()
    added = sae.dictionary_learning_extras()
    if set(added) != set(extras):
        raise ValueError(
            f"{type(sae).__name__}.dictionary_learning_extras gives {sorted(added)}; a {name} holds {sorted(extras)}."
        )
    return {**out, **added}


def _export_class(sae: SAE) -> str:
    name = type(sae).dictionary_learning_class
    if name is None:
        exportable = sorted(cls.architecture for cls in variant_classes() if cls.dictionary_learning_class)
        raise ValueError(
            f"dictionary_learning has no equivalent of saelab's {sae.cfg.architecture!r} SAE; export supports "
            f"{exportable}."
        )
    return name


def dictionary_learning_config(sae: SAE) -> dict[str, Any]:
    """config.json for `sae`: trainer.dict_class / trainer_class / activation_dim / dict_size (/ k, / the
    variant's `dictionary_learning_trainer_fields`), lm_name and layer from the SAE's metadata, and the buffer
    section of the config it was loaded from, if any."""
    meta = sae.cfg.metadata
    previous = meta.get("dictionary_learning") or {}
    trainer: dict[str, Any] = {
        "dict_class": _export_class(sae),
        "trainer_class": type(sae).dictionary_learning_trainer,
        "activation_dim": sae.d_in,
        "dict_size": sae.d_sae,
    }
    if "k" in CLASSES[trainer["dict_class"]][1]:
        trainer["k"] = sae.cfg.k
    trainer.update(sae.dictionary_learning_trainer_fields())
    trainer.update(
        lm_name=meta.get("model_name"),
        layer=meta.get("hook_layer"),
        submodule_name=(previous.get("trainer") or {}).get("submodule_name", meta.get("hook_name")),
    )
    config: dict[str, Any] = {"trainer": trainer}
    if isinstance(previous.get("buffer"), dict):
        config["buffer"] = previous["buffer"]
    return config


def export_dictionary_learning(sae: SAE, path: str | Path) -> Path:
    """Write `sae` into directory `path` in dictionary_learning's format (ae.pt + config.json), atomically;
    dictionary_learning's `utils.load_dictionary(path, device)` then loads it. The class written is the variant's
    `dictionary_learning_class` (relu: AutoEncoder, topk: AutoEncoderTopK, batchtopk: BatchTopKSAE, jumprelu:
    JumpReluAutoEncoder); variants without one are refused.
    """
    state = dictionary_learning_state(sae)
    config = dictionary_learning_config(sae)
    with atomic_directory(path) as tmp:
        torch.save(state, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=4))
    return Path(path).expanduser()

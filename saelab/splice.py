"""Run a language model with an SAE spliced in at one hook point.

Two kinds of model are supported:
- TransformerLens models (HookedTransformer; anything with `hook_dict` and `hooks()`):
  `hook_name` is a hook point such as "blocks.6.hook_resid_post".
- Any other `torch.nn.Module` (e.g. Hugging Face transformers): `hook_name` names a submodule such as
  "model.layers.6"; its output (or the first element of a tuple output) is substituted.

    with spliced(model, sae, "blocks.6.hook_resid_post") as splice:
        logits = model(tokens)                 # runs with x replaced by the SAE reconstruction x_hat
        splice.mode = "zero"; model(tokens)    # same hook, activation zero-ablated
        splice.codes                           # codes of the last "reconstruct" pass (dense or sparse)

`feature_activations(model, sae, hook_name, tokens)` returns dense codes [batch, pos, d_sae] and stops the
forward pass at the hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from saelab.eval.codes import Codes, decode_codes, encode_codes, to_dense
from saelab.sae.base import SAE

MODES = ("reconstruct", "zero", "clean", "encode")


class _StopForward(Exception):
    """Raised inside a hook ("encode" mode) to end a forward pass once the codes are captured."""


class Splice:
    """The live state of a splice: set `mode` / `mask` between forward passes, read `x`, `codes`, `x_hat`.

    mode: "reconstruct" (x -> x_hat), "zero" (x -> 0), "clean" (x unchanged, only recorded) or "encode"
    (record x and its codes, then stop the forward pass; see `feature_activations`).
    mask: optional bool [batch, pos]; only True positions are substituted (e.g. to leave BOS untouched).
    x: last activation seen at the hook [batch, pos, d]; codes: SAE codes of the last reconstruct pass over
    the flattened positions [batch * pos, ...]; x_hat: that pass's reconstruction [batch, pos, d].
    """

    def __init__(self, sae: SAE, hook_name: str, mode: str = "reconstruct", mask: Tensor | None = None):
        self.sae = sae
        self.hook_name = hook_name
        self.mode = mode
        self.mask = mask
        self.x: Tensor | None = None
        self.codes: Codes | None = None
        self.x_hat: Tensor | None = None

    def substitute(self, act: Tensor) -> Tensor:
        """act [..., d_in] -> the activation the rest of the model sees."""
        if self.mode not in MODES:
            raise ValueError(f"splice mode {self.mode!r} is not one of {MODES}.")
        self.sae.check_input(act)
        self.x = act.detach()
        if self.mode == "clean":
            return act
        if self.mode == "zero":
            new = torch.zeros_like(act)
        else:
            flat = rearrange(act, "... d -> (...) d").to(self.sae.W_dec.dtype)
            self.codes = encode_codes(self.sae, flat)
            if self.mode == "encode":
                raise _StopForward
            new = decode_codes(self.sae, self.codes).reshape(act.shape).to(act.dtype)
            self.x_hat = new.detach()
        if self.mask is None:
            return new
        if self.mask.shape != act.shape[:-1]:
            raise ValueError(
                f"splice mask has shape {tuple(self.mask.shape)} but the activation at {self.hook_name!r} "
                f"has leading shape {tuple(act.shape[:-1])}; pass a [batch, pos] mask for this batch."
            )
        return torch.where(self.mask[..., None].to(act.device), new, act)


def is_transformer_lens(model: nn.Module) -> bool:
    return hasattr(model, "hook_dict") and hasattr(model, "hooks")


def check_hook_name(model: nn.Module, hook_name: str) -> None:
    """Raise a clear error when `hook_name` is not a hook point (TransformerLens) or submodule (nn.Module)."""
    if is_transformer_lens(model):
        if hook_name not in model.hook_dict:
            near = [name for name in model.hook_dict if name.split(".")[-1] == hook_name.split(".")[-1]][:5]
            raise ValueError(f"hook {hook_name!r} is not a hook point of this model; similar ones: {near}.")
        return
    try:
        model.get_submodule(hook_name)
    except AttributeError as err:
        layers = [name for name, _ in model.named_modules() if name.count(".") <= 2][:8]
        raise ValueError(
            f"hook {hook_name!r} is not a submodule of this {type(model).__name__}; "
            f"name a submodule such as {layers}."
        ) from err


@contextlib.contextmanager
def spliced(
    model: nn.Module, sae: SAE, hook_name: str, mode: str = "reconstruct", mask: Tensor | None = None
) -> Iterator[Splice]:
    """Install the SAE at `hook_name` for the duration of the block; yields the `Splice` handle."""
    check_hook_name(model, hook_name)
    splice = Splice(sae, hook_name, mode, mask)
    if is_transformer_lens(model):
        with model.hooks(fwd_hooks=[(hook_name, lambda act, hook: splice.substitute(act))]):
            yield splice
        return

    def forward_hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (splice.substitute(output[0]), *output[1:])
        return splice.substitute(output)

    handle = model.get_submodule(hook_name).register_forward_hook(forward_hook)
    try:
        yield splice
    finally:
        handle.remove()


@torch.no_grad()
def feature_activations(
    model: nn.Module, sae: SAE, hook_name: str, tokens: Tensor, **forward_kwargs: Any
) -> Tensor:
    """SAE codes of the activations at `hook_name` for a batch of tokens [batch, pos]: dense [batch, pos, d_sae].

    The forward pass stops at the hook, so later layers are not run.
    """
    with spliced(model, sae, hook_name, mode="encode") as splice, contextlib.suppress(_StopForward):
        model(tokens, **forward_kwargs)
    if splice.codes is None or splice.x is None:
        raise RuntimeError(f"the forward pass never reached hook {hook_name!r}.")
    return to_dense(splice.codes, sae.d_sae).reshape(*splice.x.shape[:-1], sae.d_sae)

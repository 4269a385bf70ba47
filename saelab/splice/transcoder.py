"""Splice a transcoder into a language model: its input is read at one hook and its prediction replaces the
activation at another (`saelab.splice.hooks.spliced` hands transcoders over to `spliced_transcoder`).

    with spliced(model, transcoder, "blocks.6.ln2.hook_normalized", target_hook="blocks.6.hook_mlp_out") as s:
        logits = model(tokens)        # the MLP's output replaced by the transcoder's prediction
        s.mode = "mean"; model(tokens)  # ... by its mean over the batch's substituted positions

Hook names as in `spliced`: TransformerLens hook points, or submodule names of any other module, where
"<module>:input" is a submodule's first input (so "model.layers.6.mlp:input" -> "model.layers.6.mlp" is an HF
MLP's input -> output). The input hook must run before the target hook in the forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from saelab.metrics.codes import encode_codes, output_of
from saelab.sae.base import SAE
from saelab.splice.hooks import Splice, _StopForward, check_hook_name, is_transformer_lens

MODES = ("reconstruct", "zero", "mean", "clean", "encode")
#: Suffix naming a submodule's input (as `saelab.harvest.module.INPUT_SUFFIX`).
INPUT_SUFFIX = ":input"


class TranscoderSplice(Splice):
    """A `Splice` whose codes come from the input hook: `input` [batch, pos, d_in] is the activation read there,
    `x` [batch, pos, d_out] the clean activation at the target hook and `x_hat` the prediction that replaced it.

    mode: "reconstruct" (target -> prediction), "zero", "mean" (target -> its mean over the substituted positions
    of the batch), "clean" (only recorded) or "encode" (record the input's codes, then stop the forward pass).
    """

    def __init__(self, sae: SAE, hook_name: str, target_hook: str, **kwargs: Any):
        super().__init__(sae, hook_name, **kwargs)
        self.target_hook = target_hook
        self.input: Tensor | None = None

    def read_input(self, act: Tensor) -> None:
        """Record the transcoder's input act [..., d_in] (and, in "encode" mode, its codes; then stop)."""
        self.sae.check_input(act)
        self.input = act.detach()
        if self.mode == "encode":
            self.codes = encode_codes(self.sae, rearrange(act, "... d -> (...) d").to(self.sae.W_dec.dtype))
            raise _StopForward

    def substitute(self, act: Tensor) -> Tensor:
        """act [..., d_out] at the target hook -> the activation the rest of the model sees."""
        if self.mode not in MODES:
            raise ValueError(f"splice mode {self.mode!r} is not one of {MODES}.")
        if act.shape[-1] != self.sae.d_out:
            raise ValueError(
                f"the activation at target hook {self.target_hook!r} has width {act.shape[-1]}, but the "
                f"transcoder predicts d_out={self.sae.d_out}; splice it at the hook it was trained to predict."
            )
        self.x = act.detach()
        if self.mode == "clean":
            return act
        mask = self.substituted_positions()
        if self.mode == "zero":
            new = torch.zeros_like(act)
        elif self.mode == "mean":
            rows = act if mask is None else act[mask.to(act.device)]
            new = rows.reshape(-1, act.shape[-1]).mean(dim=0).expand_as(act)
        else:
            if self.input is None or self.input.shape[:-1] != act.shape[:-1]:
                raise RuntimeError(
                    f"the input hook {self.hook_name!r} did not run before target hook {self.target_hook!r} "
                    "in this forward pass; name an input hook that comes first."
                )
            flat = rearrange(self.input, "... d -> (...) d").to(self.sae.W_dec.dtype)
            self.codes = encode_codes(self.sae, flat)
            new = output_of(self.sae, flat, self.codes).reshape(act.shape).to(act.dtype)
            self.x_hat = new.detach()
        return self.masked(act, new, mask, self.target_hook)


def first_tensor(value: Any) -> Tensor:
    """A module's output, or the first element of a tuple of them / its first positional input."""
    return value[0] if isinstance(value, (tuple, list)) else value


@contextlib.contextmanager
def spliced_transcoder(
    model: nn.Module, splice: TranscoderSplice, handles: list[Any]
) -> Iterator[TranscoderSplice]:
    """Install `splice` (input hook `splice.hook_name`, target `splice.target_hook`) for the block; `handles`
    are hooks already installed (removed at the end too)."""
    inp, target = splice.hook_name, splice.target_hook
    try:
        if is_transformer_lens(model):
            for name in (inp, target):
                check_hook_name(model, name)

            def read(act: Tensor, hook: Any) -> None:
                splice.read_input(act)

            with model.hooks(fwd_hooks=[(inp, read), (target, lambda act, hook: splice.substitute(act))]):
                yield splice
            return
        for name in (inp, target):
            check_hook_name(model, name.removesuffix(INPUT_SUFFIX))

        def read_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            value = (args or tuple(kwargs.values())) if inp.endswith(INPUT_SUFFIX) else output
            splice.read_input(first_tensor(value))

        def target_hook(module: nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (splice.substitute(output[0]), *output[1:])
            return splice.substitute(output)

        read_module = model.get_submodule(inp.removesuffix(INPUT_SUFFIX))
        handles.append(read_module.register_forward_hook(read_hook, with_kwargs=True))
        handles.append(model.get_submodule(target).register_forward_hook(target_hook))
        yield splice
    finally:
        for handle in handles:
            handle.remove()

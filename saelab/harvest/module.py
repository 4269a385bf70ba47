"""Harvest from any torch.nn.Module (e.g. a Hugging Face transformers model) with forward hooks on named
submodules ("model.layers.6" is the residual stream after decoder layer 6 of a Llama; "<module>:input" is the
module's first input, e.g. "model.layers.6.mlp:input", the MLP's input that a transcoder pairs with
"model.layers.6.mlp", its output). Once every hooked module has fired, the forward pass is abandoned, so layers
past the last hook are not run."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saelab.harvest.base import per_token
from saelab.harvest.names import check_hook_names

#: Suffix naming a submodule's input instead of its output.
INPUT_SUFFIX = ":input"


def module_of(hook_name: str) -> str:
    """The submodule a hook name reads: the name without INPUT_SUFFIX."""
    return hook_name.removesuffix(INPUT_SUFFIX)


class _StopForward(Exception):
    """Raised by the last hook to fire, to skip the rest of the model."""


def _first_tensor(output: object, name: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    what = "was called with" if name.endswith(INPUT_SUFFIX) else "returned"
    raise TypeError(f"submodule {module_of(name)!r} {what} {type(output).__name__}; hook a tensor.")


class ModuleHarvester:
    """Outputs of named submodules of `model`, called as `model(tokens)`; several submodules in one pass."""

    def __init__(self, model: nn.Module, hook_names: list[str], stop_early: bool = True):
        self.model = model
        modules = dict(model.named_modules())
        modules.pop("", None)
        kind = f"submodule of {type(model).__name__} (or one with the suffix {INPUT_SUFFIX}: its input)"
        available = set(modules) | {name + INPUT_SUFFIX for name in modules}
        self.hook_names = check_hook_names(hook_names, available, kind)
        self.modules = {name: modules[module_of(name)] for name in self.hook_names}
        self.stop_early = stop_early
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, tokens: Tensor) -> dict[str, Tensor]:
        """tokens [B, T] -> {submodule name: output [B, T, d]} on the model's device."""
        tokens = tokens.to(self.device)
        captured: dict[str, Tensor] = {}

        def make_hook(name: str):
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
                if name.endswith(INPUT_SUFFIX):
                    output = args if args else next(iter(kwargs.values()), None)
                captured[name] = _first_tensor(output, name).detach()
                if self.stop_early and len(captured) == len(self.modules):
                    raise _StopForward

            return hook

        handles = [
            module.register_forward_hook(make_hook(name), with_kwargs=True)
            for name, module in self.modules.items()
        ]
        try:
            self.model(tokens)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in self.hook_names if name not in captured]
        if missing:
            raise RuntimeError(
                f"submodules {missing} did not run in the forward pass; hook modules on its path."
            )
        return {name: per_token(name, captured[name], tokens) for name in self.hook_names}

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

As in `saelab eval`, special tokens (BOS, EOS, pad, ... of the model's tokenizer, else of its Hugging Face
config; or `special_token_ids=`) keep their activations by default: the token ids of each forward pass are
read from its input, and only the other positions are substituted. `keep_special_tokens=False` substitutes
every position; an explicit `mask` decides by itself.

`feature_activations(model, sae, hook_name, tokens)` returns dense codes [batch, pos, d_sae] and stops the
forward pass at the hook.

A transcoder (`sae.is_transcoder`) reads its input at `hook_name` and replaces the activation at
`target_hook` (default: its metadata's `hook_name_out`) with its prediction (`saelab.splice.transcoder`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from saelab.data.tokens import excluded_token_ids
from saelab.metrics.codes import Codes, decode_codes, encode_codes, to_dense
from saelab.sae.base import SAE

MODES = ("reconstruct", "zero", "clean", "encode")


class _StopForward(Exception):
    """Raised inside a hook ("encode" mode) to end a forward pass once the codes are captured."""


class Splice:
    """The live state of a splice: set `mode` / `mask` between forward passes, read `x`, `codes`, `x_hat`.

    mode: "reconstruct" (x -> x_hat), "zero" (x -> 0), "clean" (x unchanged, only recorded) or "encode"
    (record x and its codes, then stop the forward pass; see `feature_activations`).
    mask: optional bool [batch, pos]; only True positions are substituted (e.g. to leave BOS untouched).
    special_token_ids: [E] ids whose positions keep their activation when `mask` is None, judged from
    `tokens` [batch, pos], the ids of the current forward pass (set by `spliced`).
    x: last activation seen at the hook [batch, pos, d]; codes: SAE codes of the last reconstruct pass over
    the flattened positions [batch * pos, ...]; x_hat: that pass's reconstruction [batch, pos, d].
    """

    def __init__(
        self,
        sae: SAE,
        hook_name: str,
        mode: str = "reconstruct",
        mask: Tensor | None = None,
        special_token_ids: Tensor | None = None,
    ):
        self.sae = sae
        self.hook_name = hook_name
        self.mode = mode
        self.mask = mask
        self.special_token_ids = special_token_ids
        self.tokens: Tensor | None = None
        self.x: Tensor | None = None
        self.codes: Codes | None = None
        self.x_hat: Tensor | None = None

    def substituted_positions(self) -> Tensor | None:
        """bool [batch, pos] of the positions to substitute (None: all of them)."""
        if self.mask is not None or self.special_token_ids is None:
            return self.mask
        if self.tokens is None:
            raise ValueError(
                "the splice keeps special tokens' activations, so it needs the token ids of the forward pass: "
                "call the model on token ids (e.g. model(model.to_tokens(text))), or pass "
                "keep_special_tokens=False to spliced()."
            )
        return ~torch.isin(self.tokens, self.special_token_ids.to(self.tokens.device))

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
        return self.masked(act, new, self.substituted_positions(), self.hook_name)

    @staticmethod
    def masked(act: Tensor, new: Tensor, mask: Tensor | None, hook_name: str) -> Tensor:
        """new [..., d] where mask [batch, pos] is True (everywhere for None), act [..., d] elsewhere."""
        if mask is None:
            return new
        if mask.shape != act.shape[:-1]:
            raise ValueError(
                f"splice mask has shape {tuple(mask.shape)} but the activation at {hook_name!r} "
                f"has leading shape {tuple(act.shape[:-1])}; pass a [batch, pos] mask for this batch."
            )
        return torch.where(mask[..., None].to(act.device), new, act)


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


def model_special_token_ids(model: nn.Module) -> list[int]:
    """Special token ids of a model: its tokenizer's (TransformerLens), else its Hugging Face config's
    BOS / EOS / pad ids; [] when it has neither."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return excluded_token_ids(tokenizer)
    config = getattr(model, "config", None)
    ids: set[int] = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        ids.update(int(v) for v in values if v is not None)
    return sorted(ids)


def input_token_ids(args: tuple, kwargs: dict[str, Any]) -> Tensor | None:
    """The token ids [batch, pos] of a model call: `input_ids` / `input` / `tokens`, else the first integer
    tensor argument; None when there is none (e.g. a TransformerLens call on a string)."""
    named = [kwargs.get(name) for name in ("input_ids", "input", "tokens")]
    for value in [*named, *args]:
        if isinstance(value, Tensor) and not value.is_floating_point() and value.dtype != torch.bool:
            return value if value.ndim == 2 else value.reshape(1, -1)
    return None


@contextlib.contextmanager
def spliced(
    model: nn.Module,
    sae: SAE,
    hook_name: str,
    mode: str = "reconstruct",
    mask: Tensor | None = None,
    *,
    keep_special_tokens: bool = True,
    special_token_ids: Sequence[int] | None = None,
    target_hook: str | None = None,
) -> Iterator[Splice]:
    """Install the SAE at `hook_name` for the duration of the block; yields the `Splice` handle.

    Positions of special tokens keep their activations (as in `saelab eval`) unless keep_special_tokens is
    False; special_token_ids default to `model_special_token_ids(model)`. An explicit `mask` [batch, pos]
    (True = substitute) overrides both. A transcoder reads `hook_name` and replaces `target_hook` (default:
    its metadata's hook_name_out), yielding a `saelab.splice.transcoder.TranscoderSplice`.
    """
    ids = list(special_token_ids) if special_token_ids is not None else model_special_token_ids(model)
    keep = torch.tensor(ids, dtype=torch.long) if keep_special_tokens and mask is None and ids else None
    splice = Splice(sae, hook_name, mode, mask, keep)
    if sae.is_transcoder:
        from saelab.splice.transcoder import TranscoderSplice

        target = target_hook or sae.cfg.metadata.get("hook_name_out")
        if not target:
            raise ValueError(
                "this transcoder's metadata names no target hook (hook_name_out); pass target_hook=, the hook "
                "whose activation it predicts."
            )
        splice = TranscoderSplice(sae, hook_name, target, mode=mode, mask=mask, special_token_ids=keep)

    def read_tokens(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        splice.tokens = input_token_ids(args, kwargs)

    handles = [model.register_forward_pre_hook(read_tokens, with_kwargs=True)] if keep is not None else []
    if sae.is_transcoder:
        from saelab.splice.transcoder import spliced_transcoder

        with spliced_transcoder(model, splice, handles) as installed:
            yield installed
        return
    try:
        with edited(model, hook_name, splice.substitute):
            yield splice
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def edited(model: nn.Module, hook_name: str, edit: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """For the duration of the block, the rest of the model sees edit(act) instead of the activation act
    [..., d] at `hook_name` (a TransformerLens hook point, or a submodule whose output, or the first element
    of its tuple output, is replaced)."""
    check_hook_name(model, hook_name)
    if is_transformer_lens(model):
        with model.hooks(fwd_hooks=[(hook_name, lambda act, hook: edit(act))]):
            yield
        return

    def forward_hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    handle = model.get_submodule(hook_name).register_forward_hook(forward_hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def feature_activations(
    model: nn.Module, sae: SAE, hook_name: str, tokens: Tensor, **forward_kwargs: Any
) -> Tensor:
    """SAE codes of the activations at `hook_name` for a batch of tokens [batch, pos]: dense [batch, pos, d_sae]
    (a transcoder's: of its input, read at `hook_name`).

    The forward pass stops at the hook, so later layers are not run.
    """
    target = sae.cfg.metadata.get("hook_name_out") or hook_name  # a transcoder stops at its input anyway
    with (
        spliced(model, sae, hook_name, mode="encode", target_hook=target) as splice,
        contextlib.suppress(_StopForward),
    ):
        model(tokens, **forward_kwargs)
    read = getattr(splice, "input", None) if sae.is_transcoder else splice.x
    if splice.codes is None or read is None:
        raise RuntimeError(f"the forward pass never reached hook {hook_name!r}.")
    return to_dense(splice.codes, sae.d_sae).reshape(*read.shape[:-1], sae.d_sae)

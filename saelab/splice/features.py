"""Read an SAE's feature activations for a list of texts: tokenize, run the model to the SAE's hook, encode.

    feats = read_features(model, sae, ["The cat sat.", "A dog ran."], tokenizer=tok)
    feats.acts      # [batch, pos, d_sae], zero at padding
    feats.tokens    # [batch, pos] token ids; feats.mask [batch, pos] True at real tokens

Texts are tokenized one by one and right-padded, so a text's activations do not depend on the others in the
batch (Hugging Face models also get the attention mask). BOS follows `prepend_bos`, which defaults to the
SAE's metadata (what it was trained with), so the first token's codes match the training activations.
The splice itself is `saelab.splice.hooks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.data.tokens import bos_token_id
from saelab.sae.base import SAE
from saelab.splice.hooks import feature_activations, is_transformer_lens


@dataclass
class FeatureActivations:
    """acts [batch, pos, d_sae] (zero where mask is False), tokens [batch, pos], mask [batch, pos] bool."""

    acts: Tensor
    tokens: Tensor
    mask: Tensor


def tokenize(
    model: nn.Module, texts: Sequence[str], tokenizer: Any, prepend_bos: bool | None
) -> list[Tensor]:
    """One 1-D LongTensor of ids per text: `model.to_tokens` for TransformerLens models, else `tokenizer`.

    prepend_bos None: the tokenizer's / model's default; True / False: the text's own tokens (no special
    tokens added by the tokenizer) with / without BOS in front (the tokenizer's BOS, else its EOS, as in
    `saelab harvest`)."""
    if tokenizer is None and hasattr(model, "to_tokens"):
        kwargs = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
        return [model.to_tokens(text, **kwargs)[0].cpu() for text in texts]
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"{type(model).__name__} has no tokenizer; pass tokenizer= (e.g. AutoTokenizer).")
    out = []
    for text in texts:
        if prepend_bos is None:
            ids = torch.as_tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        else:
            ids = torch.as_tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            if prepend_bos:
                ids = torch.cat([torch.tensor([bos_token_id(tokenizer)]), ids])
        out.append(ids)
    return out


@torch.no_grad()
def read_features(
    model: nn.Module,
    sae: SAE,
    texts: Sequence[str],
    *,
    tokenizer: Any = None,
    hook_name: str | None = None,
    prepend_bos: bool | None = None,
) -> FeatureActivations:
    """Feature activations of `sae` at `hook_name` (default: the SAE's metadata hook_name) for each text.

    model: a TransformerLens model (tokenized with `model.to_tokens`) or a Hugging Face model with
    `tokenizer`. prepend_bos: add BOS (True), not (False); None: the SAE's metadata `prepend_bos` if it has
    one, else the tokenizer's / model's default. Returns acts [batch, pos, d_sae] on the SAE's device.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string.")
    if not texts:
        raise ValueError("texts is empty; pass at least one string.")
    hook_name = hook_name or sae.cfg.metadata.get("hook_name")
    if not hook_name:
        raise ValueError("the SAE's metadata has no hook_name; pass hook_name= (the hook it was trained on).")
    if prepend_bos is None:
        prepend_bos = sae.cfg.metadata.get("prepend_bos")
    ids = tokenize(model, texts, tokenizer, prepend_bos)
    length = max(len(t) for t in ids)
    tokens = torch.zeros(len(ids), length, dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.bool)
    for row, t in enumerate(ids):
        tokens[row, : len(t)] = t
        mask[row, : len(t)] = True
    device = next(model.parameters()).device
    kwargs = {} if is_transformer_lens(model) else {"attention_mask": mask.long().to(device)}
    acts = feature_activations(model, sae, hook_name, tokens.to(device), **kwargs)
    acts = acts * mask.to(acts.device)[..., None]
    return FeatureActivations(acts=acts, tokens=tokens, mask=mask)

"""What the weights alone say about each latent: nearest latents by decoder cosine and the output tokens its
decoder direction promotes / suppresses through the unembedding. Both are computed `chunk` latents at a time
([chunk, n] or [chunk, vocab] in memory, never [n, n])."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelab.splice.hooks import is_transformer_lens

#: Attribute names of the final normalisation under a Hugging Face model's `base_model`.
HF_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


@torch.no_grad()
def nearest_by_decoder(W_dec: Tensor, m: int, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """W_dec [n, d] -> (ids [n, m'], cosines [n, m']) of each latent's nearest other latents, m' = min(m, n-1),
    descending."""
    n = W_dec.shape[0]
    m = min(m, n - 1)
    w = F.normalize(W_dec.detach().float(), dim=1)
    ids, cos = [], []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=w.device)
        sims = w[rows] @ w.T
        sims[torch.arange(rows.numel(), device=w.device), rows] = -torch.inf
        best = sims.topk(m, dim=1)
        ids.append(best.indices)
        cos.append(best.values)
    return torch.cat(ids), torch.cat(cos)


def unembedding(model: nn.Module) -> tuple[Tensor | None, bool, str]:
    """(W_U [d, vocab] with the final norm's scale folded in, whether the norm centres its input, a note).

    TransformerLens: model.W_U and ln_final.w. Hugging Face: the output embeddings and the base model's final
    norm weight. W_U is None for a model without an unembedding.
    """
    if is_transformer_lens(model):
        W_U = model.W_U.detach()
        ln = getattr(model, "ln_final", None)
        scale = getattr(ln, "w", None)
        centres = getattr(model.cfg, "normalization_type", None) in ("LN", "LNPre")
        note = (
            "decoder direction @ diag(ln_final.w) @ W_U" if scale is not None else "decoder direction @ W_U"
        )
    else:
        get = getattr(model, "get_output_embeddings", None)
        out = get() if get is not None else None
        if out is None or getattr(out, "weight", None) is None:
            return None, False, f"{type(model).__name__} has no output embedding; logit effects skipped."
        W_U = out.weight.detach().T
        base = getattr(model, "base_model", model)
        ln = next((getattr(base, name) for name in HF_FINAL_NORMS if hasattr(base, name)), None)
        scale = getattr(ln, "weight", None)
        centres = isinstance(ln, nn.LayerNorm)
        note = "decoder direction @ diag(final norm weight) @ lm_head.T"
        if scale is None:
            note = "decoder direction @ lm_head.T (no final norm weight found)"
    if scale is not None:
        W_U = scale.detach()[:, None] * W_U
    if centres:
        note += ", direction centred (LayerNorm)"
    return W_U, centres, note + "; the final norm's division by the residual norm is ignored."


@torch.no_grad()
def logit_effects(
    W_dec: Tensor, W_U: Tensor, m: int, centre: bool = False, chunk: int = 512
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(promoted ids, promoted logits, suppressed ids, suppressed logits), each [n, m]: the largest and
    smallest entries of each row of W_dec @ W_U (rows centred first when the final norm is a LayerNorm)."""
    m = min(m, W_U.shape[1])
    W_U = W_U.to(W_dec.device, torch.float32)
    top_i, top_v, low_i, low_v = [], [], [], []
    for start in range(0, W_dec.shape[0], chunk):
        w = W_dec[start : start + chunk].detach().float()
        if centre:
            w = w - w.mean(dim=1, keepdim=True)
        logits = w @ W_U
        hi, lo = logits.topk(m, dim=1), logits.topk(m, dim=1, largest=False)
        top_i.append(hi.indices)
        top_v.append(hi.values)
        low_i.append(lo.indices)
        low_v.append(lo.values)
    return torch.cat(top_i), torch.cat(top_v), torch.cat(low_i), torch.cat(low_v)

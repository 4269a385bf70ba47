"""What the weights alone say about each latent: nearest latents by decoder cosine, the output tokens its
decoder direction promotes / suppresses through the unembedding, and the histogram of that direction's logit
weights over the whole vocabulary.

Both analyses stream `chunk` latents at a time through the SAE's device (`inspect.device`: CUDA when there is
one): [chunk, n] or [chunk, vocab] in memory, never [n, n], and each chunk's results go to the CPU before the
next one starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelab.splice.hooks import is_transformer_lens

if TYPE_CHECKING:
    from saelab.inspect.config import InspectConfig

#: Attribute names of the final normalisation under a Hugging Face model's `base_model`.
HF_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


@torch.no_grad()
def nearest_by_decoder(
    W_dec: Tensor, m: int, chunk: int = 2048, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """W_dec [n, d] -> (ids [n, m'], cosines [n, m']) of each latent's nearest other latents, m' = min(m, n-1),
    descending; on the CPU, computed on `device` (default W_dec's)."""
    n = W_dec.shape[0]
    m = min(m, n - 1)
    w = F.normalize(W_dec.detach().to(device or W_dec.device, torch.float32), dim=1)
    ids, cos = [], []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=w.device)
        sims = w[rows] @ w.T
        sims[torch.arange(rows.numel(), device=w.device), rows] = -torch.inf
        best = sims.topk(m, dim=1)
        ids.append(best.indices.cpu())
        cos.append(best.values.cpu())
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


@dataclass
class LogitEffects:
    """Per latent [n, m]: the output tokens its direction raises most (promoted) and lowers most
    (suppressed) with their logit weights; and the histogram of all its vocab logit weights: range [n, 2]
    (min, max) and counts [n, bins] over equal-width bins of that range."""

    promoted_ids: Tensor
    promoted_logits: Tensor
    suppressed_ids: Tensor
    suppressed_logits: Tensor
    hist_range: Tensor
    hist_counts: Tensor


def row_histograms(x: Tensor, low: Tensor, high: Tensor, bins: int) -> Tensor:
    """x [c, V], its rows' min / max [c] -> counts [c, bins] int64 over `bins` equal-width bins of each row's
    range (the max falls in the last bin); one bincount over the flattened bin indices."""
    c = x.shape[0]
    scale = bins / (high - low).clamp_min(torch.finfo(torch.float32).tiny)
    index = ((x - low[:, None]) * scale[:, None]).to(torch.int32).clamp_(0, bins - 1)
    index += (torch.arange(c, dtype=torch.int32, device=x.device) * bins)[:, None]
    return torch.bincount(index.view(-1), minlength=c * bins).view(c, bins)


@torch.no_grad()
def logit_effects(
    W_dec: Tensor,
    W_U: Tensor,
    m: int,
    centre: bool = False,
    chunk: int = 512,
    bins: int = 32,
    device: torch.device | None = None,
) -> LogitEffects:
    """The rows of W_dec @ W_U (rows of W_dec centred first when the final norm is a LayerNorm), one chunk of
    latents at a time on `device` (default W_dec's): their m largest and smallest entries and their
    histograms. Results on the CPU."""
    device = device or W_dec.device
    m = min(m, W_U.shape[1])
    W_U = W_U.to(device, torch.float32)
    parts: list[list[Tensor]] = [[] for _ in range(6)]
    for start in range(0, W_dec.shape[0], chunk):
        w = W_dec[start : start + chunk].detach().to(device, torch.float32)
        if centre:
            w = w - w.mean(dim=1, keepdim=True)
        logits = w @ W_U
        hi, lo = logits.topk(m, dim=1), logits.topk(m, dim=1, largest=False)
        low, high = logits.amin(dim=1), logits.amax(dim=1)
        counts = row_histograms(logits, low, high, bins)
        for part, t in zip(
            parts,
            (hi.indices, hi.values, lo.indices, lo.values, torch.stack([low, high], 1), counts),
            strict=True,
        ):
            part.append(t.cpu())
    return LogitEffects(*(torch.cat(p) for p in parts))


@dataclass
class WeightAnalyses:
    """The weight-only analyses of `collect_features`: nearest latents ([n, m] ids and cosines) and, with an
    unembedding of the SAE's width, the logit effects (else None, and `note` says why)."""

    nearest_ids: Tensor
    nearest_cos: Tensor
    promoted_ids: Tensor | None = None
    promoted_logits: Tensor | None = None
    suppressed_ids: Tensor | None = None
    suppressed_logits: Tensor | None = None
    logit_hist_range: Tensor | None = None
    logit_hist_counts: Tensor | None = None
    note: str = ""


def weight_analyses(sae: Any, model: nn.Module, cfg: InspectConfig) -> WeightAnalyses:
    """Nearest latents and logit effects of `sae` (its decoder W_dec [n, d]) through `model`'s unembedding."""
    device = sae.W_dec.device
    ids, cos = nearest_by_decoder(sae.W_dec, cfg.n_neighbours, cfg.weights_chunk, device)
    out = WeightAnalyses(ids, cos)
    W_U, centre, out.note = unembedding(model)
    # decoder rows live in the SAE's output space (a transcoder's target)
    if W_U is not None and W_U.shape[0] != sae.d_out:
        W_U, out.note = None, f"the unembedding has d_model={W_U.shape[0]} != SAE d_out={sae.d_out}; skipped."
    if W_U is not None and cfg.n_logit_tokens > 0:
        chunk = max(1, cfg.weights_chunk // 8)  # [chunk, vocab] float32 + int32 indices
        effects = logit_effects(
            sae.W_dec, W_U, cfg.n_logit_tokens, centre, chunk, cfg.logit_hist_bins, device
        )
        out.promoted_ids, out.promoted_logits = effects.promoted_ids, effects.promoted_logits
        out.suppressed_ids, out.suppressed_logits = effects.suppressed_ids, effects.suppressed_logits
        out.logit_hist_range, out.logit_hist_counts = effects.hist_range, effects.hist_counts
    return out

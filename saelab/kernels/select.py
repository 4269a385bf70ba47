"""Exact per-row top-k selection over pre-activations [B, n], cheaper than one `torch.topk` over all of n.

Grouped selection: split each row into G = n / s strided groups {g, g + G, ..., g + (s - 1) G}, take every
group's maximum (one streaming pass), keep the k groups with the largest maxima, and run the final top-k
over only their k * s members. This is exact: an element outside the kept groups is beaten by k group
maxima, so it cannot be in the top k (values are identical to torch.topk's; with ties, indices may differ).
The k largest group maxima are themselves found the same way while the G maxima are wide enough (n 32768,
k 32: 32768 -> 4096 maxima -> 512), so the only full-width pass is the first maximum.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

#: Candidate group sizes (largest first) and the smallest width for which grouped selection is used.
GROUP_SIZES = (8, 4, 2)
MIN_GROUPED_WIDTH = 1024


def default_group_size(n: int, k: int) -> int:
    """Group size for `topk_select` (1 = plain torch.topk): the largest s in GROUP_SIZES dividing n with at
    least 4k groups, for rows of at least MIN_GROUPED_WIDTH entries."""
    if n < MIN_GROUPED_WIDTH:
        return 1
    return next((s for s in GROUP_SIZES if n % s == 0 and n // s >= 4 * k), 1)


def topk_select(pre: Tensor, k: int, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """pre [B, n] -> (values [B, k], indices [B, k]) of each row's k largest entries, unsorted.

    Differentiable in values like torch.topk. group_size: None picks `default_group_size`; 1 forces a
    plain torch.topk; s > 1 needs n % s == 0 and n / s >= k.
    """
    n = pre.shape[-1]
    s = default_group_size(n, k) if group_size is None else group_size
    if s == 1:
        return pre.topk(k, dim=-1, sorted=False)
    if n % s or n // s < k:
        raise ValueError(f"group_size={s} needs n={n} divisible by it and n / group_size >= k={k}.")
    groups = n // s
    group_max = rearrange(pre, "b (s g) -> b s g", s=s).amax(dim=1)
    top_groups = topk_select(group_max, k)[1]
    members = torch.arange(0, n, groups, device=pre.device)
    candidates = rearrange(top_groups[:, :, None] + members, "b k s -> b (k s)")
    values, pick = pre.gather(1, candidates).topk(k, dim=-1, sorted=False)
    return values, candidates.gather(1, pick)


def dead_topk(pre: Tensor, dead_mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of pre [B, n] among latents with dead_mask [n] True -> (values [B, k], indices [B, k]).

    May overwrite the live columns of `pre` with -inf in place (call it on a buffer that is not needed
    afterwards); when fewer than k latents are dead, the extra slots hold -inf. On CPU, when at least k but
    under half of the latents are dead, only the dead columns are read (finding them needs their count on
    the host, which on CUDA would be a device sync, so CUDA always takes the masked path).
    """
    n = pre.shape[-1]
    if pre.device.type == "cpu":
        dead = dead_mask.nonzero().squeeze(1)
        if k <= dead.numel() < n // 2:
            values, pick = topk_select(pre.index_select(1, dead), k)
            return values, dead[pick]
    pre.masked_fill_(~dead_mask, -torch.inf)
    return topk_select(pre, k)

"""Bounded per-latent streaming summaries, updated from a batch of firing events with batched tensor ops.

An event is one (latent, token row) pair where the latent's code is nonzero. Every table has a fixed size per
latent, so its memory does not grow with the number of tokens read:

- `TopTable`: the `size` events with the largest score per latent (score = activation for the top examples;
  a uniform random key for the reservoir sample). Each batch's candidates are ranked within their latent by a
  sort, and the best `size` of them are merged with the kept ones by `torch.topk` over the concatenation.
- `CofiringTable`: per latent, a Misra-Gries summary of the latents firing on the same token. Each batch's
  exact pair counts are merged as in mergeable summaries (Agarwal et al. 2012): add, subtract the
  (size+1)-th largest count, drop the non-positive. A kept count is a lower bound of the true count and
  undercounts it by at most `error[latent]` (the total subtracted); an unlisted partner co-fired at most
  `error[latent]` times. With fewer distinct partners than `size` the counts are exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def rank_in_groups(groups: Tensor) -> Tensor:
    """groups [E] sorted (nondecreasing) -> [E] position of each element within its run of equal values."""
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return torch.arange(groups.numel(), device=groups.device) - starts


def descending_key(score: Tensor) -> Tensor:
    """score [E] float32 or int -> int64 in [0, 2^32) that sorts ascending as `score` sorts descending.

    Floats: the IEEE bit pattern, with the magnitude bits flipped for negatives, orders like the value.
    Integers must lie in [0, 2^31).
    """
    if score.is_floating_point():
        bits = score.float().contiguous().view(torch.int32)
        ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()
    else:
        ordered = score.long()
    return (2**31 - 1) - ordered


def best_per_group(groups: Tensor, score: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """(order, rank): indices of the `size` highest-scoring elements of each group (groups in [0, 2^31)),
    ordered by group then score descending, and their rank within the group. One int64 sort."""
    order = torch.argsort((groups.long() << 32) | descending_key(score))
    rank = rank_in_groups(groups[order])
    keep = rank < size
    return order[keep], rank[keep]


class TopTable:
    """Per latent, the `size` events with the largest score.

    score, value [n, size] float32 (-inf / 0 when empty), token [n, size] int64 (global token index, -1 when
    empty): rows sorted by score, descending. Each entry's activation window (float16, NaN outside the
    context) is stored once at `window[latent, slot[latent, rank]]` and never moved: a merge writes only the
    windows of new entries, into the slots that evicted entries free. `ranked_window()` gives them in rank order.
    """

    def __init__(self, n: int, size: int, width: int, device: torch.device):
        self.size = size
        self.score = torch.full((n, size), -torch.inf, device=device)
        self.value = torch.zeros(n, size, device=device)
        self.token = torch.full((n, size), -1, dtype=torch.long, device=device)
        self.slot = torch.arange(size, device=device).repeat(n, 1)
        self.window = torch.full((n, size, width), torch.nan, dtype=torch.float16, device=device)

    def update(
        self,
        latent: Tensor,
        score: Tensor,
        value: Tensor,
        token: Tensor,
        windows: Callable[[Tensor, Tensor], Tensor],
    ) -> Tensor:
        """Merge events (latent, score, value, token: [E]); returns the latents whose rows changed.

        windows(latent [M], token [M]) -> [M, width]: activation windows, computed only for events kept.
        """
        if self.size == 0 or latent.numel() == 0:
            return latent[:0]
        can_enter = score > self.score[latent, -1]
        latent, score, value, token = latent[can_enter], score[can_enter], value[can_enter], token[can_enter]
        order, rank = best_per_group(latent, score, self.size)
        latent, score, value, token = latent[order], score[order], value[order], token[order]
        rows = torch.unique_consecutive(latent)
        row = torch.searchsorted(rows, latent)
        t, s = rows.numel(), self.size
        new_score = torch.full((t, s), -torch.inf, device=score.device)
        new_value = torch.zeros(t, s, device=score.device)
        new_token = torch.full((t, s), -1, dtype=torch.long, device=score.device)
        new_score[row, rank], new_value[row, rank], new_token[row, rank] = score, value, token
        best, pick = torch.cat([self.score[rows], new_score], 1).topk(s, dim=1)
        merged_value = torch.cat([self.value[rows], new_value], 1).gather(1, pick)
        merged_token = torch.cat([self.token[rows], new_token], 1).gather(1, pick)
        # window slots: kept entries keep theirs; new entries take the freed ones, in slot order
        kept = pick < s
        kept_slot = self.slot[rows].gather(1, pick.clamp(max=s - 1))
        used = torch.zeros(t, s + 1, dtype=torch.bool, device=score.device)
        used.scatter_(1, torch.where(kept, kept_slot, s), True)
        free = torch.argsort(used[:, :s].to(torch.uint8), dim=1, stable=True)  # unused slots first
        fresh_rank = ((~kept).long().cumsum(1) - 1).clamp_min(0)
        merged_slot = torch.where(kept, kept_slot, free.gather(1, fresh_rank))
        r, c = (~kept & (merged_token >= 0)).nonzero(as_tuple=True)
        if r.numel():
            self.window[rows[r], merged_slot[r, c]] = windows(rows[r], merged_token[r, c]).to(
                self.window.dtype
            )
        self.score[rows], self.value[rows], self.token[rows], self.slot[rows] = (
            best,
            merged_value,
            merged_token,
            merged_slot,
        )
        return rows

    def ranked_window(self) -> Tensor:
        """[n, size, width]: each entry's window, in the rows' rank order."""
        return self.window.gather(1, self.slot[..., None].expand_as(self.window))

    def nbytes(self) -> int:
        tensors = (self.score, self.value, self.token, self.slot, self.window)
        return sum(t.numel() * t.element_size() for t in tensors)


class CofiringTable:
    """Per latent, a Misra-Gries summary of its co-firing partners (see the module docstring).

    partner [n, size] int64 (-1 when empty), count [n, size] int64 (lower bounds), error [n] int64.
    """

    def __init__(self, n: int, size: int, device: torch.device):
        self.n, self.size = n, size
        self.partner = torch.full((n, size), -1, dtype=torch.long, device=device)
        self.count = torch.zeros(n, size, dtype=torch.long, device=device)
        self.error = torch.zeros(n, dtype=torch.long, device=device)

    def update(self, active: Tensor) -> None:
        """active [N, c] int64: each token's firing latents, -1 padded. Counts every ordered pair (i, j), i != j."""
        if self.size == 0 or active.shape[1] < 2:
            return
        c = active.shape[1]
        first, second = (~torch.eye(c, dtype=torch.bool, device=active.device)).nonzero(as_tuple=True)
        a, b = active[:, first], active[:, second]  # [N, c * (c - 1)]: every ordered pair of slots
        valid = (a >= 0) & (b >= 0)
        pair_keys = a[valid] * self.n + b[valid]
        if pair_keys.numel() == 0:
            return
        touched = torch.zeros(self.n, dtype=torch.bool, device=pair_keys.device)
        touched[pair_keys // self.n] = True
        rows = touched.nonzero().flatten()
        held = self.partner[rows] >= 0
        old_keys = (rows[:, None] * self.n + self.partner[rows])[held]
        keys, inverse = torch.unique(torch.cat([pair_keys, old_keys]), return_inverse=True)
        total = torch.zeros(keys.numel(), dtype=torch.long, device=keys.device)
        total.index_add_(0, inverse, torch.cat([torch.ones_like(pair_keys), self.count[rows][held]]))
        latent = keys // self.n
        order, rank = best_per_group(latent, total, self.size + 1)
        latent, partner, total = latent[order], keys[order] % self.n, total[order]
        slot = torch.searchsorted(rows, latent)
        cut = torch.zeros(rows.numel(), dtype=torch.long, device=keys.device)
        spill = rank == self.size
        cut[slot[spill]] = total[spill]  # the (size+1)-th largest count, 0 when there are fewer
        total = total - cut[slot]
        keep = (rank < self.size) & (total > 0)
        new_partner = torch.full((rows.numel(), self.size), -1, dtype=torch.long, device=keys.device)
        new_count = torch.zeros(rows.numel(), self.size, dtype=torch.long, device=keys.device)
        new_partner[slot[keep], rank[keep]] = partner[keep]
        new_count[slot[keep], rank[keep]] = total[keep]
        self.partner[rows], self.count[rows] = new_partner, new_count
        self.error[rows] += cut

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.partner, self.count, self.error))

"""Bounded per-latent streaming summaries, updated from a batch of firing events with batched tensor ops.

An event is one (latent, token row) pair where the latent's code is nonzero. Every table has a fixed size per
latent, so its memory does not grow with the number of tokens read:

- `TopTable`: the `size` events with the largest score per row (score = activation for the top examples;
  a uniform random key for a reservoir sample). Each batch's candidates are ranked within their row by a
  sort, and the best `size` of them are merged with the kept ones by `torch.topk` over the concatenation.
- `BandTable`: per latent, a uniform sample of `size` firings in each of `n_bands` equal-width activation
  intervals [b S / B, (b + 1) S / B), S the smallest power of two above every activation seen so far. When
  S doubles, interval b becomes interval b // 2 of the new S exactly (the union of two old ones), so the
  `size` largest random keys of the merged pair are the `size` largest of the union: every interval stays an
  exact uniform sample of its firings, and its firing count stays exact.
- `RandomWindows`: a uniform sample of token positions (any token, firing or not), each with the set of
  latents that fire anywhere in its window: the non-activating examples explanations are scored against.
- `CofiringTable`: per latent, a Misra-Gries summary of the latents firing on the same token. Each batch's
  exact pair counts are merged as in mergeable summaries (Agarwal et al. 2012): add, subtract the
  (size+1)-th largest count, drop the non-positive. Every partner that co-fired more than `error[latent]`
  times is listed (the candidates); `CofiringSpill` then counts the listed pairs exactly.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator

import numpy as np
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


#: windows(event indices [M]) -> [M, width]: the activation windows of the events kept.
WindowsOf = Callable[[Tensor], Tensor]


class TopTable:
    """Per row, the `size` events with the largest score.

    score, value [rows, size] float32 (-inf / 0 when empty), token [rows, size] int64 (global token index, -1
    when empty): rows sorted by score, descending. Each entry's activation window (float16, NaN outside the
    context) is stored once at `window[row, slot[row, rank]]` and never moved: a merge writes only the
    windows of new entries, into the slots that evicted entries free. `ranked_window()` gives them in rank order.
    """

    def __init__(self, rows: int, size: int, width: int, device: torch.device):
        self.size = size
        self.score = torch.full((rows, size), -torch.inf, device=device)
        self.value = torch.zeros(rows, size, device=device)
        self.token = torch.full((rows, size), -1, dtype=torch.long, device=device)
        self.slot = torch.arange(size, device=device).repeat(rows, 1)
        self.window = torch.full((rows, size, width), torch.nan, dtype=torch.float16, device=device)

    def update(self, row: Tensor, score: Tensor, value: Tensor, token: Tensor, windows: WindowsOf) -> Tensor:
        """Merge events (row, score, value, token: [E]); returns the rows that changed.

        windows(event indices [M]) -> [M, width]: activation windows, computed only for the events kept.
        """
        if self.size == 0 or row.numel() == 0:
            return row[:0]
        index = (score > self.score[row, -1]).nonzero().flatten()
        order, rank = best_per_group(row[index], score[index], self.size)
        index = index[order]
        row, score, value, token = row[index], score[index], value[index], token[index]
        rows = torch.unique_consecutive(row)
        at = torch.searchsorted(rows, row)
        t, s = rows.numel(), self.size
        new_score = torch.full((t, s), -torch.inf, device=score.device)
        new_value = torch.zeros(t, s, device=score.device)
        new_token = torch.full((t, s), -1, dtype=torch.long, device=score.device)
        new_event = torch.full((t, s), -1, dtype=torch.long, device=score.device)
        new_score[at, rank], new_value[at, rank], new_token[at, rank], new_event[at, rank] = (
            score,
            value,
            token,
            index,
        )
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
            event = new_event.gather(1, (pick - s).clamp_min(0))[r, c]
            self.window[rows[r], merged_slot[r, c]] = windows(event).to(self.window.dtype)
        self.score[rows], self.value[rows], self.token[rows], self.slot[rows] = (
            best,
            merged_value,
            merged_token,
            merged_slot,
        )
        return rows

    def take(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Remove every entry of `rows` [R] (distinct); returns them as events (row, score, value, token [M],
        window [M, width])."""
        held = self.token[rows] >= 0
        r, c = held.nonzero(as_tuple=True)
        out = (
            rows[r],
            self.score[rows][r, c],
            self.value[rows][r, c],
            self.token[rows][r, c],
            self.window[rows[r], self.slot[rows][r, c]],
        )
        self.score[rows], self.value[rows], self.token[rows] = -torch.inf, 0.0, -1
        return out

    def ranked_window(self) -> Tensor:
        """[rows, size, width]: each entry's window, in the rows' rank order."""
        return self.window.gather(1, self.slot[..., None].expand_as(self.window))

    def nbytes(self) -> int:
        tensors = (self.score, self.value, self.token, self.slot, self.window)
        return sum(t.numel() * t.element_size() for t in tensors)


def power_of_two_above(x: Tensor) -> Tensor:
    """x [n] > 0 -> the smallest power of two strictly above each value (exact: from the float exponent)."""
    _, exponent = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), exponent)


class BandTable:
    """Per latent, uniform samples of its firings within equal-width activation intervals (module docstring).

    scale [n] float32: S, 0 before the first firing (interval b holds values in [b S / B, (b + 1) S / B)).
    count [n, B] int64: firings per interval. `table`: a `TopTable` with row latent * B + b, scored by the
    events' random keys. Activations <= 0 fall in interval 0.
    """

    def __init__(self, n: int, n_bands: int, size: int, width: int, device: torch.device):
        self.n, self.bands = n, n_bands
        self.scale = torch.zeros(n, device=device)
        self.count = torch.zeros(n, n_bands, dtype=torch.long, device=device)
        self.table = TopTable(n * n_bands, size, width, device)

    def band_of(self, latent: Tensor, value: Tensor) -> Tensor:
        """The interval [E] of each event under the current scale."""
        ratio = value / self.scale[latent].clamp_min(torch.finfo(torch.float32).tiny)
        return (ratio * self.bands).floor().long().clamp(0, self.bands - 1)

    def update(self, latent: Tensor, key: Tensor, value: Tensor, token: Tensor, windows: WindowsOf) -> Tensor:
        """Merge events (latent, random key, value, token: [E]); returns the table rows that changed."""
        if latent.numel() == 0:
            return latent[:0]
        peak = torch.zeros_like(self.scale).scatter_reduce_(0, latent, value.float(), "amax")
        grow = (peak > 0) & (peak >= self.scale)
        if bool(grow.any()):
            grown = grow.nonzero().flatten()
            self._rescale(grown, power_of_two_above(peak[grown]))
        row = latent * self.bands + self.band_of(latent, value)
        self.count.view(-1).index_add_(0, row, torch.ones_like(row))
        if self.table.size == 0:
            return row[:0]
        return self.table.update(row, key, value, token, windows)

    def _rescale(self, latent: Tensor, scale: Tensor) -> None:
        """Raise the scale of `latent` [L] to `scale` [L]: interval b moves to b >> (doublings)."""
        old = self.scale[latent]
        doublings = torch.where(old > 0, torch.log2(scale / old.clamp_min(1e-38)).round(), 0).long()
        shift = doublings.clamp(0, 62)
        bands = torch.arange(self.bands, device=latent.device)
        moved = (bands[None, :] >> shift[:, None]).clamp_max(self.bands - 1)
        self.count[latent] = torch.zeros_like(self.count[latent]).scatter_add_(1, moved, self.count[latent])
        self.scale[latent] = scale
        if self.table.size == 0:
            return
        rows = (latent[:, None] * self.bands + bands).flatten()
        row, score, value, token, window = self.table.take(rows)
        if row.numel() == 0:
            return
        where = torch.searchsorted(latent, row // self.bands)  # latent is sorted (from nonzero)
        new_row = (row // self.bands) * self.bands + ((row % self.bands) >> shift[where])
        self.table.update(new_row, score, value, token, lambda event: window[event])

    def nbytes(self) -> int:
        return self.table.nbytes() + self.scale.numel() * 4 + self.count.numel() * 8


class RandomWindows:
    """A uniform sample of `size` token positions (the largest i.i.d. random keys), each with the latents
    that fire anywhere in its window. key, token [size] (token -1: empty); latents: one int64 tensor per slot.
    """

    def __init__(self, size: int, device: torch.device):
        self.size = size
        self.key = torch.full((size,), -torch.inf, device=device)
        self.token = torch.full((size,), -1, dtype=torch.long, device=device)
        self.latents: list[Tensor] = [torch.zeros(0, dtype=torch.long)] * size

    def update(self, key: Tensor, token: Tensor, latents_of: Callable[[Tensor], list[Tensor]]) -> None:
        """Merge candidates (key, token [E]); latents_of(candidate indices [M]) -> their windows' latents."""
        if self.size == 0 or key.numel() == 0:
            return
        best, pick = torch.cat([self.key, key]).topk(min(self.size, self.key.numel() + key.numel()))
        fresh = (pick >= self.size).nonzero().flatten()
        new_latents = latents_of(pick[fresh] - self.size) if fresh.numel() else []
        old = self.latents
        self.latents = [old[p] if p < self.size else None for p in pick.tolist()]  # type: ignore[misc]
        for j, lat in zip(fresh.tolist(), new_latents, strict=True):
            self.latents[j] = lat.cpu()
        self.key[: best.numel()] = best
        self.token[: best.numel()] = torch.cat([self.token, token])[pick]

    def nbytes(self) -> int:
        return 16 * self.size + sum(t.numel() * 8 for t in self.latents)


def cofiring_pairs(active: Tensor, unordered: bool = False) -> tuple[Tensor, Tensor]:
    """active [N, c] int64 (-1 padded) -> (first, second) [P]: every ordered pair of distinct slots of a row
    that both hold a latent (each unordered pair once when `unordered`)."""
    active = active[(active >= 0).sum(dim=1) >= 2]
    c = active.shape[1]
    pairs = torch.ones(c, c, dtype=torch.bool, device=active.device)
    pairs = pairs.triu(1) if unordered else pairs.fill_diagonal_(False)
    first, second = pairs.nonzero(as_tuple=True)
    a, b = active[:, first].reshape(-1), active[:, second].reshape(-1)  # [N * pairs per row]
    if bool((active < 0).any()):
        valid = (a >= 0) & (b >= 0)
        a, b = a[valid], b[valid]
    return a, b


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
        a, b = cofiring_pairs(active)
        pair_keys = a * self.n + b
        if pair_keys.numel() == 0:
            return
        touched = torch.zeros(self.n, dtype=torch.bool, device=pair_keys.device)
        touched[pair_keys // self.n] = True
        rows = touched.nonzero().flatten()
        held = self.partner[rows] >= 0
        old_keys = (rows[:, None] * self.n + self.partner[rows])[held]
        ordered, order = torch.cat([pair_keys, old_keys]).sort()
        keys, inverse = torch.unique_consecutive(ordered, return_inverse=True)
        weight = torch.cat([torch.ones_like(pair_keys), self.count[rows][held]])[order]
        total = torch.zeros(keys.numel(), dtype=torch.long, device=keys.device).index_add_(0, inverse, weight)
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


class CofiringSpill:
    """Each token's co-firing latents (`active` rows), appended to an anonymous temporary file (uint16 ids
    below 65535 latents, else int32), so that `exact_counts` can count the Misra-Gries candidates exactly
    afterwards without holding the tokens in memory. Disk: tokens * width * 2 (or 4) bytes."""

    def __init__(self, n: int, chunk_tokens: int = 1 << 16):
        self.n, self.chunk_tokens = n, chunk_tokens
        self.dtype = np.uint16 if n < 2**16 - 1 else np.int32
        self.pad = np.iinfo(self.dtype).max
        self.file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close(), or with the object)
        self.blocks: list[tuple[int, int]] = []  # (rows, width) of each appended block
        self.fire_count = torch.zeros(n, dtype=torch.long)

    def append(self, active: Tensor) -> None:
        """active [N, c] int64, -1 padded."""
        if active.shape[1] == 0:
            return
        ids = active.cpu()
        valid = ids >= 0
        self.fire_count.index_add_(0, ids[valid], torch.ones(int(valid.sum()), dtype=torch.long))
        block = torch.where(valid, ids, torch.full_like(ids, int(self.pad))).numpy().astype(self.dtype)
        self.file.write(block.tobytes())
        self.blocks.append(block.shape)

    def _active_chunks(self) -> Iterator[Tensor]:
        """The appended rows again, in chunks of about chunk_tokens rows: [N, c] int64, -1 padded."""
        self.file.seek(0)
        for rows, width in self.blocks:
            block = np.frombuffer(self.file.read(rows * width * np.dtype(self.dtype).itemsize), self.dtype)
            ids = torch.from_numpy(block.astype(np.int64)).reshape(rows, width)
            ids[ids == int(self.pad)] = -1
            for start in range(0, rows, self.chunk_tokens):
                yield ids[start : start + self.chunk_tokens]

    def exact_counts(self, partner: Tensor, device: torch.device | None = None) -> Tensor:
        """partner [n, m] int64 (-1: none) -> [n, m] exact number of tokens on which latent i and partner[i, j]
        both were among the token's co-firing latents, counted on `device` (default: the CPU). Counts are
        symmetric, so each token's unordered pairs are looked up once, keyed (smaller id, larger id)."""
        device = device or torch.device("cpu")
        partner = partner.to(device)
        held = partner >= 0
        i = torch.arange(self.n, device=device)[:, None].expand_as(partner)
        keys = torch.minimum(i, partner) * self.n + torch.maximum(i, partner)
        wanted = torch.unique(keys[held])
        counts = torch.zeros(wanted.numel(), dtype=torch.long, device=device)
        if wanted.numel():
            for active in self._active_chunks():
                a, b = cofiring_pairs(active.to(device), unordered=True)
                pair = torch.minimum(a, b) * self.n + torch.maximum(a, b)
                at = torch.searchsorted(wanted, pair).clamp_max(wanted.numel() - 1)
                hit = wanted[at] == pair
                counts += torch.bincount(at[hit], minlength=wanted.numel())
        out = torch.zeros_like(partner)
        out[held] = counts[torch.searchsorted(wanted, keys[held])]
        return out.cpu()

    def close(self) -> None:
        self.file.close()

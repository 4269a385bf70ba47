"""Mixing buffer: fill to N rows, shuffle, serve half, refill.

Activations of neighbouring tokens (same context, same model batch) are strongly correlated; training on
them in harvest order biases every step. The buffer holds N rows from many model batches, shuffles them
and serves about half in training batches; the other half stays and is reshuffled with the refill, so a
row may wait several cycles but is served exactly once. When the input ends, the rest is served too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor


def buffer_device(requested: str, train_device: torch.device, nbytes: int) -> torch.device:
    """ "auto": the training device, unless it is a GPU with less than 2 * nbytes free (then the CPU)."""
    if requested != "auto":
        return torch.device(requested)
    if train_device.type == "cuda" and nbytes > torch.cuda.mem_get_info(train_device)[0] // 2:
        return torch.device("cpu")
    return train_device


class MixingBuffer:
    """Shuffling buffer of `capacity` rows of width `d` on `device`.

    batches(chunks) takes activation chunks [n_i, d] (any n_i) and yields batches [batch_size, d]
    (a final smaller batch holds the remainder when the input ends).
    """

    def __init__(
        self,
        capacity: int,
        d: int,
        batch_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        if capacity < 2 * batch_size:
            raise ValueError(
                f"buffer capacity ({capacity} rows) must be at least 2 * batch_size ({2 * batch_size}); "
                "raise source.buffer_tokens."
            )
        self.capacity, self.d, self.batch_size = capacity, d, batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def batches(self, chunks: Iterable[Tensor]) -> Iterator[Tensor]:
        """Shuffled batches [batch_size, d] drawn from the buffer, refilled from `chunks` ([rows, d] each) as it
        empties; when the chunks run out the rows left are served too (the last batch may be smaller)."""
        storage = torch.empty(self.capacity, self.d, dtype=self.dtype, device=self.device)
        filled = 0  # rows storage[:filled] hold unserved activations
        pending: Tensor | None = None  # part of a chunk that did not fit yet
        source = iter(chunks)
        exhausted = False
        while True:
            while filled < self.capacity and not exhausted:
                if pending is None:
                    try:
                        pending = next(source).to(self.device, self.dtype, non_blocking=True)
                    except StopIteration:
                        exhausted = True
                        break
                take = min(self.capacity - filled, pending.shape[0])
                storage[filled : filled + take] = pending[:take]
                filled += take
                pending = pending[take:] if take < pending.shape[0] else None
            if filled == 0:
                return
            perm = torch.randperm(filled, generator=self.generator, device=self.device)
            storage[:filled] = storage[:filled][perm]
            keep = 0 if exhausted else self.capacity // 2
            while filled - self.batch_size >= keep:
                yield storage[filled - self.batch_size : filled].clone()
                filled -= self.batch_size
            if exhausted and filled:
                yield storage[:filled].clone()
                return

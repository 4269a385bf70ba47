"""Statistics of the global batch for losses and selections that depend on the whole batch.

In data-parallel training (saelab.parallel.distributed) each of W ranks holds B / W rows of every global batch
[B, d] and DistributedDataParallel averages the ranks' gradients. A loss of the form

    sum over rows of e(row; parameters) / D,   D a batch statistic that carries no gradient

(FVU: D = sum ||x - mean x||^2; AuxK: the same for the detached residual) is reproduced exactly when every rank
uses W * (sum of e over its own rows) / D_global: the mean over ranks of these losses, and of their gradients,
is the global batch's loss and gradient. A selection over the whole batch (BatchTopK's top B * k) uses the
cutoff of the global batch.

The functions read the global batch only inside `sharded()`, which the data-parallel wrapper enters around
each training forward. Everywhere else (a single process, the data-dependent init on the whole first batch,
evaluation on rank 0 alone) they see the local batch and communicate nothing. Collectives are enqueued on
the device like any kernel: no host sync.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.distributed as dist
from torch import Tensor

#: W, the number of ranks whose rows form the batch; 1 outside `sharded`.
_RANKS: ContextVar[int] = ContextVar("saelab_global_batch_ranks", default=1)


@contextmanager
def sharded() -> Iterator[None]:
    """Within this block, batch statistics are those of the global batch spread over the default process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("global_batch.sharded() needs an initialised torch.distributed process group.")
    token = _RANKS.set(dist.get_world_size())
    try:
        yield
    finally:
        _RANKS.reset(token)


def ranks() -> int:
    """W: how many ranks' rows make up the batch (1 outside `sharded`)."""
    return _RANKS.get()


def gather(t: Tensor) -> Tensor:
    """Every rank's t (the same shape on every rank), stacked: [W, *t.shape] ([1, *t.shape] outside `sharded`)."""
    if ranks() == 1:
        return t[None]
    out = t.new_empty(ranks() * t.numel())
    dist.all_gather_into_tensor(out, t.detach().contiguous().reshape(-1))
    return out.view(ranks(), *t.shape)


def minimum(t: Tensor) -> Tensor:
    """Elementwise minimum of t over ranks (t itself outside `sharded`)."""
    if ranks() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out


def mean(t: Tensor) -> Tensor:
    """The mean of t over ranks (t itself outside `sharded`): a per-row mean of equal-sized shards becomes the
    global batch's."""
    if ranks() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)  # SUM (gloo has no AVG)
    return out / ranks()


def centred_sumsq(v: Tensor) -> Tensor:
    """sum over the batch's rows of ||row - mean row||^2, from this rank's rows v [b, d]; scalar in v's dtype
    promoted to at least float32 (a float16 sum of squares overflows at 65504).

    Outside `sharded`: (v - v.mean(0)).pow(2).sum() of v itself, in that dtype. Inside: of the global batch,
    which must not depend on the parameters (data, or detached values). Each rank's row count n_r, row mean m_r (float64) and
    sum of squares about it q_r are gathered (one collective of W * (d + 2) float64 values) and combined as
    sum_r q_r + sum_r n_r ||m_r - m||^2, m the global mean: no cancellation when the mean is large.
    """
    dtype = torch.promote_types(v.dtype, torch.float32)
    if ranks() == 1:
        v = v.to(dtype)
        return (v - v.mean(dim=0)).pow(2).sum()
    if v.requires_grad:
        raise ValueError(
            "a batch-normalised loss's denominator must not carry gradient in data-parallel training "
            "(pass data or detached values)."
        )
    mean = v.mean(dim=0, dtype=torch.float64)
    within = (v - mean.to(v.dtype)).pow(2).sum(dtype=torch.float64)
    rows = torch.full((1,), v.shape[0], dtype=torch.float64, device=v.device)
    parts = gather(torch.cat([rows, within.reshape(1), mean]))  # [W, d + 2]
    counts, sums, means = parts[:, 0], parts[:, 1], parts[:, 2:]
    overall = (counts[:, None] * means).sum(dim=0) / counts.sum()
    between = (counts * (means - overall).pow(2).sum(dim=1)).sum()
    return (sums.sum() + between).to(dtype)

"""Data-parallel training with torch.distributed: one process per device, launched by `torchrun` (or a SLURM job
with several tasks through Hydra's submitit launcher).

What a run of W processes computes, step by step (see `Trainer.fit` / `Trainer.train_step`):

- `trainer.batch_size` and `trainer.total_tokens` stay global. Every rank reads the same global batch [B, d_in]
  from the source (an iterator given to `fit` must yield the same batches on every rank) and trains on its
  contiguous slice of B / W rows (`shard`), so the ranks' rows together are exactly the single-process batch.
  The first global batch is used whole on every rank for the input scale and the data-dependent init, then
  rank 0's parameters, buffers and scale are broadcast (`broadcast_start`).
- Gradients are averaged by DistributedDataParallel during the backward, before the SAE's gradient projection,
  clipping and Adam, so the ranks' weights stay identical. Each training forward runs inside
  `saelab.parallel.global_batch.sharded()`, where whatever depends on the whole batch uses the global one: the
  denominators of batch-normalised losses (the FVU of TopK, BatchTopK, MP and GBA, AuxK and MP's revival term;
  each rank's loss is W * its rows' error / the global denominator) and BatchTopK's top B * k cutoff and
  threshold update. So for every declared variant a step is the single-process step on the global batch.
- The latents that fired on any slice are OR-reduced every step (`any_fired`: an asynchronous all-reduce of
  d_sae bytes that overlaps the backward), so the dead-latent tracker counts global batches as one process does.
- Logged metrics are averaged over ranks at log steps (`mean_over_ranks`), which turns the W-scaled
  batch-normalised ones (loss, FVU, AuxK) into the global batch's. Rank 0 alone logs, evaluates the held-out
  batches, and writes checkpoints, the final SAE and the summary.
- State outside the gradients is reduced by the variant's own `sync_state`, called after the optimizer step and
  before the SAE's `after_optimizer_step` (GBA sums and max-reduces its window statistics before each bias update;
  BatchTopK's threshold already follows the global batch in its forward). A variant that does not declare
  `data_parallel = True` is refused.
"""

from __future__ import annotations

import atexit
import gc
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from saelab.parallel import global_batch

#: A training forward: (x [b, d_in], the trainer's context) -> the SAE's TrainOutput.
TrainingForward = Callable[[Tensor, Any], Any]


def env_world_size() -> int:
    """Number of processes torchrun started (WORLD_SIZE), 1 outside it (inside a SLURM job with several tasks the
    app layer exports torchrun's variables first: `saelab.app.slurm_jobs.export_torchrun_environment`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """End a successful run: wait until every rank got here (so none closes its connections while rank 0
    still writes), then destroy the process group. Without a process group, nothing."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # free the run's DDP wrapper (and its reducer's hooks) while the process group still exists
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank got here (nothing without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def setup(device: torch.device) -> Distributed:
    """This process's place in the run. Under torchrun the default process group is created on first call
    (gloo for CPU tensors, NCCL for CUDA ones) and destroyed at exit; without it, a single-process run."""
    if not dist.is_available():
        return Distributed()
    if not dist.is_initialized():
        if env_world_size() <= 1:
            return Distributed()
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
        atexit.register(_shutdown)
    return Distributed(dist.get_rank(), dist.get_world_size())


#: DDP must not copy rank 0's buffers over the others' before each forward (GBA's window statistics are per rank
#: until reduced); the keyword for that changed in torch 2.13.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


class _TrainingForward(nn.Module):
    """Routes DistributedDataParallel's forward to the SAE's `training_forward` (DDP hooks `forward`), with batch
    statistics taken over the global batch."""

    def __init__(self, sae: nn.Module, forward: TrainingForward):
        super().__init__()
        self.sae = sae
        self.run = forward

    def forward(self, x: Tensor, ctx: Any) -> Any:
        with global_batch.sharded():
            return self.run(x, ctx)


class _Pending:
    """A [n] flag vector, possibly under an asynchronous all-reduce; `result()` waits and returns it as bool."""

    def __init__(self, flags: Tensor, work: Any = None):
        self.flags, self.work = flags, work

    def result(self) -> Tensor:
        if self.work is not None:
            self.work.wait()
        return self.flags.bool()


@dataclass(frozen=True)
class Distributed:
    """rank / world_size of this process; every method is the identity (no communication) when world_size is 1."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ setup
    def check(self, sae: nn.Module, batch_size: int) -> None:
        """Refuse settings data-parallel training cannot honour, naming the field to change."""
        if not self.enabled:
            return
        if batch_size % self.world_size:
            raise ValueError(
                f"trainer.batch_size={batch_size} must be divisible by the number of processes "
                f"({self.world_size}): each rank trains on batch_size / world_size rows of every global batch."
            )
        if not getattr(sae, "data_parallel", False):
            architecture = getattr(type(sae), "architecture", type(sae).__name__)
            raise ValueError(
                f"sae.architecture={architecture!r} does not support data-parallel training: its class does not "
                "declare `data_parallel = True` (that a DDP step equals the one-process step, with any state "
                "outside the gradients reduced in its `sync_state`). Train it in a single process."
            )

    def wrap(self, sae: nn.Module, forward: TrainingForward) -> TrainingForward:
        """`forward` itself, or a DistributedDataParallel module around it that averages gradients in backward."""
        if not self.enabled:
            return forward
        return nn.parallel.DistributedDataParallel(
            _TrainingForward(sae, forward),
            find_unused_parameters=bool(getattr(sae, "ddp_find_unused_parameters", False)),
            **_NO_BUFFER_SYNC,
        )

    def broadcast_start(self, sae: nn.Module, input_scale: float) -> float:
        """Give every rank rank 0's parameters, buffers and input scale; returns the scale."""
        if not self.enabled:
            return input_scale
        with torch.no_grad():
            for tensor in [*sae.parameters(), *sae.buffers()]:
                dist.broadcast(tensor.data, src=0)
        scale = torch.tensor([input_scale], dtype=torch.float64, device=sae.b_dec.device)
        dist.broadcast(scale, src=0)
        return float(scale.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (picklable) on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------- data
    def shard(self, x: Tensor) -> Tensor:
        """This rank's contiguous slice [B / world_size, d_in] of a global batch x [B, d_in]."""
        if not self.enabled:
            return x
        if x.shape[0] % self.world_size:
            raise ValueError(
                f"a batch of {x.shape[0]} rows cannot be split evenly over {self.world_size} processes; "
                "make trainer.batch_size divisible by the number of processes."
            )
        rows = x.shape[0] // self.world_size
        return x[self.rank * rows : (self.rank + 1) * rows]

    # ------------------------------------------------------------- reductions
    def any_fired(self, fired: Tensor) -> _Pending:
        """Start OR-reducing the [n] bool `fired` over ranks; `.result()` gives the global [n] bool."""
        if not self.enabled:
            return _Pending(fired)
        flags = fired.to(torch.uint8)
        return _Pending(flags, dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True))

    def all_true(self, flag: Tensor) -> bool:
        """Host bool: the scalar bool `flag` holds on every rank (one sync)."""
        value = flag.to(torch.uint8).reshape(1)
        if self.enabled:
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def any_true(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Each host flag OR-ed over ranks (one small all-reduce, one sync; the flags as given in one process)."""
        if not self.enabled:
            return flags
        value = torch.tensor(flags, dtype=torch.uint8, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return [bool(v) for v in value.tolist()]

    def mean_over_ranks(self, values: dict[str, Tensor]) -> dict[str, float]:
        """Scalar tensors -> their means over ranks as floats, with one host sync."""
        if not values:
            return {}
        stacked = torch.stack([v.detach().to(torch.float64).reshape(()) for v in values.values()])
        if self.enabled:
            dist.all_reduce(stacked)
            stacked /= self.world_size
        return dict(zip(values, stacked.tolist(), strict=True))

    def sync_state(self, sae: nn.Module) -> None:
        """Reduce the SAE's state outside the gradients over ranks (its own `sync_state`)."""
        if self.enabled:
            sae.sync_state()

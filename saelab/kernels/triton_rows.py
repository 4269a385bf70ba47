"""Triton kernels for the sparse row primitives, balanced whatever the hit pattern of the latents.

A slot is one (b, j) entry of codes values [B, K], indices [B, K] into a table [n, d]. PyTorch's embedding bag
gives each bag (a row of the codes, or a latent's slots in a scatter) to one block, so a latent hit by every
row (AuxK early in a run, a dense latent) makes one bag of B entries that serialises the kernel. Here:

- `decode_rows`: out[b, g] = sum over row b's columns of group g of values * table[indices]; one program per
  (row, group, block of d). Every row has exactly K slots, so rows are balanced by construction.
- `gather_dot`: out[b, j] = <table[indices[b, j]], rows[bag of (b, j)]>; one program per (row, block of K).
- `segment_accumulate`: out[key[s]] += weight[s] * rows[src[s]] over slots sorted by key (the scatter of the
  decoder-row and encoder-column gradients). The sorted slots are cut into fixed chunks of CHUNK slots, so a
  latent hit by every row spreads over B * K / CHUNK programs; each program sums its chunk's segments with a
  segmented scan and adds each segment to `out` with one atomic add per element.

All accumulate in float32 and return float32. On a GPU each kernel's block sizes and warp count are chosen by
measurement (`triton.autotune`, once per feature width D and dtypes, at the first call); on CPU they run under
Triton's interpreter (TRITON_INTERPRET=1) with the module's default blocks, which tests use at tiny shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from saelab.kernels.backend import triton_interpreted

#: Sorted slots per `segment_accumulate` program, and the d-block of every kernel, under the interpreter (and the
#: first of the measured configurations on a GPU); BLOCK_K bounds the slots a program reads at once.
CHUNK = 64
BLOCK_D = 128
BLOCK_K = 32
#: Configurations measured on the GPU. Segment tiles stay at most 16k elements (the scan keeps them in registers).
ROW_CONFIGS = [triton.Config({"BLOCK_D": bd}, num_warps=w) for bd in (BLOCK_D, 64, 256) for w in (4, 8, 2)]
SEGMENT_CONFIGS = [
    triton.Config({"CHUNK": c, "BLOCK_D": bd}, num_warps=w)
    for c in (CHUNK, 32, 128)
    for bd in (BLOCK_D, 64, 256)
    for w in (4, 8)
    if c * bd <= 16384
]


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(size)))


@triton.jit
def _decode_kernel(values, indices, table, out, K, D, split, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # Group 0 holds columns [0, split), group 1 (present when split < K) columns [split, K).
    row, group, d_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G = tl.num_programs(1)
    start, stop = group * split, split + group * (K - split)
    d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        j_ok = j < stop
        slot = row.to(tl.int64) * K + j
        latent = tl.load(indices + slot, mask=j_ok, other=0).to(tl.int64)
        value = tl.load(values + slot, mask=j_ok, other=0.0).to(tl.float32)
        tile = tl.load(
            table + latent[:, None] * D + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc += tl.sum(value[:, None] * tile.to(tl.float32), axis=0)
    tl.store(out + (row.to(tl.int64) * G + group) * D + d, acc, mask=d_ok)


_decode_tuned = triton.autotune(ROW_CONFIGS, key=["D"])(_decode_kernel)


@triton.jit
def _gather_dot_kernel(
    indices, table, rows, out, K, D, split, G, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
):
    # Row b's columns [0, split) use rows[b * G], columns [split, K) rows[b * G + 1] (G = 2).
    row, k_block = tl.program_id(0), tl.program_id(1)
    j = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = j < K
    slot = row.to(tl.int64) * K + j
    latent = tl.load(indices + slot, mask=j_ok, other=0).to(tl.int64)
    bag = row.to(tl.int64) * G + (j >= split).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = j_ok[:, None] & (d < D)[None, :]
        a = tl.load(table + latent[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        b = tl.load(rows + bag[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out + slot, acc, mask=j_ok)


_gather_dot_tuned = triton.autotune(ROW_CONFIGS, key=["D"])(_gather_dot_kernel)


@triton.jit
def _segment_sum(key_a, sum_a, key_b, sum_b):
    # Segmented inclusive scan over slots sorted by key: b's running sum absorbs a's when they share a key.
    return key_b, sum_b + tl.where(key_a == key_b, sum_a, 0.0)


@triton.jit
def _segment_kernel(keys, sources, weights, rows, out, S, D, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    chunk, d_block = tl.program_id(0), tl.program_id(1)
    s = chunk.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    s_ok = s < S
    key = tl.load(keys + s, mask=s_ok, other=-1)
    source = tl.load(sources + s, mask=s_ok, other=0).to(tl.int64)
    weight = tl.load(weights + s, mask=s_ok, other=0.0).to(tl.float32)
    d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    tile = tl.load(rows + source[:, None] * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    terms = weight[:, None] * tile.to(tl.float32)
    _, sums = tl.associative_scan((tl.broadcast_to(key[:, None], (CHUNK, BLOCK_D)), terms), 0, _segment_sum)
    next_key = tl.load(keys + s + 1, mask=s + 1 < S, other=-1)
    segment_end = s_ok & ((key != next_key) | (tl.arange(0, CHUNK) == CHUNK - 1))
    target = out + key.to(tl.int64)[:, None] * D + d[None, :]
    tl.atomic_add(target, sums, mask=segment_end[:, None] & d_ok[None, :])


# The measurement runs the kernel repeatedly, so `out` (accumulated into) is zeroed before each try and after.
_segment_tuned = triton.autotune(SEGMENT_CONFIGS, key=["D"], reset_to_zero=["out"])(_segment_kernel)


def _launch(
    kernel: triton.JITFunction,
    tuned: triton.runtime.Autotuner,
    grid: Callable[[dict], tuple[int, ...]],
    args: tuple,
    interpreted_blocks: dict[str, int],
    **fixed: int,
) -> None:
    """Run `tuned` (configurations measured on the device) or, under the interpreter, `kernel` with the fixed
    `interpreted_blocks`; grid(meta) gives the launch grid for a configuration's block sizes."""
    if triton_interpreted():
        kernel[grid(interpreted_blocks)](*args, **fixed, **interpreted_blocks)
    else:
        tuned[grid](*args, **fixed)


def _split(sizes: tuple[int, ...]) -> int:
    if len(sizes) > 2:
        raise ValueError(f"the Triton sparse kernels take one or two column groups, got sizes {sizes}.")
    return sizes[0]


def decode_rows(values: Tensor, indices: Tensor, table: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """values, indices [B, K] (columns in one or two consecutive groups of `sizes`), table [n, d]
    -> [B, G, d] float32, group g of row b decoded on its own."""
    values, indices, table = values.contiguous(), indices.contiguous(), table.contiguous()
    batch, width = values.shape
    d = table.shape[1]
    out = torch.empty(batch, len(sizes), d, dtype=torch.float32, device=table.device)
    _launch(
        _decode_kernel,
        _decode_tuned,
        lambda meta: (batch, len(sizes), triton.cdiv(d, meta["BLOCK_D"])),
        (values, indices, table, out, width, d, _split(sizes)),
        {"BLOCK_D": _block(d, BLOCK_D)},
        BLOCK_K=_block(max(sizes), BLOCK_K),
    )
    return out


def gather_dot(indices: Tensor, table: Tensor, rows: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """out[b, j] = <table[indices[b, j]], rows[b * G + group of column j]> -> [B, K] float32.

    indices [B, K] into table [n, d], columns in G = len(sizes) (one or two) consecutive groups; rows [B * G, d]."""
    indices, table, rows = indices.contiguous(), table.contiguous(), rows.contiguous()
    batch, width = indices.shape
    d = table.shape[1]
    out = torch.empty(batch, width, dtype=torch.float32, device=table.device)
    block_k = _block(width, BLOCK_K)
    _launch(
        _gather_dot_kernel,
        _gather_dot_tuned,
        lambda meta: (batch, triton.cdiv(width, block_k)),
        (indices, table, rows, out, width, d, _split(sizes), len(sizes)),
        {"BLOCK_D": _block(d, BLOCK_D)},
        BLOCK_K=block_k,
    )
    return out


def segment_accumulate(keys: Tensor, sources: Tensor, weights: Tensor, rows: Tensor, n: int) -> Tensor:
    """out[i] = sum over slots s with keys[s] == i of weights[s] * rows[sources[s]] -> [n, d] float32.

    keys [S] sorted ascending, in [0, n); sources [S] indices into rows [R, d]; weights [S]."""
    keys, sources, weights, rows = (
        keys.contiguous(),
        sources.contiguous(),
        weights.contiguous(),
        rows.contiguous(),
    )
    d = rows.shape[1]
    out = torch.zeros(n, d, dtype=torch.float32, device=rows.device)
    slots = keys.numel()
    if slots:
        _launch(
            _segment_kernel,
            _segment_tuned,
            lambda meta: (triton.cdiv(slots, meta["CHUNK"]), triton.cdiv(d, meta["BLOCK_D"])),
            (keys, sources, weights, rows, out, slots, d),
            {"CHUNK": CHUNK, "BLOCK_D": _block(d, BLOCK_D)},
        )
    return out

"""Activations of probe datasets at the SAE's hook, computed once per (model, hook, task) and cached on disk.

A probe dataset is a list of token sequences; the model runs up to the hook (the harvester stops there) on
right-padded batches (causal models: padding after a position never changes it), and the activations of
chosen positions are kept as rows [R, d] with offsets [N + 1] (sequence i owns rows offsets[i]:offsets[i+1]).

The cache folder is `<root>/<model key>/<hook>/<task>-<hash>/` (`data.safetensors` + `meta.json`), the hash
covering every setting that changes the data (`cache_key`); it is written atomically, so an interrupted run
leaves nothing half-written, and a second SAE of a sweep reads it instead of running the model.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.core.atomic import atomic_directory

DATA_FILE = "data.safetensors"
META_FILE = "meta.json"
#: Bumped when the stored layout or a dataset's construction changes, so old folders are not read.
CACHE_VERSION = 1


@dataclass
class ProbeModel:
    """What probe datasets need from a language model.

    key: the model's identity in cache paths (name and backend). activations: tokens [B, T] -> activations
    [B, T, d] at `hook_name`. bos_id: prepended to every sequence (None: nothing). special_token_ids: tokens
    whose positions are never pooled. batch_size: sequences per forward pass.
    """

    key: str
    hook_name: str
    tokenizer: Any
    activations: Callable[[Tensor], Tensor]
    bos_id: int | None
    special_token_ids: list[int]
    batch_size: int = 8


@dataclass
class TokenRows:
    """rows [R, d] float32 and offsets [N + 1] long: sequence i's kept positions are rows[offsets[i]:offsets[i+1]]."""

    rows: Tensor
    offsets: Tensor

    @property
    def n(self) -> int:
        return self.offsets.numel() - 1

    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def segment_ids(self) -> Tensor:
        """[R] long, the sequence of each row."""
        return torch.repeat_interleave(torch.arange(self.n), self.lengths())

    def select(self, index: Tensor) -> TokenRows:
        """The sequences `index` [M] (in that order) as TokenRows."""
        lengths = self.lengths()[index]
        rows = [self.rows[self.offsets[i] : self.offsets[i + 1]] for i in index.tolist()]
        offsets = torch.zeros(index.numel() + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        return TokenRows(torch.cat(rows) if rows else self.rows[:0], offsets)


def segment_mean(values: Tensor, offsets: Tensor) -> Tensor:
    """Mean of values [R, F] over each segment of offsets [N + 1] -> [N, F] (float32; empty segments are 0)."""
    n = offsets.numel() - 1
    lengths = (offsets[1:] - offsets[:-1]).to(values.device)
    ids = torch.repeat_interleave(torch.arange(n, device=values.device), lengths)
    sums = torch.zeros(n, values.shape[1], dtype=torch.float32, device=values.device)
    sums.index_add_(0, ids, values.float())
    return sums / lengths.clamp_min(1)[:, None].float()


def cache_key(settings: dict[str, Any]) -> str:
    """12 hex digits of a hash of the settings (JSON with sorted keys) and CACHE_VERSION."""
    text = json.dumps({"version": CACHE_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^\w.+-]", "_", name)[:120] or "_"


def cache_folder(root: str | Path, model: ProbeModel, task: str, settings: dict[str, Any]) -> Path:
    key = cache_key({"model": model.key, "hook": model.hook_name, "task": task, **settings})
    return Path(root).expanduser() / _safe(model.key) / _safe(model.hook_name) / f"{_safe(task)}-{key}"


def load_cached(folder: Path | None) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """(tensors, meta) of a complete cache folder, or None when there is none."""
    if folder is None or not (folder / META_FILE).is_file() or not (folder / DATA_FILE).is_file():
        return None
    return load_file(str(folder / DATA_FILE)), json.loads((folder / META_FILE).read_text())


def store(folder: Path | None, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write a cache folder atomically (nothing when folder is None: caching disabled)."""
    if folder is None:
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(folder, owned=[DATA_FILE, META_FILE]) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / DATA_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))


@torch.no_grad()
def run_sequences(
    model: ProbeModel, sequences: Sequence[Sequence[int]], keep: Callable[[int, list[int]], list[int]]
) -> TokenRows:
    """Run the model on token sequences (right-padded into batches) and keep, for sequence i, the positions
    keep(i, tokens) (in order). Returns their activations as float32 rows on the CPU."""
    rows: list[Tensor] = []
    counts: list[int] = []
    pad = model.bos_id if model.bos_id is not None else 0
    for start in range(0, len(sequences), model.batch_size):
        batch = [list(s) for s in sequences[start : start + model.batch_size]]
        width = max(len(s) for s in batch)
        tokens = torch.tensor([s + [pad] * (width - len(s)) for s in batch], dtype=torch.long)
        acts = model.activations(tokens).float().cpu()
        for j, seq in enumerate(batch):
            positions = keep(start + j, seq)
            rows.append(acts[j, positions])
            counts.append(len(positions))
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    d = rows[0].shape[-1] if rows else 0
    return TokenRows(torch.cat(rows) if rows else torch.zeros(0, d), offsets)

"""On-disk activation cache: harvest once, train many SAEs.

Layout of a cache folder:
    <root>/<hook_name>/shard_00000.npy   activations [rows, d] (float32, float16, or bfloat16 stored as uint16)
    <root>/tokens/shard_00000.npy        token ids [rows] int32 of the same rows
    <root>/progress.json                 only while harvesting: shards done, contexts consumed, config
    <root>/manifest.json                 written last and atomically: the cache is complete iff it exists

Every shard file is written atomically, then progress.json; an interrupted harvest resumes from the last
recorded shard (stray later files are deleted) or, with a different config, fails naming what changed.
The reader memory-maps shards and serves rows in a shuffled shard order (see `ActivationCache.batches`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.atomic import atomic_file
from saelab.seeds import derive_seed

FORMAT = "saelab-activation-cache"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
TOKENS = "tokens"
#: storage dtype name -> (numpy dtype on disk, torch dtype in memory)
STORAGE = {
    "float32": (np.float32, torch.float32),
    "float16": (np.float16, torch.float16),
    "bfloat16": (np.uint16, torch.bfloat16),
}


def check_storage_dtype(dtype: str) -> None:
    if dtype not in STORAGE:
        raise ValueError(f"cache dtype={dtype!r} must be one of {sorted(STORAGE)}.")


def to_numpy(x: Tensor, dtype: str) -> np.ndarray:
    """Tensor -> numpy array in the storage dtype (bfloat16 reinterpreted as uint16)."""
    x = x.detach().to("cpu", STORAGE[dtype][1]).contiguous()
    return x.view(torch.uint16).numpy() if dtype == "bfloat16" else x.numpy()


def to_torch(a: np.ndarray, dtype: str) -> Tensor:
    """Storage array -> tensor (copies out of a memory map)."""
    x = torch.from_numpy(np.array(a))
    return x.view(torch.bfloat16) if dtype == "bfloat16" else x


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(
            f"cannot read {path}: {err}; the cache folder is damaged, harvest it again."
        ) from err


class CacheWriter:
    """Append harvested rows; a shard is written whenever `shard_tokens` rows have accumulated.

    widths: hook name -> activation width d. fingerprint: the settings that determine the cache's content;
    resuming requires the same fingerprint (shard_tokens may change: it only moves shard boundaries). Existing complete caches are replaced only with overwrite=True.
    """

    def __init__(
        self,
        root: str | Path,
        widths: dict[str, int],
        dtype: str,
        shard_tokens: int,
        fingerprint: dict[str, Any],
        overwrite: bool = False,
    ):
        check_storage_dtype(dtype)
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens={shard_tokens} must be > 0.")
        bad = [h for h in widths if "/" in h or h in (TOKENS, "") or h.startswith(".")]
        if bad:
            raise ValueError(f"hook names {bad} cannot be used as cache folder names.")
        self.root = Path(root)
        self.widths, self.dtype, self.shard_tokens = dict(widths), dtype, shard_tokens
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalise (tuples -> lists)
        self.shard_rows: list[int] = []
        self.contexts = 0
        self.norm_sums = {h: 0.0 for h in widths}
        self._pending: list[tuple[dict[str, Tensor], Tensor]] = []
        self._pending_rows = 0
        self._prepare_folder(overwrite)

    # ------------------------------------------------------------ state
    @property
    def rows(self) -> int:
        """Rows already written to shards."""
        return sum(self.shard_rows)

    def _prepare_folder(self, overwrite: bool) -> None:
        root = self.root
        is_cache = (root / MANIFEST).exists() or (root / PROGRESS).exists()
        if root.exists() and any(root.iterdir()) and not is_cache:
            raise FileExistsError(
                f"output_dir={root} exists and is not a saelab activation cache; choose another."
            )
        if (root / MANIFEST).exists() and not overwrite:
            raise FileExistsError(
                f"output_dir={root} already holds a complete activation cache; "
                "pass overwrite=true to replace it or choose another output_dir."
            )
        if overwrite and is_cache:
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        if (root / PROGRESS).exists():
            self._resume(_read_json(root / PROGRESS))
        else:
            self._write_progress()  # from now on the folder is recognisable as a (resumable) harvest
        self._remove_stray_files()

    def _resume(self, progress: dict[str, Any]) -> None:
        old = progress.get("config", {})
        changed = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {self.fingerprint.get(k)!r}" for k in changed)
            raise ValueError(
                f"output_dir={self.root} holds an interrupted harvest with different settings ({diffs}); "
                "rerun with the same settings to resume it, or pass overwrite=true to start over."
            )
        self.shard_rows = [int(r) for r in progress["shard_rows"]]
        self.contexts = int(progress["contexts"])
        self.norm_sums = {h: float(v) for h, v in progress["norm_sums"].items()}

    def _remove_stray_files(self) -> None:
        """Delete shard files past the last recorded shard (written just before an interruption)."""
        keep = {shard_name(i) for i in range(len(self.shard_rows))}
        for folder in [*self.widths, TOKENS]:
            path = self.root / folder
            path.mkdir(exist_ok=True)
            for file in path.iterdir():
                if file.name not in keep:
                    file.unlink()

    # ----------------------------------------------------------- writing
    def add(self, acts: dict[str, Tensor], tokens: Tensor, contexts: int) -> None:
        """Append rows: acts {hook: [N, d]}, tokens [N]; `contexts` = token contexts these rows came from."""
        n = tokens.shape[0]
        for hook, width in self.widths.items():
            if acts[hook].shape != (n, width):
                raise ValueError(
                    f"rows for {hook!r} have shape {tuple(acts[hook].shape)}, expected ({n}, {width})."
                )
            self.norm_sums[hook] += acts[hook].double().norm(dim=1).sum().item()
        self._pending.append(({h: acts[h].cpu() for h in self.widths}, tokens.cpu()))
        self._pending_rows += n
        self.contexts += contexts
        if self._pending_rows >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Write the accumulated rows as one shard (all files), then record it in progress.json."""
        if self._pending_rows == 0:
            return
        index = len(self.shard_rows)
        for hook in self.widths:
            rows = torch.cat([acts[hook] for acts, _ in self._pending])
            _save_npy(self.root / hook / shard_name(index), to_numpy(rows, self.dtype))
        tokens = torch.cat([tok for _, tok in self._pending]).to(torch.int32)
        _save_npy(self.root / TOKENS / shard_name(index), tokens.numpy())
        self.shard_rows.append(self._pending_rows)
        self._pending, self._pending_rows = [], 0
        self._write_progress()

    def _write_progress(self) -> None:
        progress = {
            "config": self.fingerprint,
            "shard_rows": self.shard_rows,
            "contexts": self.contexts,
            "norm_sums": self.norm_sums,
        }
        _write_json(self.root / PROGRESS, progress)

    def finish(self, metadata: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
        """Write the last shard and the manifest (last, atomically); returns the manifest."""
        self.flush()
        rows = max(self.rows, 1)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype,
            "hooks": {h: {"d_in": d, "mean_norm": self.norm_sums[h] / rows} for h, d in self.widths.items()},
            "shard_rows": self.shard_rows,
            "total_rows": self.rows,
            "contexts": self.contexts,
            "metadata": metadata,
            "config": self.fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "wall_seconds": wall_seconds,
        }
        _write_json(self.root / MANIFEST, manifest)
        (self.root / PROGRESS).unlink(missing_ok=True)
        return manifest


class ActivationCache:
    """A complete cache folder, read through memory maps."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / MANIFEST).exists():
            if (self.root / PROGRESS).exists():
                raise ValueError(
                    f"{self.root} holds an interrupted harvest (no manifest.json); rerun `saelab harvest` "
                    "with the same settings to finish it."
                )
            raise FileNotFoundError(
                f"{self.root} is not an activation cache (no {MANIFEST}); run `saelab harvest`."
            )
        self.manifest = _read_json(self.root / MANIFEST)
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{self.root / MANIFEST} is not a version-{VERSION} {FORMAT} manifest.")
        self.dtype: str = self.manifest["dtype"]
        self.shard_rows: list[int] = self.manifest["shard_rows"]
        self.total_rows: int = self.manifest["total_rows"]
        self.hook_names: list[str] = list(self.manifest["hooks"])
        for folder in [*self.hook_names, TOKENS]:
            for i, rows in enumerate(self.shard_rows):
                shape = self._map(folder, i).shape
                expected = (rows,) if folder == TOKENS else (rows, self.d_in(folder))
                if shape != expected:
                    raise ValueError(
                        f"{self.root / folder / shard_name(i)} has shape {shape}, expected {expected}."
                    )

    def d_in(self, hook: str) -> int:
        return int(self.manifest["hooks"][self.check_hook(hook)]["d_in"])

    def check_hook(self, hook: str | None) -> str:
        """The hook to read: `hook`, or the only one in the cache when None."""
        if hook is None or hook == "":
            if len(self.hook_names) != 1:
                raise ValueError(
                    f"the cache at {self.root} holds hooks {self.hook_names}; set source.hook_name."
                )
            return self.hook_names[0]
        if hook not in self.hook_names:
            raise ValueError(f"hook {hook!r} is not in the cache at {self.root}; it holds {self.hook_names}.")
        return hook

    def _map(self, folder: str, index: int) -> np.ndarray:
        """Memory map of one shard file (opened per read: thousands of shards would exhaust file handles)."""
        path = self.root / folder / shard_name(index)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; the cache is damaged, harvest it again.")
        return np.load(path, mmap_mode="r")

    def shard(self, hook: str, index: int) -> Tensor:
        """Activations of shard `index` [rows, d] (a copy in memory)."""
        return to_torch(self._map(self.check_hook(hook), index), self.dtype)

    def tokens(self, index: int) -> Tensor:
        """Token ids of shard `index` [rows] int32."""
        return torch.from_numpy(np.array(self._map(TOKENS, index)))

    def read_all(self, hook: str | None = None) -> Tensor:
        """Every row in harvest order [total_rows, d] (for small caches and checks)."""
        hook = self.check_hook(hook)
        return torch.cat([self.shard(hook, i) for i in range(len(self.shard_rows))])

    # ----------------------------------------------------------- reading
    def _groups(self, epoch: int, seed: int, group_rows: int) -> list[list[int]]:
        """Shards of one epoch in shuffled order, packed into groups of at least group_rows rows."""
        order = np.random.default_rng(derive_seed(seed, "cache.order", epoch)).permutation(
            len(self.shard_rows)
        )
        groups: list[list[int]] = [[]]
        size = 0
        for i in order.tolist():
            if size >= group_rows:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += self.shard_rows[i]
        return groups

    def _row_chunks(self, hook: str, start_row: int, seed: int, group_rows: int) -> Iterator[Tensor]:
        """Endless row stream from global row `start_row`: per epoch, groups of shuffled shards, rows
        shuffled within each group. A pure function of (seed, row index): resuming is exact and cheap."""
        epoch, skip = divmod(start_row, self.total_rows)
        while True:
            for g, group in enumerate(self._groups(epoch, seed, group_rows)):
                n = sum(self.shard_rows[i] for i in group)
                if skip >= n:
                    skip -= n
                    continue
                rows = torch.cat([self.shard(hook, i) for i in group])
                perm = np.random.default_rng(derive_seed(seed, "cache.rows", epoch, g)).permutation(n)
                yield rows[torch.from_numpy(perm[skip:])]
                skip = 0
            epoch += 1

    def batches(
        self,
        hook: str | None,
        batch_size: int,
        start_batch: int = 0,
        seed: int = 0,
        group_rows: int = 131072,
    ) -> Iterator[Tensor]:
        """Endless batches [batch_size, d] (storage dtype, CPU), batch b being a pure function of (seed, b)."""
        hook = self.check_hook(hook)
        if self.total_rows == 0:
            raise ValueError(f"the cache at {self.root} holds no rows.")
        carry: list[Tensor] = []
        have = 0
        for chunk in self._row_chunks(hook, start_batch * batch_size, seed, group_rows):
            carry.append(chunk)
            have += chunk.shape[0]
            if have < batch_size:
                continue
            rows = torch.cat(carry)
            full = (have // batch_size) * batch_size
            yield from rows[:full].split(batch_size)
            carry, have = [rows[full:]], have - full

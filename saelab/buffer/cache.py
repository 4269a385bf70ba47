"""On-disk activation cache: harvest once, train many SAEs.

Layout of a cache folder:
    <root>/<hook_name>/shard_00000.npy   activations [rows, d] (float32, float16, or bfloat16 stored as uint16)
    <root>/tokens/shard_00000.npy        token ids [rows] int32 of the same rows
    <root>/progress.json                 only while harvesting: shards done, contexts consumed, config
    <root>/manifest.json                 written last and atomically: the cache is complete iff it exists

Every shard file is written atomically, then progress.json; an interrupted harvest resumes from the last
recorded shard (stray later files are deleted) or, with a different config, fails naming what changed.
`overwrite=True` builds the new cache in a temporary sibling folder and swaps it in only when complete, so
the old cache stays intact if the harvest fails. The manifest records every shard file by folder (the hook),
with its shape, numpy dtype and CRC-32: the reader checks shapes and dtypes on opening the cache and each
file's checksum the first time it reads it (`ActivationCache.verify` checks them all), so a file of another
hook, another harvest or a damaged disk is refused instead of trained on. Version-1 caches (no checksums)
are still read, with shape and dtype checks only.
The reader memory-maps shards and serves rows in a shuffled shard order (see `ActivationCache.batches`).

Concurrent use (`saelab.core.lock`, lock file `.<name>.lock` beside the cache folder): a harvest holds it
exclusively from start to end, so a second harvest into the same folder is refused naming the first; each
reader holds it shared while open, so `overwrite=True` is refused while a reader lives (naming it) and a
reader is refused while a harvest writes. Where locks do not reach (a file system without them, a writer that
ignores them) a reader still notices a replaced shard file: it records each file's identity (device, inode,
size, modification time) when it opens the cache and stops, naming the file, instead of reading other data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import weakref
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.core import lock as file_lock
from saelab.core.atomic import (
    atomic_file,
    make_temporary_directory,
    remove_stale_temporaries,
    replace_directory,
)
from saelab.core.config_diff import changed_settings
from saelab.core.seeds import derive_seed

FORMAT = "saelab-activation-cache"
VERSION = 2
#: Versions the reader accepts (1: no per-file records).
READABLE_VERSIONS = (1, 2)
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


def check_storable(x: Tensor, dtype: str, hook: str) -> None:
    """Refuse rows of `hook` whose values overflow the storage dtype (float16 tops out at 65504), which would be
    stored as inf and only found at training time."""
    if dtype != "float16":
        return
    top = float(x.detach().abs().max()) if x.numel() else 0.0
    if top > torch.finfo(torch.float16).max:
        raise ValueError(
            f"activations at {hook!r} reach |x| = {top:.4g}, beyond float16's largest value (65504): they would be "
            "stored as inf. Harvest with dtype=bfloat16 (float32's range) or dtype=float32."
        )


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npy"


def check_hook_folders(hooks: list[str], where: str) -> None:
    """Refuse hook names that cannot be cache folder names: empty, "tokens", hidden, or holding a path
    separator ("../x" would reach outside the cache folder). `where` says whose names they are."""
    bad = [h for h in hooks if not isinstance(h, str) or "/" in h or h in (TOKENS, "") or h.startswith(".")]
    if bad:
        raise ValueError(
            f"{where}: hook names {bad} cannot be cache folder names (a hook's shards live in <cache>/<hook>/; "
            "no path separators, no leading dot, not 'tokens')."
        )


def lock_path(root: Path) -> Path:
    """The lock file of cache folder `root`: `.<name>.lock` beside it (it stays put when a cache is swapped)."""
    return root.parent / f".{root.name}.lock"


class CacheChangedError(RuntimeError):
    """A shard file of an open cache was replaced (another harvest overwrote the cache under the reader)."""


def file_identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """(device, inode, size, modification time in ns): a replaced or rewritten file differs in one of them."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


#: A shard file's name (any number of digits: `shard_name` pads to five).
SHARD_FILE = re.compile(r"^shard_\d{5,}\.npy$")


def foreign_entries(root: Path) -> list[str]:
    """Files in cache folder `root` that a harvest did not write (paths relative to root): anything but the
    manifest / progress files and shard files in its folders (hook folders, tokens); dot-files (temporaries)
    excepted."""
    found = []
    for entry in root.iterdir():
        if entry.name in (MANIFEST, PROGRESS) or entry.name.startswith("."):
            continue
        if not entry.is_dir():
            found.append(entry.name)
            continue
        found += [
            f"{entry.name}/{e.name}"
            for e in entry.iterdir()
            if not SHARD_FILE.match(e.name) and not e.name.startswith(".")
        ]
    return sorted(found)


def checksum(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes in C order."""
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Write `array` atomically; returns its record for the manifest (shape, numpy dtype, crc32)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return {"shape": list(array.shape), "dtype": array.dtype.str, "crc32": checksum(array)}


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy file open in `f`, which is left at the start of the data."""
    major, _ = np.lib.format.read_magic(f)
    if major == 1:
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def _read_json(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object in `path`, which must hold the keys `required`; errors name the file and the fix."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: JSON or UTF-8 decoding
        raise ValueError(
            f"cannot read {path}: {err}; the cache folder is damaged, harvest it again."
        ) from err
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(
            f"{path} has no {missing}: it is damaged or not written by `saelab harvest`; harvest the cache "
            "again (overwrite=true)."
        )
    return data


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
        check_hook_folders(list(widths), "harvest")
        self.final = self.root = Path(root)
        self.widths, self.dtype, self.shard_tokens = dict(widths), dtype, shard_tokens
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalise (tuples -> lists)
        self.shard_rows: list[int] = []
        #: folder (hook name or "tokens") -> one record per shard file (shape, dtype, crc32)
        self.files: dict[str, list[dict[str, Any]]] = {folder: [] for folder in [*widths, TOKENS]}
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

    def _check_target(self, overwrite: bool) -> bool:
        """Refuse an output folder this harvest must not write into; returns whether it holds a cache (complete,
        to be replaced, or interrupted, to be resumed)."""
        root = self.final
        if root.exists() and not root.is_dir():
            raise FileExistsError(f"output_dir={root} is a file; give a folder path for the cache.")
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
        if is_cache:  # an overwrite replaces the old cache whole; a resume must not meet others' files either
            foreign = foreign_entries(root)
            if foreign:
                raise FileExistsError(
                    f"output_dir={root} holds files a harvest did not write ({', '.join(foreign[:8])}"
                    f"{' ...' if len(foreign) > 8 else ''}); move them out of the cache folder first."
                )
        return is_cache

    def _take_lock(self) -> None:
        """Hold the cache folder's lock exclusively until `finish` or `abort` (or this writer's end)."""
        path = lock_path(self.final)
        path.parent.mkdir(parents=True, exist_ok=True)
        refusal = (
            f"output_dir={self.final} is in use by {{holders}}: a second harvest would mix its shards with the "
            "first's, and a reader of the cache would see it change under it. Wait for them to finish, or "
            "harvest into another output_dir."
        )
        fd = file_lock.lock(path, shared=False, role="harvest", refusal=refusal)
        self._release = weakref.finalize(self, file_lock.unlock, path, fd)

    def _prepare_folder(self, overwrite: bool) -> None:
        root = self.root
        self._check_target(overwrite)  # before locking: a refused target gets no lock file beside it
        self._take_lock()
        try:
            is_cache = self._check_target(overwrite)  # again: it may have changed until the lock was ours
            remove_stale_temporaries(root.parent, root.name)  # e.g. the new cache of a crashed overwrite
            remove_stale_temporaries(root)  # e.g. a manifest.json a crashed harvest was writing
            self._open_folder(overwrite, is_cache)
        except BaseException:
            self.abort()
            raise

    def _open_folder(self, overwrite: bool, is_cache: bool) -> None:
        root = self.root
        if overwrite and is_cache:  # build beside the old cache; `finish` swaps it in
            self.root = root = make_temporary_directory(self.final)
        root.mkdir(parents=True, exist_ok=True)
        if (root / PROGRESS).exists():
            self._resume(_read_json(root / PROGRESS, ("shard_rows", "contexts", "norm_sums")))
        else:
            self._write_progress()  # from now on the folder is recognisable as a (resumable) harvest
        self._remove_stray_files()

    def _resume(self, progress: dict[str, Any]) -> None:
        old = progress.get("config", {})
        changed = changed_settings(old, self.fingerprint)
        if changed:
            diffs = ", ".join(changed)
            raise ValueError(
                f"output_dir={self.root} holds an interrupted harvest with different settings ({diffs}); "
                "rerun with the same settings to resume it, or pass overwrite=true to start over."
            )
        self.shard_rows = [int(r) for r in progress["shard_rows"]]
        self.contexts = int(progress["contexts"])
        self.norm_sums = {h: float(v) for h, v in progress["norm_sums"].items()}
        files = progress.get("files")
        if files is None or any(len(files.get(f, [])) != len(self.shard_rows) for f in self.files):
            raise ValueError(
                f"{self.root / PROGRESS} is from an older saelab (no shard checksums); rerun with "
                "overwrite=true to harvest again."
            )
        self.files = {folder: list(files[folder]) for folder in self.files}

    def _remove_stray_files(self) -> None:
        """Delete shard files past the last recorded shard (written just before an interruption)."""
        keep = {shard_name(i) for i in range(len(self.shard_rows))}
        for folder in [*self.widths, TOKENS]:
            path = self.root / folder
            path.mkdir(exist_ok=True)
            for file in path.iterdir():
                if SHARD_FILE.match(file.name) and file.name not in keep:
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
            check_storable(acts[hook], self.dtype, hook)
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
        written = {}
        for hook in self.widths:
            rows = torch.cat([acts[hook] for acts, _ in self._pending])
            written[hook] = _save_npy(self.root / hook / shard_name(index), to_numpy(rows, self.dtype))
        tokens = torch.cat([tok for _, tok in self._pending]).to(torch.int32)
        written[TOKENS] = _save_npy(self.root / TOKENS / shard_name(index), tokens.numpy())
        for folder, record in written.items():
            self.files[folder].append(record)
        self.shard_rows.append(self._pending_rows)
        self._pending, self._pending_rows = [], 0
        self._write_progress()

    def _write_progress(self) -> None:
        progress = {
            "config": self.fingerprint,
            "shard_rows": self.shard_rows,
            "files": self.files,
            "contexts": self.contexts,
            "norm_sums": self.norm_sums,
        }
        _write_json(self.root / PROGRESS, progress)

    def abort(self) -> None:
        """After a failed harvest: delete the half-built replacement of an overwrite (the old cache stays);
        a plain harvest keeps its shards, to be resumed. Releases the folder's lock."""
        if self.root != self.final:
            shutil.rmtree(self.root, ignore_errors=True)
        self._release()

    def finish(self, metadata: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
        """Write the last shard and the manifest (last, atomically), then swap a replacement cache into
        place; returns the manifest."""
        self.flush()
        if self.rows == 0:
            raise ValueError(
                f"the harvest for {self.final} found no rows to store: every document was empty or every "
                "token special or unknown to the tokenizer; check source.dataset and source.text_column."
            )
        rows = self.rows
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype,
            "hooks": {h: {"d_in": d, "mean_norm": self.norm_sums[h] / rows} for h, d in self.widths.items()},
            "shard_rows": self.shard_rows,
            "shards": self.files,
            "total_rows": self.rows,
            "contexts": self.contexts,
            "metadata": metadata,
            "config": self.fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "wall_seconds": wall_seconds,
        }
        _write_json(self.root / MANIFEST, manifest)
        (self.root / PROGRESS).unlink(missing_ok=True)
        if self.root != self.final:
            replace_directory(self.root, self.final)
            self.root = self.final
        self._release()
        return manifest


class ActivationCache:
    """A complete cache folder, read through memory maps. Holds the folder's lock shared while open (until
    `close`, or until the object is garbage collected), so a harvest cannot replace the cache under it."""

    def __init__(self, root: str | Path, verify: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{self.root} is not an activation cache (no such folder); run `saelab harvest`."
            )
        refusal = (
            f"the cache at {self.root} is being written by {{holders}}; wait for that harvest to finish (an "
            "overwrite swaps the new cache in when it is complete), then start again."
        )
        path = lock_path(self.root)
        fd = file_lock.lock(path, shared=True, role="reader", refusal=refusal)
        self._release = weakref.finalize(self, file_lock.unlock, path, fd)
        try:
            self._open(verify)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the folder's reader lock (reading after this still works, unprotected)."""
        self._release()

    def _open(self, verify: bool) -> None:
        if not (self.root / MANIFEST).exists():
            if (self.root / PROGRESS).exists():
                raise ValueError(
                    f"{self.root} holds an interrupted harvest (no manifest.json); rerun `saelab harvest` "
                    "with the same settings to finish it."
                )
            raise FileNotFoundError(
                f"{self.root} is not an activation cache (no {MANIFEST}); run `saelab harvest`."
            )
        path = self.root / MANIFEST
        self.manifest = _read_json(path, ("format", "version", "dtype", "hooks", "shard_rows", "total_rows"))
        if self.manifest["format"] != FORMAT or self.manifest["version"] not in READABLE_VERSIONS:
            raise ValueError(
                f"{path} is not a {FORMAT} manifest of version {READABLE_VERSIONS} (found "
                f"{self.manifest['format']!r} version {self.manifest['version']!r}); harvest the cache again."
            )
        self.opened_at = time.strftime("%Y-%m-%d %H:%M:%S")
        self.dtype: str = self.manifest["dtype"]
        check_storage_dtype(self.dtype)
        self.shard_rows: list[int] = self.manifest["shard_rows"]
        self.total_rows: int = self.manifest["total_rows"]
        self.hook_names: list[str] = list(self.manifest["hooks"])
        check_hook_folders(self.hook_names, str(path))
        #: folder -> per-shard records (shape, dtype, crc32); None for version-1 caches
        self.files: dict[str, list[dict[str, Any]]] | None = self.manifest.get("shards")
        self._verified: set[tuple[str, int]] = set()
        #: (folder, shard) -> `file_identity` of the file when the cache was opened
        self._identities: dict[tuple[str, int], tuple[int, int, int, int]] = {}
        for folder in [*self.hook_names, TOKENS]:
            numpy_dtype = np.dtype(np.int32 if folder == TOKENS else STORAGE[self.dtype][0])
            for i, rows in enumerate(self.shard_rows):
                self._check_header(folder, i, rows, numpy_dtype)
        if verify:
            self.verify()

    def _check_header(self, folder: str, index: int, rows: int, numpy_dtype: np.dtype) -> None:
        """Shape and dtype of one shard file against the manifest (reads only the .npy header)."""
        array = self._map(folder, index)
        expected = (rows,) if folder == TOKENS else (rows, self.d_in(folder))
        if self.files is not None:
            records = self.files.get(folder, [])
            if len(records) != len(self.shard_rows):
                raise ValueError(
                    f"{self.root / MANIFEST} lists {len(records)} files for {folder!r} but "
                    f"{len(self.shard_rows)} shards; the manifest is damaged, harvest the cache again."
                )
            expected_dtype = np.dtype(records[index]["dtype"])
        else:
            expected_dtype = numpy_dtype
        if array.shape != expected or array.dtype != expected_dtype:
            raise ValueError(
                f"{self.root / folder / shard_name(index)} holds {array.dtype} {array.shape}, but the manifest "
                f"says {expected_dtype} {expected} for {folder!r}; the cache is damaged or mixed with another "
                "cache's files, harvest it again."
            )

    def d_in(self, hook: str) -> int:
        """Width of the rows stored for `hook` ("" / None: the cache's only hook)."""
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
        """Memory map of one shard file (opened per read: thousands of shards would exhaust file handles). The
        file must be the one this cache opened (`file_identity`); the map is made from the same open file."""
        path = self.root / folder / shard_name(index)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; the cache is damaged, harvest it again.")
        with open(path, "rb") as f:
            self._check_identity(folder, index, path, os.fstat(f.fileno()))
            try:
                shape, fortran_order, dtype = _read_npy_header(f)
                return np.memmap(
                    f,
                    dtype=dtype,
                    mode="r",
                    shape=shape,
                    order="F" if fortran_order else "C",
                    offset=f.tell(),
                )
            except (ValueError, OSError) as err:  # e.g. "mmap length is greater than file size" (truncated)
                raise ValueError(
                    f"{path} cannot be read ({err}): the file is truncated or corrupt; harvest the cache again."
                ) from err

    def _check_identity(self, folder: str, index: int, path: Path, stat: os.stat_result) -> None:
        """Record a shard file's identity on first sight; later, raise CacheChangedError if it is another file."""
        found = file_identity(stat)
        expected = self._identities.setdefault((folder, index), found)
        if found != expected:
            raise CacheChangedError(
                f"{path} is not the file this process opened at {self.opened_at}: the cache at {self.root} was "
                "replaced or rewritten while it was being read (e.g. by `saelab harvest overwrite=true` from a "
                "saelab that does not lock caches, or by hand). Stopping rather than reading other data; what "
                "was read before came from the old cache. Start again on the new cache (a training run: from "
                "scratch, or trainer.resume_from only if the data is meant to be the same)."
            )

    def _read(self, folder: str, index: int) -> np.ndarray:
        """Shard file `index` of `folder` in memory; its checksum is checked on the first read."""
        array = np.array(self._map(folder, index))
        if self.files is not None and (folder, index) not in self._verified:
            expected = self.files[folder][index]["crc32"]
            found = checksum(array)
            if found != expected:
                raise ValueError(
                    f"{self.root / folder / shard_name(index)} has CRC-32 {found}, but the manifest recorded "
                    f"{expected} for {folder!r} shard {index}: the file was modified, damaged, or copied "
                    "from another hook or cache; harvest the cache again."
                )
            self._verified.add((folder, index))
        return array

    def verify(self) -> int:
        """Check every shard file's checksum against the manifest; returns the number of files checked."""
        if self.files is None:
            raise ValueError(
                f"{self.root / MANIFEST} is a version-1 manifest without checksums; harvest the cache again "
                "(overwrite=true) to be able to verify it."
            )
        folders = [*self.hook_names, TOKENS]
        for folder in folders:
            for index in range(len(self.shard_rows)):
                self._verified.discard((folder, index))
                self._read(folder, index)
        return len(folders) * len(self.shard_rows)

    def shard(self, hook: str | list[str], index: int) -> Tensor:
        """Activations of shard `index` [rows, d] (a copy in memory); for a list of hooks their rows side by side
        [rows, d_1 + d_2 + ...] (a transcoder's [x | y])."""
        if isinstance(hook, list):
            return torch.cat([self.shard(h, index) for h in hook], dim=1)
        array = self._read(self.check_hook(hook), index)
        x = torch.from_numpy(array)
        return x.view(torch.bfloat16) if self.dtype == "bfloat16" else x

    def tokens(self, index: int) -> Tensor:
        """Token ids of shard `index` [rows] int32."""
        return torch.from_numpy(self._read(TOKENS, index))

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

    def _row_chunks(
        self, hook: str | list[str], start_row: int, seed: int, group_rows: int
    ) -> Iterator[Tensor]:
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
        hook: str | list[str] | None,
        batch_size: int,
        start_batch: int = 0,
        seed: int = 0,
        group_rows: int = 131072,
    ) -> Iterator[Tensor]:
        """Endless batches [batch_size, d] (storage dtype, CPU), batch b being a pure function of (seed, b). A list
        of hooks gives each row's activations at all of them side by side (rows are shuffled whole)."""
        hook = [self.check_hook(h) for h in hook] if isinstance(hook, list) else self.check_hook(hook)
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

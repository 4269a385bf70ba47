"""Activation caches on shared disks: a reader holds what it opened (an overwrite is refused while it lives, a
swap by a writer that ignores the lock is noticed), one harvest at a time per folder, and manifest hook names
that would reach outside the cache folder are refused."""

from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pytest
import torch

from saelab.buffer.cache import ActivationCache, CacheChangedError, CacheWriter, lock_path
from saelab.core.atomic import make_temporary_directory, replace_directory
from saelab.core.lock import LockHeld


def write_cache(root, rows=(100, 100), value=0.0, overwrite=False, finish=True):
    """A two-hook cache of shards with `rows` rows; row r of hook h.a holds value + r in every column."""
    writer = CacheWriter(root, {"h.a": 4, "h.b": 2}, "float32", rows[0], {"test": 1}, overwrite=overwrite)
    start = 0
    for n in rows:
        x = value + torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, 4)
        writer.add({"h.a": x, "h.b": -x[:, :2]}, torch.arange(start, start + n), contexts=1)
        start += n
    return writer.finish({}, wall_seconds=0.0) if finish else writer


def _hold_reader(root: str, ready, release) -> None:
    cache = ActivationCache(root)
    cache.read_all("h.a")
    ready.set()
    release.wait(60)


def test_an_overwrite_is_refused_while_a_reader_in_another_process_holds_the_cache(tmp_path):
    root = tmp_path / "c"
    write_cache(root)
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    reader = ctx.Process(target=_hold_reader, args=(str(root), ready, release))
    reader.start()
    try:
        assert ready.wait(120)
        with pytest.raises(LockHeld, match=rf"in use by pid {reader.pid} on host .* \(reader, since"):
            write_cache(root, value=1000.0, overwrite=True)
        assert ActivationCache(root).read_all("h.a")[0, 0] == 0.0  # the old cache, untouched
    finally:
        release.set()
        reader.join(60)
    write_cache(root, value=1000.0, overwrite=True)  # the reader is gone: the overwrite goes ahead
    assert ActivationCache(root).read_all("h.a")[0, 0] == 1000.0
    assert not lock_path(root).exists()  # the last holder removed the lock file


def swap_by_hand(root, rows, value):
    """Replace the cache folder whole, as a writer that ignores the lock would (a rename-swap)."""
    new = make_temporary_directory(root.parent / "new")
    write_cache(new, rows=rows, value=value)
    replace_directory(new, root)


@pytest.mark.parametrize("rows", [(100, 100), (60, 60)], ids=["same-shapes", "other-row-count"])
def test_a_reader_stops_naming_the_file_when_the_cache_is_swapped_under_it(tmp_path, rows):
    root = tmp_path / "c"
    write_cache(root)
    cache = ActivationCache(root)
    old = cache.read_all("h.a")  # every file read once: its checksum is verified, not read again
    stream = cache.batches("h.a", batch_size=50, seed=0, group_rows=100)
    next(stream)
    swap_by_hand(root, rows, value=5000.0)
    with pytest.raises(
        CacheChangedError, match=r"h\.a/shard_0000[01]\.npy is not the file this process opened"
    ):
        cache.read_all("h.a")
    with pytest.raises(CacheChangedError, match="replaced or rewritten while it was being read"):
        for _ in range(8):  # the stream reaches a shard it has not loaded yet
            next(stream)
    assert old[0, 0] == 0.0 and ActivationCache(root).read_all("h.a")[0, 0] == 5000.0


def test_one_harvest_at_a_time_per_folder_and_no_reader_while_it_writes(tmp_path):
    root = tmp_path / "c"
    first = write_cache(root, finish=False)  # a harvest in progress (shards written, no manifest yet)
    progress = (root / "progress.json").read_text()
    with pytest.raises(
        LockHeld, match=r"output_dir=.* is in use by this process, pid \d+ .*\(harvest, since"
    ):
        write_cache(root)
    assert (root / "progress.json").read_text() == progress  # the second harvest touched nothing
    first.finish({}, wall_seconds=0.0)
    assert not lock_path(root).exists()
    replacing = write_cache(root, value=7.0, overwrite=True, finish=False)
    with pytest.raises(LockHeld, match=r"the cache at .* is being written by .*\(harvest, since"):
        ActivationCache(root)
    replacing.abort()  # a failed overwrite keeps the old cache and releases the folder
    assert ActivationCache(root).read_all("h.a")[0, 0] == 0.0


def test_a_lock_file_left_by_a_dead_process_blocks_nobody(tmp_path):
    root = tmp_path / "c"
    write_cache(root)
    dead = {"pid": 999999, "host": "elsewhere", "started": "2026-01-01 00:00:00", "role": "harvest"}
    lock_path(root).write_text(json.dumps(dead) + "\n")  # no process holds a lock on it
    ActivationCache(root).read_all("h.a")
    write_cache(root, value=3.0, overwrite=True)
    assert ActivationCache(root).read_all("h.a")[0, 0] == 3.0


def test_a_manifest_hook_name_reaching_outside_the_cache_is_refused(tmp_path):
    root = tmp_path / "c"
    write_cache(root)
    outside = tmp_path / "x"  # a file with the right shape outside the cache folder
    outside.mkdir()
    np.save(outside / "shard_00000.npy", np.zeros((100, 4), np.float32))
    np.save(outside / "shard_00001.npy", np.zeros((100, 4), np.float32))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["hooks"]["../x"] = manifest["hooks"]["h.a"]
    manifest["shards"]["../x"] = manifest["shards"]["h.a"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError, match=r"manifest.json: hook names \['\.\./x'\] cannot be cache folder names"
    ):
        ActivationCache(root)

"""One live run per run directory: an exclusive lock on `<run dir>/.lock` (`saelab.core.lock`).

The lock file names its holder (pid, host, start time) and is removed when the run ends, or when the process
exits through Python (an exception, SystemExit, Ctrl-C: an atexit hook). The kernel drops the lock when the
holding process exits, however it exits, so a lock file left by a crashed or killed run never blocks the next
one. Re-entrant within a process (the `saelab train` entry point and `Trainer.fit` both take it). On NFS the
lock holds across machines (see `saelab.core.lock`); on a file system without locks the run goes on unlocked.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from saelab.core import lock as file_lock

LOCK_FILE = ".lock"

#: resolved run dir -> (open file descriptor, hold count) for the locks this process holds (None: a file system
#: without locks, `saelab.core.lock`).
_held: dict[Path, tuple[int | None, int]] = {}


class RunDirInUse(RuntimeError):
    """Another live process is training into the same run directory."""


def acquire(run_dir: str | Path) -> None:
    """Take the lock on run_dir (creating it); raise RunDirInUse naming the holder if another process has it."""
    root = Path(run_dir).resolve()
    if root in _held:
        fd, count = _held[root]
        _held[root] = (fd, count + 1)
        return
    root.mkdir(parents=True, exist_ok=True)
    refusal = (
        f"the run directory {root} is in use by another live run ({{holders}}); two runs there would overwrite "
        "each other's checkpoints and SAE. Wait for it to finish, or give this run its own directory "
        "(hydra.run.dir=... or a different output_dir)."
    )
    try:
        fd = file_lock.lock(root / LOCK_FILE, shared=False, role="train", refusal=refusal)
    except file_lock.LockHeld as err:
        raise RunDirInUse(str(err)) from None
    if not _held:
        atexit.register(_release_all)
    _held[root] = (fd, 1)


def release(run_dir: str | Path) -> None:
    """Drop one hold on run_dir's lock; the last one unlocks it."""
    root = Path(run_dir).resolve()
    if root not in _held:
        return
    fd, count = _held.pop(root)
    if count > 1:
        _held[root] = (fd, count - 1)
        return
    file_lock.unlock(root / LOCK_FILE, fd)


def _release_all() -> None:
    """At exit: release every lock still held (a run stopped by an exception whose holder never got to
    release it, e.g. Hydra skips its run-end callback then), removing the lock files."""
    for root in list(_held):
        fd, _ = _held.pop(root)
        file_lock.unlock(root / LOCK_FILE, fd)


def held_elsewhere(run_dir: str | Path) -> bool:
    """Whether a live process other than this one holds run_dir's lock (a job still training there)."""
    root = Path(run_dir).resolve()
    if root in _held:
        return False
    try:
        fd = os.open(root / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: nobody holds it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a shared lock taken just now
    return False


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path | None) -> Iterator[None]:
    """Hold run_dir's lock inside the block (no-op for None)."""
    if run_dir is None:
        yield
        return
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)

"""One live run per run directory: an exclusive `flock` on `<run dir>/.lock`.

The lock file names its holder (pid, host, start time) and is removed when the run ends, or when the process
exits through Python (an exception, SystemExit, Ctrl-C: an atexit hook). The kernel drops the lock when the
holding process exits, however it exits, so a lock file left by a crashed or killed run never blocks the next
one. Re-entrant
within a process (the `saelab train` entry point and `Trainer.fit` both take it). POSIX `flock` only: on a
network file system without flock support the lock is advisory at best.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"

#: resolved run dir -> (open file descriptor, hold count) for the locks this process holds.
_held: dict[Path, tuple[int, int]] = {}


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
    fd = _lock_file(root / LOCK_FILE)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    if not _held:
        atexit.register(_release_all)
    _held[root] = (fd, 1)


def _lock_file(path: Path) -> int:
    """Open and flock `path`; retry if the file was removed by its previous holder meanwhile (so the lock we
    hold is on the file now at `path`). Raises RunDirInUse naming the holder if it is locked."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirInUse(
                f"the run directory {path.parent} is in use by another live run ({holder}); two runs there "
                "would overwrite each other's checkpoints and SAE. Wait for it to finish, or give this run its "
                "own directory (hydra.run.dir=... or a different output_dir)."
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def release(run_dir: str | Path) -> None:
    """Drop one hold on run_dir's lock; the last one unlocks it."""
    root = Path(run_dir).resolve()
    if root not in _held:
        return
    fd, count = _held.pop(root)
    if count > 1:
        _held[root] = (fd, count - 1)
        return
    (root / LOCK_FILE).unlink(missing_ok=True)  # before unlocking: a waiting run then retries on a new file
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _release_all() -> None:
    """At exit: release every lock still held (a run stopped by an exception whose holder never got to
    release it, e.g. Hydra skips its run-end callback then), removing the lock files."""
    for root in list(_held):
        fd, _ = _held.pop(root)
        (root / LOCK_FILE).unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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

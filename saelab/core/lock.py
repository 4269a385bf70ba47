"""Advisory file locks that name their holders: one exclusive holder (a writer) or any number of shared ones
(readers), taken with `flock` on a lock file and never waited for (a second writer is refused at once).

The lock file holds one JSON line per holder: {"pid", "host", "started", "role"}. The kernel drops a lock when
its process exits, however it exits, so a lock file left by a crashed process never blocks anyone; the lines of
dead holders are only stale text (on this host they are recognised and left out of messages). The last holder
to leave removes the file; a process that locked a file just removed retries on the new one, so everyone
always locks the file now at the path.

Shared disks: on NFS, Linux emulates `flock` with POSIX byte-range locks (NFSv4, or NLM for NFSv3), so the
locks hold across machines; a machine that dies holding one keeps it until the server's lease or lock recovery
drops it (about 90 s on NFSv4). Where the file system offers no locks at all (ENOLCK, EOPNOTSUPP) or the lock
file cannot be created (a read-only folder), `lock` returns None and the caller goes on unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

#: errno values meaning "this file system or folder gives no lock": the caller goes on without one.
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EROFS, errno.EACCES, errno.EPERM)


class LockHeld(RuntimeError):
    """A live process holds a lock that conflicts with the one asked for; `holders` are their records."""

    def __init__(self, path: Path, holders: list[dict[str, Any]], message: str):
        super().__init__(message)
        self.path, self.holders = path, holders


def holder_record(role: str) -> dict[str, Any]:
    """This process as a lock holder: pid, host, start time and role (e.g. "harvest", "reader")."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "role": role,
    }


def _alive_here(record: dict[str, Any]) -> bool:
    """False only for a record of this host whose process is gone (others cannot be checked from here)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return True
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def read_holders(fd: int) -> list[dict[str, Any]]:
    """The holder records in an open lock file, dead processes of this host left out ({"unknown": line} for a
    line that is not a record, e.g. one being written)."""
    text = os.pread(fd, 1 << 16, 0).decode(errors="replace")
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            record = {"unknown": line.strip()} if line.strip() else None
        if record is not None and _alive_here(record):
            records.append(record)
    return records


def describe(holders: list[dict[str, Any]], most: int = 4) -> str:
    """Holders as text: 'pid 12 on host a (harvest, since 2026-01-01 12:00:00), ...' (at most `most`)."""
    if not holders:
        return "a process that has not recorded itself yet"
    parts = []
    for record in holders[:most]:
        if "pid" in record:
            this = record["pid"] == os.getpid() and record.get("host") == socket.gethostname()
            parts.append(
                f"{'this process, ' if this else ''}pid {record['pid']} on host {record.get('host', '?')} "
                f"({record.get('role', 'holder')}, since {record.get('started', '?')})"
            )
        else:
            parts.append(str(record.get("unknown", record)))
    more = f" and {len(holders) - most} more" if len(holders) > most else ""
    return ", ".join(parts) + more


def _open(path: Path, shared: bool) -> int | None:
    """Open (creating) the lock file; a reader that may not write opens it read-only; None if it cannot."""
    flags = os.O_RDWR | os.O_CREAT | (os.O_APPEND if shared else 0)
    try:
        return os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno not in NO_LOCKS:
            raise
    if shared:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as err:
            if err.errno not in (*NO_LOCKS, errno.ENOENT):
                raise
    return None


def lock(path: str | Path, shared: bool, role: str, refusal: str) -> int | None:
    """Take the lock at `path` without waiting; returns its file descriptor (None where the file system gives
    no lock). A conflicting live holder raises LockHeld with `refusal` formatted with {holders} (`describe`).

    shared: a reader's lock (many at once; refused while a writer holds it); else a writer's (refused while
    anyone holds it). The holder record of this process is written into the file."""
    path = Path(path)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    while True:
        fd = _open(path, shared)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = read_holders(fd)
            os.close(fd)
            raise LockHeld(path, holders, refusal.format(holders=describe(holders))) from None
        except OSError as err:
            os.close(fd)
            if err.errno in NO_LOCKS:
                return None
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file meanwhile: lock the one now at the path
    line = (json.dumps(holder_record(role)) + "\n").encode()
    try:
        if shared:
            os.write(fd, line)  # O_APPEND: beside the other readers' lines
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)
    except OSError:  # a read-only lock file: the lock holds, unnamed
        pass
    return fd


def unlock(path: str | Path, fd: int | None) -> None:
    """Drop a lock `lock` returned. The last holder removes the lock file (before unlocking, so that a process
    waiting on it retries on a new file)."""
    if fd is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a reader becomes the only holder, or gives up here
    except OSError:
        os.close(fd)
        return
    try:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            os.unlink(path)
    except OSError:
        pass
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)

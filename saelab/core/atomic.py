"""Atomic writes: build into a temporary sibling, then rename into place, so readers never see half a file.

Temporaries are named `.<name>.tmp-<host>-<pid>-<random>` (a replaced directory waits as
`.<name>.old-<host>-<pid>-<random>` until it is deleted) and created with the mode a plain `open` / `mkdir`
would give (0666 / 0777 less the umask), so what is renamed into place has ordinary permissions.
`remove_stale_temporaries` deletes those a crashed process left behind: ones whose process is no longer
alive on this host (and, for names from before the host/pid tag, ones untouched for a day);
`atomic_directory` runs it on the siblings of its target (file writers clean their own folders, e.g. the
activation cache). A write that fails for lack of room (a full disk, a quota) raises an OSError naming the
target, the disk (its mount point) and the room left there, instead of the writer's own message (torch's can
be `basic_ios::clear: iostream error`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Collection, Iterator
from pathlib import Path

#: `.<name>.tmp-<host>-<pid>-<hex>` / `.<name>.old-<host>-<pid>-<hex>`; group 1: host, group 2: pid.
_TAGGED = re.compile(r"^\..+\.(?:tmp|old)-(.+)-(\d+)-[0-9a-f]{8}$")
#: Names the untagged temporaries of older saelab versions had (mkdtemp/mkstemp suffixes, `.old-<pid>`).
_UNTAGGED = re.compile(r"^\..+\.(?:tmp-[\w]{8}|old-\d+)$")
#: Untagged temporaries older than this are stale: no single atomic write takes a day.
UNTAGGED_MAX_AGE_S = 24 * 3600


#: errno values of a write that failed for lack of room, and the words other writers (safetensors, torch) use.
NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_ROOM_WORDS = ("No space left on device", "Disk quota exceeded", "StorageFull", "iostream error")


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path` (or its nearest existing parent)."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_room(path: Path) -> str:
    """'the disk mounted at M (F free of T)' for the file system holding `path`."""
    mount = mount_point(path)
    usage = shutil.disk_usage(mount)
    return f"the disk mounted at {mount} ({usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.1f} GiB)"


def no_room_error(err: BaseException, final: Path) -> OSError | None:
    """For an error raised while writing `final`: an OSError naming `final` and its disk if the write failed for
    lack of room (a full disk or a quota), else None."""
    if getattr(err, "errno", None) not in NO_ROOM_ERRNOS and not any(w in str(err) for w in NO_ROOM_WORDS):
        return None
    return OSError(
        errno.ENOSPC,
        f"no room left writing {final} on {disk_room(final)}: free space there or write elsewhere "
        f"(nothing was replaced; the writer said: {err})",
        str(final),
    )


def host_tag() -> str:
    return re.sub(r"[^\w.]", "_", socket.gethostname()) or "host"


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask alone must set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_modes(root: Path) -> None:
    """chmod every file under `root` to 0666 (0777 if executable) and every directory (root included) to
    0777, less the umask: what a plain open / mkdir gives (some writers, e.g. safetensors, create files 0600)."""
    mask = current_umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            executable = path.is_dir() or path.stat().st_mode & 0o111
            path.chmod((0o777 if executable else 0o666) & ~mask)


def temporary_name(final: Path, kind: str = "tmp") -> Path:
    """A fresh sibling name for `final` tagged with this host and process: `.<name>.<kind>-<host>-<pid>-<hex>`."""
    return final.with_name(f".{final.name}.{kind}-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")


def make_temporary_directory(final: Path) -> Path:
    """Create an empty temporary sibling directory of `final` (mode 0777 less the umask)."""
    while True:
        tmp = temporary_name(final)
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def is_stale_temporary(path: Path, now: float | None = None) -> bool:
    """Whether `path` is a temporary left by a dead process (see the module docstring)."""
    tagged = _TAGGED.match(path.name)
    if tagged:
        host, pid = tagged.group(1), int(tagged.group(2))
        return host == host_tag() and pid != os.getpid() and not _process_alive(pid)
    if _UNTAGGED.match(path.name):
        try:
            age = (now or time.time()) - path.lstat().st_mtime
        except FileNotFoundError:
            return False
        return age > UNTAGGED_MAX_AGE_S
    return False


def remove_stale_temporaries(folder: str | Path, prefix: str = "") -> list[Path]:
    """Delete the stale temporaries directly in `folder` (whose target name starts with `prefix`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.glob(f".{glob.escape(prefix)}*"):
        if is_stale_temporary(path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | Path, owned: Collection[str] = ()) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` (`~` expanded) as a whole.

    An existing directory is replaced only if it holds nothing but what is written now and the `owned` names
    (a writer's optional outputs, e.g. plots it may leave out this time); anything else in it, a user's
    notes or another run's files, makes it raise FileExistsError naming them, and nothing is replaced. A
    path that is a file also raises.
    """
    final = Path(path).expanduser()
    if final.name in ("", ".", ".."):
        raise ValueError(
            f"{str(path)!r} names the current, a parent or the root folder; saelab writes each output as a "
            f"folder of its own, so give it a name, e.g. {str(Path(path) / 'my_sae')!r}."
        )
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a directory; choose a folder path to write into.")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, final.name)
    tmp = make_temporary_directory(final)
    try:
        yield tmp
        check_replaceable(final, {entry.name for entry in tmp.iterdir()} | set(owned))
    except BaseException as err:
        no_room = no_room_error(err, final)  # measured before the partial output is deleted
        shutil.rmtree(tmp, ignore_errors=True)
        if no_room is not None:
            raise no_room from err
        raise
    give_default_modes(tmp)
    replace_directory(tmp, final)


def check_replaceable(final: Path, replaceable: set[str]) -> None:
    """Raise FileExistsError if directory `final` holds entries outside `replaceable` (the writer's own)."""
    if not final.is_dir():
        return
    foreign = sorted(entry.name for entry in final.iterdir() if entry.name not in replaceable)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise FileExistsError(
            f"{final} already holds {shown}, which this write would delete (a saelab output folder is "
            "replaced as a whole); write into a new or empty folder, or move those out first."
        )


def replace_directory(new: Path, final: Path) -> None:
    """Rename directory `new` onto `final`; an existing `final` is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = temporary_name(final, "old")
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path in the same directory; on success it is renamed onto `path` (`~` expanded)."""
    final = Path(path).expanduser()
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temporary_name(final)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
    except BaseException as err:
        no_room = no_room_error(err, final)
        tmp.unlink(missing_ok=True)
        if no_room is not None:
            raise no_room from err
        raise
    os.replace(tmp, final)

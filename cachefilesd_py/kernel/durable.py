"""The durability primitives, one per pattern. Use only these.

- :func:`save_file_atomically`: replace a small file's whole content so that after a
  crash the file holds either the old or the new bytes, never a mix: write a temporary
  file in the same directory, ``fsync`` it, ``rename`` it over the target, ``fsync`` the
  directory. The temporary file is removed on any failure. Its name is the target's,
  hidden, with the writer's pid and thread id (``.<name>.tmp-<pid>-<tid>``); whatever
  sits at that name (a leftover of a crashed save, a planted symlink) is unlinked first
  and the file is created with ``O_EXCL|O_NOFOLLOW``, so a save never writes through a
  link. :func:`remove_stale_temps` removes the leftovers of writers that are gone.
  (This is borg's ``SaveFile`` over ``SyncFile``: exclusive create, data sync, replace,
  directory sync, temporary removed on error.)
- :func:`syncfs`: make everything written to one filesystem durable, including bytes
  written through the on-demand anonymous fd (direct I/O completion alone says nothing
  about the device cache or the file's block allocation, and that fd has no fsync).
- :func:`fsync_path`: make one file's data and metadata (e.g. a new xattr) durable.

Honest limits: POSIX promises nothing about power failures; these rely on the
filesystem (ext4/xfs) honouring fsync and ordered journal commits, and on the device
honouring cache flushes.

:func:`crashpoint` names a step between two durable actions; it does nothing in
production, and crash tests install a hook that raises there.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from cachefilesd_py.kernel._sys import syncfs

__all__ = [
    "crashpoint",
    "fsync_dir",
    "fsync_path",
    "remove_stale_temps",
    "save_file_atomically",
    "syncfs",
]

_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-\d+$", re.ASCII)

_crash_hook: Callable[[str], None] | None = None


def set_crash_hook(hook: Callable[[str], None] | None) -> None:
    """Tests only: call ``hook(name)`` at every crash point."""
    global _crash_hook
    _crash_hook = hook


def crashpoint(name: str) -> None:
    if _crash_hook is not None:
        _crash_hook(name)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file_atomically(path: Path, data: bytes) -> None:
    """Replace ``path``'s content with ``data``, all or nothing, durably."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_native_id()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # never ours in flight: the name holds this thread's id
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)  # on failure nothing of ours exists to remove
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        crashpoint("save.before_rename")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    crashpoint("save.before_dir_sync")
    fsync_dir(path.parent)


def remove_stale_temps(directory: Path) -> int:
    """Remove the temporary files of :func:`save_file_atomically` whose writer process
    is gone (a crash between create and rename); returns how many went. A live pid's
    are kept: it may be saving right now. Whatever cannot be unlinked (a directory at
    such a name: EISDIR) is left where it is: the sweep runs at start-up and must never
    stop it, and a save never writes through what sits at its name."""
    removed = 0
    for entry in os.scandir(directory):
        m = _TEMP_NAME.match(entry.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            continue
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: leave the file alone
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True

"""The durability primitives, one per pattern. Use only these.

- :func:`save_file_atomically`: replace a small file's whole content so that after a
  crash the file holds either the old or the new bytes, never a mix: write a temporary
  file in the same directory, ``fsync`` it, ``rename`` it over the target, ``fsync`` the
  directory. The temporary file is removed on any failure.
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

import os
from collections.abc import Callable
from pathlib import Path

from cachefilesd_py.kernel._sys import syncfs

__all__ = ["crashpoint", "fsync_dir", "fsync_path", "save_file_atomically", "syncfs"]

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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
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
    fsync_dir(path.parent)

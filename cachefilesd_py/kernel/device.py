"""``/dev/cachefiles``: the port the frontends use, and the real device behind it.

The port (:class:`Device`) is what both the real device and the fake
(``cachefilesd_py.testing.fake_kernel``) implement, so the same driver code runs
against either:

- ``fileno()`` is pollable: POLLIN when a request (on-demand) or a state change
  (classic) is pending, POLLOUT while the cache is below its cull limits;
- ``read_message()`` returns one whole message (or the classic state line), or ``b""``
  when nothing is pending: the device never blocks and never returns EAGAIN;
- ``write_command()`` sends exactly one command per ``write()`` (the kernel ignores
  everything after a newline) and raises ``OSError`` with the kernel's errno;
- ``pwrite``/``read_complete``/``close_fd`` act on anonymous fds of on-demand objects.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Protocol

from cachefilesd_py.kernel import _sys

DEVICE_PATH = "/dev/cachefiles"
READ_BUFFER = 4096  # ≥ CACHEFILES_MSG_MAX_SIZE (1024): EMSGSIZE cannot happen


class Device(Protocol):
    def fileno(self) -> int: ...
    def read_message(self) -> bytes: ...
    def write_command(self, cmd: bytes) -> None: ...
    def pwrite(self, fd: int, buf: memoryview, offset: int) -> int: ...
    def read_complete(self, fd: int, msg_id: int) -> None: ...
    def close_fd(self, fd: int) -> None: ...
    def close(self) -> None: ...


class CachefilesDevice:
    """The real ``/dev/cachefiles`` (or an inherited fd of it)."""

    def __init__(self, path: str = DEVICE_PATH, *, fd: int | None = None) -> None:
        if fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                hint = {
                    errno.ENOENT: "is the cachefiles module loaded? (modprobe cachefiles)",
                    errno.EBUSY: "another daemon has it open, or a process still holds "
                    "one of its anonymous fds",
                    errno.EPERM: "CAP_SYS_ADMIN is needed",
                }.get(exc.errno or 0, "")
                raise OSError(exc.errno, f"Unable to open {path}: {exc.strerror}. {hint}") from exc
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def read_message(self) -> bytes:
        return os.read(self._fd, READ_BUFFER)

    def write_command(self, cmd: bytes) -> None:
        if b"\n" in cmd or not cmd:
            raise ValueError(f"one command per write, no newline: {cmd!r}")
        written = os.write(self._fd, cmd)
        if written != len(cmd):
            raise OSError(errno.EIO, f"short command write: {written} of {len(cmd)}")

    def pwrite(self, fd: int, buf: memoryview, offset: int) -> int:
        return os.pwrite(fd, buf, offset)

    def read_complete(self, fd: int, msg_id: int) -> None:
        _sys.read_complete(fd, msg_id)

    def close_fd(self, fd: int) -> None:
        os.close(fd)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class _Commands(Protocol):
    def write_command(self, cmd: bytes) -> None: ...


_cwd_lock = threading.Lock()


def cull_one(device: _Commands, directory: str, name: str) -> str:
    """``cull <name>`` from inside ``directory`` (the kernel resolves the name against
    the process's working directory, and a ``/`` in it is EINVAL). Returns "culled",
    "busy" (EBUSY: the object is in use and stays), "gone" (ESTALE/ENOENT) or "failed".
    """
    with _cwd_lock:
        old = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.chdir(directory)
            device.write_command(b"cull " + name.encode())
            return "culled"
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return "busy"
            if exc.errno in (errno.ESTALE, errno.ENOENT):
                return "gone"
            return "failed"
        finally:
            os.fchdir(old)
            os.close(old)

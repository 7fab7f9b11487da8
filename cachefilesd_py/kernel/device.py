"""``/dev/cachefiles``: the port the frontends use, and the real device behind it.

The port (:class:`Device`) is what both the real device and the fake
(``cachefilesd_py.testing.fake_kernel``) implement, so the same driver code runs
against either (``docs/protocol-ondemand.md`` §1–§2, ``docs/protocol-classic.md`` §1):

- ``fileno()`` is pollable: POLLIN when a request (on-demand) or a state change
  (classic) is pending, POLLOUT while the cache is below its cull limits. Neither
  POLLHUP nor POLLERR is ever raised;
- ``read_message()`` returns one whole message (or the classic state line), or ``b""``
  when nothing is pending: the device never blocks and never returns EAGAIN. The buffer
  is 4096 bytes, above ``CACHEFILES_MSG_MAX_SIZE`` (1024), so EMSGSIZE cannot happen.
  Reading an OPEN is what installs its anonymous fd in this process;
- ``write_command()`` sends exactly one command per ``write()`` (the kernel ignores
  everything after a newline) and raises ``OSError`` with the kernel's errno; the
  commands themselves come from ``kernel/commands.py``;
- ``pwrite``/``read_complete``/``close_fd`` act on the anonymous fds of on-demand
  objects. ``read_complete`` passes the msg_id by value (``kernel._sys``).

Locks: ``CachefilesDevice._read_lock`` (one reader of the shared buffer at a time) and
the module's working-directory lock (one ``cull`` at a time) are never held together.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Final, Protocol

from cachefilesd_py.kernel import _sys
from cachefilesd_py.kernel.commands import encode_cull

DEVICE_PATH: Final = "/dev/cachefiles"
#: >= CACHEFILES_MSG_MAX_SIZE (1024): EMSGSIZE cannot happen; > the 256-byte state line
READ_BUFFER: Final = 4096

_OPEN_HINTS: Final = {
    errno.ENOENT: "is the cachefiles module loaded? (modprobe cachefiles)",
    errno.EBUSY: "another daemon has it open, or a process still holds one of the "
    "anonymous fds a previous daemon was given (e.g. an inherited fd in a child); "
    "the device can be opened once at a time",
    errno.EPERM: "CAP_SYS_ADMIN is needed",
    errno.EACCES: "CAP_SYS_ADMIN is needed",
}


class Device(Protocol):
    """The daemon's view of ``/dev/cachefiles``."""

    def fileno(self) -> int:
        """A pollable fd: POLLIN = message pending, POLLOUT = culling needed."""
        ...

    def read_message(self) -> bytes:
        """One whole message, or ``b""`` when none is pending (never blocks)."""
        ...

    def write_command(self, cmd: bytes) -> None:
        """One command per write; OSError carries the kernel's errno."""
        ...

    def pwrite(self, fd: int, buf: memoryview, offset: int) -> int:
        """Write into an object's cache file through its anonymous fd."""
        ...

    def read_complete(self, fd: int, msg_id: int) -> None:
        """``CACHEFILES_IOC_READ_COMPLETE`` on an anonymous fd."""
        ...

    def close_fd(self, fd: int) -> None:
        """Close an anonymous fd."""
        ...

    def close(self) -> None:
        """Close the device (unbinds the cache once every anon fd is closed too)."""
        ...


class CachefilesDevice:
    """The real ``/dev/cachefiles`` (or an inherited fd of it, e.g. from systemd's
    fd store: pass ``fd=``)."""

    def __init__(self, path: str = DEVICE_PATH, *, fd: int | None = None) -> None:
        if fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                hint = _OPEN_HINTS.get(exc.errno or 0, "")
                raise OSError(
                    exc.errno, f"Unable to open {path}: {exc.strerror}. {hint}".rstrip()
                ) from exc
        else:
            os.set_inheritable(fd, False)
        self._fd = fd
        self._buf = bytearray(READ_BUFFER)
        self._read_lock = threading.Lock()

    def fileno(self) -> int:
        return self._fd

    def read_message(self) -> bytes:
        with self._read_lock:
            n = os.readv(self._fd, [self._buf])
            return bytes(self._buf[:n])

    def write_command(self, cmd: bytes) -> None:
        if not cmd or b"\n" in cmd or b"\0" in cmd:
            raise ValueError(f"one command per write, no newline or NUL: {cmd!r}")
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


#: the working directory is process-wide: one ``cull`` at a time
_cwd_lock = threading.Lock()


def cull_in(device: _Commands, directory: str, name: str) -> int:
    """``cull <name>`` from inside ``directory`` (the kernel resolves the name against
    the process's working directory, and a ``/`` in it is EINVAL). Returns 0 when the
    kernel culled it (moved it to the graveyard), else the errno: EBUSY (in use, it
    stays), ESTALE/ENOENT (already gone), anything else (a failure; EINVAL also for a
    name the encoder refuses). Culls are serialised by a lock around the ``chdir``."""
    try:
        cmd = encode_cull(name)
    except ValueError:
        return errno.EINVAL
    with _cwd_lock:
        old = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.chdir(directory)
            device.write_command(cmd)
            return 0
        except OSError as exc:
            return exc.errno or errno.EIO
        finally:
            os.fchdir(old)
            os.close(old)

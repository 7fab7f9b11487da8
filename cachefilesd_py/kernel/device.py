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
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from typing import Final, Protocol

from cachefilesd_py.kernel import _sys
from cachefilesd_py.kernel.commands import encode_cull, encode_inuse
from cachefilesd_py.kernel.fd import OwnedFd

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


class NotTheDevice(OSError):
    """An inherited fd is not ``/dev/cachefiles`` (errno ENODEV)."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.ENODEV, why)


def check_is_device(fd: int, path: str = DEVICE_PATH) -> None:
    """Raise :class:`NotTheDevice` unless ``fd`` is an open character device with the
    same device number as ``path``. An fd handed back by systemd's fd store is trusted
    only after this: the misc minor of ``/dev/cachefiles`` is dynamic, so a module
    reload between two runs, or a wrongly named fd, would otherwise have the daemon
    write ``restore`` into some other device."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise NotTheDevice(f"inherited fd {fd} is not open: {exc.strerror}") from exc
    if not stat.S_ISCHR(st.st_mode):
        raise NotTheDevice(f"inherited fd {fd} is not a character device")
    try:
        node = os.stat(path)
    except OSError as exc:
        raise NotTheDevice(f"{path}: {exc.strerror}; cannot check inherited fd {fd}") from exc
    if not stat.S_ISCHR(node.st_mode) or node.st_rdev != st.st_rdev:
        raise NotTheDevice(
            f"inherited fd {fd} is device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, "
            f"{path} is {os.major(node.st_rdev)}:{os.minor(node.st_rdev)}"
        )


class CachefilesDevice:
    """The real ``/dev/cachefiles`` (or an inherited fd of it, e.g. from systemd's
    fd store: :meth:`inherit`)."""

    @classmethod
    def inherit(cls, fd: int, path: str = DEVICE_PATH) -> CachefilesDevice:
        """Adopt an fd opened by an earlier process, after :func:`check_is_device`.
        It is made close-on-exec; it is usually already bound (do not send ``dir`` or
        ``bind`` again: the kernel answers EEXIST/EBUSY)."""
        check_is_device(fd, path)
        return cls(path, fd=fd)

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


def _by_name(
    device: _Commands, directory: str, encode: Callable[[str], bytes], name: str
) -> int:
    """Send the command ``encode(name)`` from inside ``directory`` (the kernel resolves
    the name against the process's working directory, and a ``/`` in it is EINVAL):
    0 when the kernel accepted it, else the errno (EINVAL also for a name the encoder
    refuses). The working directory is process-wide: these commands are serialised by
    a lock around the ``chdir``."""
    try:
        cmd = encode(name)
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


def cull_in(device: _Commands, directory: str, name: str) -> int:
    """``cull <name>`` from inside ``directory``: 0 when the kernel culled it (moved it
    to the graveyard), else the errno: EBUSY (in use, it stays), ESTALE/ENOENT (already
    gone), anything else (a failure)."""
    return _by_name(device, directory, encode_cull, name)


def in_use_in(device: _Commands, directory: str, name: str) -> int:
    """``inuse <name>`` from inside ``directory``: 0 when no kernel object has the file
    open, EBUSY when one has, ESTALE/ENOENT when it is gone, another errno on failure.
    The kernel's answer covers objects this process never saw an OPEN for (e.g. opened
    by a worker that died before this one took over)."""
    return _by_name(device, directory, encode_inuse, name)


class CullCursor:
    """``cull`` for many objects in a row (one pass of a culler).

    :func:`cull_in` pays, per object, an ``open(".")``, a ``chdir`` by path (a walk from
    ``/`` down to the fan-out directory), the write, an ``fchdir`` back and a ``close``;
    a daemon runs with ``/`` as its working directory, so two of those touch the root
    filesystem every time. A cursor opens each directory once and keeps its fd, so an
    object costs one ``fchdir`` and the ``cull`` write, what cachefilesd C pays. The
    working directory stays in the cache between culls and is set back by
    :meth:`close` (the daemon must not keep sitting in the cache: it would hold the
    mount busy). At most ``max_dirs`` directory fds are kept open, the least recently
    used closed first (the kernel's fan-out is 256 directories per volume).

    Same answers as :func:`cull_in`: 0, or the errno (ENOENT too when the directory
    itself is gone). Serialised with it by the working-directory lock, taken per cull."""

    def __init__(self, device: _Commands, max_dirs: int = 1024) -> None:
        self._device = device
        self._max_dirs = max_dirs
        self._dirs: OrderedDict[str, OwnedFd] = OrderedDict()
        self._numbers: dict[str, int] = {}
        self._home: OwnedFd | None = None

    def __enter__(self) -> CullCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def open_dirs(self) -> int:
        return len(self._dirs)

    def cull(self, directory: str, name: str) -> int:
        try:
            cmd = encode_cull(name)
        except ValueError:
            return errno.EINVAL
        with _cwd_lock:
            try:
                if self._home is None:
                    self._home = OwnedFd(_open_dir("."))
                os.fchdir(self._dir_fd(directory))
                self._device.write_command(cmd)
                return 0
            except OSError as exc:
                return exc.errno or errno.EIO

    def _dir_fd(self, directory: str) -> int:
        """The kept fd of ``directory``, opened on first use. The holders are the
        cursor's own and never lent out, so the number each had when opened is kept
        beside it and used without the holder's lock. Recency is tracked only once the
        table is full (until then nothing is evicted): a cull costs one lookup here."""
        number = self._numbers.get(directory)
        if number is not None:
            if len(self._dirs) >= self._max_dirs:
                self._dirs.move_to_end(directory)
            return number
        held = OwnedFd(_open_dir(directory))
        self._dirs[directory] = held
        self._numbers[directory] = number = held.fileno()
        if len(self._dirs) > self._max_dirs:
            gone, oldest = self._dirs.popitem(last=False)
            del self._numbers[gone]
            oldest.close()
        return number

    def close(self) -> None:
        with _cwd_lock:
            if self._home is not None:
                home, self._home = self._home, None
                with suppress(OSError):
                    os.fchdir(home.fileno())
                home.close()
            self._numbers.clear()
            for held in self._dirs.values():
                held.close()
            self._dirs.clear()


def _open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

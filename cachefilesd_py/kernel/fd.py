"""Ownership of file descriptors, above all the on-demand anonymous fds.

The kernel installs an anonymous fd in the daemon for every OPEN it reads, *without*
FD_CLOEXEC. A child that inherits one pins the cache object, keeps ``/dev/cachefiles``
busy after the daemon exits (EBUSY on the next open) and breaks ``restore``. So an fd is
wrapped in an :class:`OwnedFd` the moment it arrives, which sets FD_CLOEXEC at once.

The holder also closes the fd **once**, and never while it is in use: worker threads
``borrow()`` it around each pwrite and READ_COMPLETE; a ``close()`` (a CLOSE request,
shutdown) that comes while a borrow is in flight only marks the holder closed and the
last borrower closes the number. Without this, a CLOSE could free the fd number while a
fill is about to write, the next OPEN could get the same number, and the fill's bytes
would land in another blob (pitfall 6 of ondemand-protocol.md). After close, ``fileno()``
is -1 and borrowing raises :class:`ClosedFdError`: an EBADF beats a write into someone
else's file.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress


class ClosedFdError(OSError):
    """The fd holder was closed; the kernel object it served is gone."""


class OwnedFd:
    """Owns one fd: CLOEXEC at once, borrowed by workers, closed exactly once."""

    __slots__ = ("_borrows", "_closer", "_closing", "_fd", "_lock")

    def __init__(self, fd: int, closer: Callable[[int], None] = os.close) -> None:
        """``closer`` closes the number (``os.close``, or a device port's ``close_fd``
        so that a fake kernel sees the close)."""
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)  # raises EBADF for a bogus number
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        self._fd = fd
        self._closer = closer
        self._borrows = 0
        self._closing = False
        self._lock = threading.Lock()

    def fileno(self) -> int:
        """The fd number, or -1 once closed (or closing)."""
        with self._lock:
            return -1 if self._closing else self._fd

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closing

    @contextmanager
    def borrow(self) -> Iterator[int]:
        """Use the fd for the duration of the ``with`` block; it stays open until the
        block ends even if ``close()`` is called meanwhile. Nested borrows are fine."""
        with self._lock:
            if self._closing:
                raise ClosedFdError(9, "fd holder is closed")
            self._borrows += 1
            fd = self._fd
        try:
            yield fd
        finally:
            with self._lock:
                self._borrows -= 1
                last = self._closing and self._borrows == 0 and self._fd >= 0
                if last:
                    fd, self._fd = self._fd, -1
            if last:
                self._closer(fd)

    def close(self) -> None:
        """Close now, or as soon as the last borrow ends. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._borrows:
                return
            fd, self._fd = self._fd, -1
        if fd >= 0:
            self._closer(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0 and not self._closing:
            with suppress(OSError):
                os.close(self._fd)

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd}{', closing' if self._closing else ''})"

"""Ownership of file descriptors, above all the on-demand anonymous fds.

The kernel installs an anonymous fd in the daemon for every OPEN it reads, *without*
FD_CLOEXEC (``docs/protocol-ondemand.md`` §3.3). A child that inherits one pins the
cache object, keeps ``/dev/cachefiles`` busy after the daemon exits (EBUSY on the next
open) and breaks ``restore`` (§7.3). So an fd is wrapped in an :class:`OwnedFd` the
moment it arrives, and the holder sets FD_CLOEXEC at once.

The holder also closes the number **once**, and never while it is in use. Worker
threads ``borrow()`` it around each pwrite and READ_COMPLETE. A ``close()`` that comes
while a borrow is in flight (a CLOSE request, shutdown) only marks the holder closed:
from then on ``fileno()`` is -1 and new borrows raise :class:`ClosedFdError`, and the
last borrower to leave closes the number. Without this, a CLOSE could free the fd
number while a fill is about to write, the next OPEN could be given the same number,
and the fill's bytes would land in another blob (the fd-number reuse race, §3.3).
An EBADF beats a write into someone else's file.

(The idea follows trio's ``_FdHolder``: ``fd = -1`` on close, close exactly once, also
from ``__del__``. The in-flight count is this project's addition.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import TracebackType


class ClosedFdError(OSError):
    """The fd holder was closed (errno EBADF): the kernel object it served is gone or
    going, and its number may already belong to something else."""

    def __init__(self, what: str = "fd holder is closed") -> None:
        super().__init__(errno.EBADF, what)


def set_cloexec(fd: int) -> None:
    """Set FD_CLOEXEC on ``fd`` (raises EBADF for a number that is not open)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    if not flags & fcntl.FD_CLOEXEC:
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)


class OwnedFd:
    """Owns one fd: CLOEXEC at once, borrowed by workers, closed exactly once.

    Thread-safe. ``closer`` closes the number: ``os.close``, or a device port's
    ``close_fd`` so that a fake kernel sees the close."""

    __slots__ = ("_borrows", "_closer", "_closing", "_fd", "_lock")

    def __init__(self, fd: int, closer: Callable[[int], None] = os.close) -> None:
        self._fd = -1  # so that __del__ is harmless if set_cloexec raises
        self._closing = True
        set_cloexec(fd)
        self._fd = fd
        self._closer = closer
        self._borrows = 0
        self._closing = False
        self._lock = threading.Lock()

    def fileno(self) -> int:
        """The fd number, or -1 once ``close()`` was called (even if a borrower still
        holds the number open)."""
        with self._lock:
            return -1 if self._closing else self._fd

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closing

    @property
    def borrows(self) -> int:
        """How many borrows are in flight (for tests and diagnostics)."""
        with self._lock:
            return self._borrows

    @contextmanager
    def borrow(self) -> Iterator[int]:
        """Use the fd for the duration of the ``with`` block. The number stays open
        until the block ends even if ``close()`` is called meanwhile. Nested and
        concurrent borrows are fine. Raises :class:`ClosedFdError` after ``close()``."""
        with self._lock:
            if self._closing:
                raise ClosedFdError()
            self._borrows += 1
            fd = self._fd
        try:
            yield fd
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._borrows -= 1
            if not (self._closing and self._borrows == 0 and self._fd >= 0):
                return
            fd, self._fd = self._fd, -1
        try:
            self._closer(fd)
        except OSError as exc:
            # Not raised: it would replace whatever ended the borrower's block.
            warnings.warn(f"deferred close of fd {fd} failed: {exc}", RuntimeWarning, 3)

    def close(self) -> None:
        """Close now, or as soon as the last borrow ends. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._borrows:
                return
            fd, self._fd = self._fd, -1
        self._closer(fd)

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # No lock: nobody else can hold a reference (a borrow holds one) any more.
        if self._closing or self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        self._closing = True
        warnings.warn(f"OwnedFd({fd}) was never closed", ResourceWarning, 2)
        with suppress(OSError):
            self._closer(fd)

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else ("closing" if self._closing else "open")
        return f"<OwnedFd {self._fd} {state} borrows={self._borrows}>"

"""``file://`` sources: a blob that is a local (or NFS-mounted) file.

Keys are untrusted, and so is whatever sits in the source tree, so opening follows four
rules:

- **Beneath the base.** The path is opened relative to the ``source`` rule's fixed
  directory (the *base*) with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)``
  (``kernel/_sys.py``; without openat2, one ``O_NOFOLLOW`` component at a time): no
  ``..`` above it, no absolute symlink, no relative symlink that climbs out, no
  ``/proc/self/...`` magic link, whatever the string looked like.
- **Never block on opening.** The file is first opened ``O_PATH`` (no open of the
  file itself: a FIFO cannot block, a device sees nothing), checked to be a regular
  file with ``fstat``, and only then reopened for reading through that very inode
  (``/proc/self/fd/N``) with ``O_NONBLOCK``. Directories, FIFOs, sockets and devices
  are refused.
- **Versions are pinned.** The identity's ETag is built from the inode, size, mtime and
  ctime (ctime cannot be set back by ``touch``; a chmod or a new hard link also changes
  it, which only costs a refetch). A :class:`FileSource` pins it at its first
  ``identity()``, and every fetch checks the open file with ``fstat`` *before and
  after* its ``preadv``: a file replaced (another inode) or rewritten in place (other
  times or size) gives :class:`IdentityChanged`, never bytes of two versions.
- **Fds are owned and bounded.** Open files live in a :class:`SourceFds` table shared
  by the factory: each is an ``OwnedFd`` that a fetch *borrows* around its
  ``fstat``/``preadv``/``fstat``, so no close (eviction, shutdown) can free the number
  while a worker uses it, and no other file can be given that number under it. The
  table keeps at most ``capacity`` files open (least recently used first out) and
  closes those idle for ``idle_seconds``: 10,000 blobs never mean 10,000 fds, and a
  deleted source file is not pinned for long. A file closed by the table is reopened
  by path at its next use, and must still be the same inode with the same identity.

What ``/`` in a key means: nothing, keys cannot hold one (``sources/resolve.py``): a key
fills exactly one path component; the rule's template decides the directory layout.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cachefilesd_py.errors import IdentityChanged, SourceError, SourceNotFound
from cachefilesd_py.kernel._sys import open_beneath
from cachefilesd_py.kernel.fd import OwnedFd
from cachefilesd_py.sources.base import BlobIdentity, admitted, check_blob_size
from cachefilesd_py.sources.policy import Deadline

_FileKey = tuple[str, int, int]  # (path, st_dev, st_ino)


class SourceFds:
    """A bounded table of open source files, each an :class:`OwnedFd`.

    Lock order: ``SourceFds._lock``, then an ``OwnedFd``'s own lock (``borrow`` and
    ``close`` are called with the table lock held; neither blocks)."""

    def __init__(
        self,
        capacity: int = 256,
        idle_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._open: OrderedDict[_FileKey, tuple[OwnedFd, float]] = OrderedDict()
        self._sweeper: threading.Thread | None = None
        self._closed = threading.Event()

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def adopt(self, key: _FileKey, owned: OwnedFd) -> None:
        """Keep ``owned`` open under ``key`` (closing whatever it replaces)."""
        with self._lock:
            old = self._open.pop(key, None)
            self._open[key] = (owned, self.clock())
            self._trim_locked()
            self._start_sweeper_locked()
        if old is not None and old[0] is not owned:
            old[0].close()

    @contextmanager
    def borrow(self, key: _FileKey, opener: Callable[[], OwnedFd]) -> Iterator[int]:
        """The fd of ``key`` for the ``with`` block, opened by ``opener`` if the table
        has none; it stays open until the block ends, whatever happens meanwhile."""
        with self._lock:
            entry = self._open.get(key)
            if entry is not None:
                self._open.move_to_end(key)
                self._open[key] = (entry[0], self.clock())
                cm = entry[0].borrow()
                fd = cm.__enter__()  # cannot fail: entries in the table are open
                self._trim_locked()
        if entry is None:
            owned = opener()
            with self._lock:
                old = self._open.pop(key, None)
                self._open[key] = (owned, self.clock())
                cm = owned.borrow()
                fd = cm.__enter__()
                self._trim_locked()
                self._start_sweeper_locked()
            if old is not None:
                old[0].close()
        try:
            yield fd
        finally:
            cm.__exit__(None, None, None)

    def sweep(self) -> None:
        """Close the files idle for longer than ``idle_seconds``."""
        with self._lock:
            self._trim_locked()

    def _start_sweeper_locked(self) -> None:
        """While the table holds files, a thread sweeps it every half ``idle_seconds``,
        so an idle daemon does not keep deleted source files pinned; it ends when the
        table is empty."""
        if self._sweeper is not None and self._sweeper.is_alive():
            return
        self._sweeper = threading.Thread(target=self._sweep_loop, name="source-fds", daemon=True)
        self._sweeper.start()

    def _sweep_loop(self) -> None:
        while not self._closed.wait(max(0.05, self.idle_seconds / 2)):
            with self._lock:
                self._trim_locked()
                if not self._open:
                    self._sweeper = None
                    return

    def _trim_locked(self) -> None:
        now = self.clock()
        while self._open:
            key, (owned, used) = next(iter(self._open.items()))
            if len(self._open) <= self.capacity and now - used < self.idle_seconds:
                break
            del self._open[key]
            owned.close()  # deferred by OwnedFd while a fetch borrows it

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            entries = list(self._open.values())
            self._open.clear()
        for owned, _ in entries:
            owned.close()


def _identity_of(st: os.stat_result, url: str) -> BlobIdentity:
    etag = f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ctime_ns:x}"
    return BlobIdentity(st.st_size, etag, url)


class FileSource:
    """One opening of one file blob (see the module docstring and ``sources/base.py``).

    ``beneath`` is the directory the file must be found in (the ``source`` rule's fixed
    part); by default the file's own directory, so that at least the last component is
    resolved without leaving it."""

    origin = "file:"

    def __init__(
        self,
        path: str,
        url: str | None = None,
        *,
        beneath: str | None = None,
        fds: SourceFds | None = None,
        max_size: int | None = None,
        gate: threading.BoundedSemaphore | None = None,
    ) -> None:
        self.path = path
        self.gate = gate
        self.url = url or f"file://{path}"
        self.beneath = beneath if beneath is not None else (os.path.dirname(path) or "/")
        #: the ``source`` rule's label for metrics (``sources/resolve.py``)
        self.label: str = getattr(url, "label", None) or f"file://{self.beneath}"
        self.max_size = max_size
        self._owns_fds = fds is None
        self._fds = fds if fds is not None else SourceFds(capacity=1)
        self._identity: BlobIdentity | None = None
        self._key: _FileKey | None = None
        self._lock = threading.Lock()

    # -- opening -----------------------------------------------------------------------

    def _error(
        self, message: str, *, reason: str, transient: bool = False, kernel_errno: int = errno.EIO
    ) -> SourceError:
        return SourceError(
            f"{self.path}: {message}",
            transient=transient,
            reason=reason,
            kernel_errno=kernel_errno,
            url=self.url,
        )

    def _relative(self) -> str:
        base = os.path.normpath(self.beneath)
        path = os.path.normpath(self.path)
        rel = os.path.relpath(path, base) if os.path.isabs(path) else path
        if rel == "." or rel == ".." or rel.startswith("../") or os.path.isabs(rel):
            raise self._error(
                f"not below {self.beneath}", reason="outside-source", kernel_errno=errno.EACCES
            )
        return rel

    def _translate(self, exc: OSError, what: str) -> SourceError:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return SourceNotFound(f"{self.path}: no such file", url=self.url)
        if exc.errno in (errno.EXDEV, errno.ELOOP):
            return self._error(
                f"{what}: the path leaves {self.beneath} or goes through a symlink that "
                f"may not be followed ({exc.strerror})",
                reason="outside-source",
                kernel_errno=errno.EACCES,
            )
        transient = exc.errno in (
            errno.EMFILE,
            errno.ENFILE,
            errno.ENOMEM,
            errno.EINTR,
            errno.EAGAIN,
            errno.ESTALE,
            errno.EIO,
        )
        return self._error(f"{what}: {exc.strerror}", reason="open", transient=transient)

    def _open(self) -> tuple[OwnedFd, os.stat_result]:
        """Open the file for reading beneath the base, without ever blocking on it."""
        rel = self._relative()
        try:
            base_fd = os.open(self.beneath, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._translate(exc, f"source directory {self.beneath}") from exc
        try:
            try:
                path_fd = open_beneath(base_fd, rel, os.O_PATH)
            except OSError as exc:
                raise self._translate(exc, "open") from exc
            try:
                st = os.fstat(path_fd)
                self._require_regular(st)
                fd = self._reopen_for_reading(path_fd, base_fd, rel, st)
            finally:
                os.close(path_fd)
        finally:
            os.close(base_fd)
        owned = OwnedFd(fd)
        try:
            st = os.fstat(fd)
            self._require_regular(st)
        except BaseException:
            owned.close()
            raise
        return owned, st

    def _require_regular(self, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "a directory"
                if stat.S_ISDIR(st.st_mode)
                else "a FIFO"
                if stat.S_ISFIFO(st.st_mode)
                else "a socket"
                if stat.S_ISSOCK(st.st_mode)
                else "a device"
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a symlink"
                if stat.S_ISLNK(st.st_mode)
                else "not a regular file"
            )
            raise self._error(
                f"is {kind}, not a regular file", reason="not-a-file", kernel_errno=errno.EACCES
            )

    def _reopen_for_reading(self, path_fd: int, base_fd: int, rel: str, st: os.stat_result) -> int:
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(f"/proc/self/fd/{path_fd}", flags)
        except FileNotFoundError:  # no /proc: walk again, then make sure it is the same
            try:
                fd = open_beneath(base_fd, rel, flags)
            except OSError as exc:
                raise self._translate(exc, "open") from exc
        except OSError as exc:
            raise self._translate(exc, "open") from exc
        try:
            again = os.fstat(fd)
            if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
                raise IdentityChanged(f"{self.path} was replaced while opened", url=self.url)
            # O_NONBLOCK was only for the open; reads of a regular file never need it
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- identity ----------------------------------------------------------------------

    def identity(self, deadline: Deadline) -> BlobIdentity:
        """The pinned identity; the file is opened and looked at by the first call."""
        with self._lock:
            if self._identity is not None:
                return self._identity
            try:
                owned, st = self._open()
            except SourceError:
                raise
            except OSError as exc:
                raise self._translate(exc, "open") from exc
            try:
                ident = _identity_of(st, self.url)
                check_blob_size(ident.size, self.url)
                if self.max_size is not None and ident.size > self.max_size:
                    raise self._error(
                        f"size {ident.size} above the configured limit {self.max_size}",
                        reason="too-large",
                    )
            except BaseException:
                owned.close()
                raise
            key = (self.path, st.st_dev, st.st_ino)
            self._fds.adopt(key, owned)
            self._identity, self._key = ident, key
            return ident

    def _reopen(self) -> OwnedFd:
        """Open the pinned file again (the table had closed it): it must still be the
        same inode, else the blob was replaced."""
        owned, st = self._open()
        assert self._key is not None
        if (st.st_dev, st.st_ino) != self._key[1:]:
            owned.close()
            raise IdentityChanged(
                f"{self.path} was replaced (another inode) since it was opened", url=self.url
            )
        return owned

    # -- fetch -------------------------------------------------------------------------

    def fetch_into(self, offset: int, buf: memoryview, deadline: Deadline) -> None:
        ident = self.identity(deadline)
        if offset < 0 or offset + len(buf) > ident.size:
            raise self._error(
                f"range {offset}+{len(buf)} past the end ({ident.size})", reason="range"
            )
        assert self._key is not None
        try:
            with (
                admitted(self.gate, deadline, self.url),
                self._fds.borrow(self._key, self._reopen) as fd,
            ):
                self._check(fd, ident)
                done = 0
                while done < len(buf):
                    n = os.preadv(fd, [buf[done:]], offset + done)
                    if n <= 0:
                        raise self._error(
                            f"short read at {offset + done}", reason="short-read", transient=True
                        )
                    done += n
                # bytes read while the file changed are not this version's
                self._check(fd, ident)
        except SourceError:
            raise
        except OSError as exc:
            raise self._error(
                f"read: {exc.strerror}", reason="read", transient=exc.errno != errno.EBADF
            ) from exc

    def _check(self, fd: int, ident: BlobIdentity) -> None:
        now = _identity_of(os.fstat(fd), self.url)
        if now != ident:
            raise IdentityChanged(
                f"{self.path} changed: {ident.token()} -> {now.token()}", url=self.url
            )

    def close(self) -> None:
        """A source made without a shared table closes its own; the factory's table is
        closed by the factory."""
        if self._owns_fds:
            self._fds.close()

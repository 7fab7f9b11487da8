"""``file://`` sources: a blob that is a local (or NFS-mounted) file.

The identity's ETag is built from the file's inode, mtime and size: replacing or
rewriting the file changes it, and every fetch checks it again with one ``fstat``, so
bytes of two versions are never mixed in one cache file.
"""

from __future__ import annotations

import os
import threading

from cachefilesd_py.errors import IdentityChanged, SourceError, SourceNotFound
from cachefilesd_py.sources.base import BlobIdentity
from cachefilesd_py.sources.policy import Deadline


class FileSource:
    def __init__(self, path: str, url: str | None = None) -> None:
        self.path = path
        self.url = url or f"file://{path}"
        self._fd = -1
        self._identity: BlobIdentity | None = None
        self._lock = threading.Lock()

    @property
    def origin(self) -> str:
        """Every local file shares one origin: the local filesystems."""
        return "file:"

    def _open(self) -> int:
        with self._lock:
            if self._fd < 0:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError as exc:
                    raise SourceNotFound(f"{self.path}: no such file", url=self.url) from exc
                except OSError as exc:
                    raise SourceError(
                        f"{self.path}: {exc.strerror}", transient=False, reason="open", url=self.url
                    ) from exc
            return self._fd

    def _stat_identity(self, fd: int) -> BlobIdentity:
        st = os.fstat(fd)
        etag = f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"
        return BlobIdentity(st.st_size, etag, self.url)

    def identity(self, deadline: Deadline) -> BlobIdentity:
        """Looked up afresh at every call (every OPEN): a file replaced since the
        last call is reopened, and fetches then check against the new identity."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError as exc:
            raise SourceNotFound(f"{self.path}: no such file", url=self.url) from exc
        current = self._identity
        if (
            current is not None
            and current.etag != f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"
        ):
            self.close()
        fd = self._open()
        self._identity = self._stat_identity(fd)
        return self._identity

    def fetch_into(self, offset: int, buf: memoryview, deadline: Deadline) -> None:
        ident = self._identity or self.identity(deadline)
        fd = self._open()
        now = self._stat_identity(fd)
        if now != ident:
            raise IdentityChanged(
                f"{self.path} changed: {ident.token()} -> {now.token()}", url=self.url
            )
        if offset < 0 or offset + len(buf) > ident.size:
            raise SourceError(
                f"range {offset}+{len(buf)} past the end ({ident.size})",
                transient=False,
                reason="range",
                url=self.url,
            )
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n <= 0:
                raise SourceError(
                    f"{self.path}: short read at {offset + done}",
                    transient=True,
                    reason="short-read",
                    url=self.url,
                )
            done += n

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

"""Who may touch a blob's cache file right now: its users, or one trimmer, never both.

The kernel's ``cull`` refuses (EBUSY) a file it has in use, so removing a whole blob is
safe by itself. Punching holes into a file is not: the kernel decides whether a range
is present by looking for data in the backing file (SEEK_DATA) and then reads it, so a
punch between the two would hand zeros to a reader. A kernel only reads a cache file
while it holds an object on it, and it cannot use an object before the daemon has
answered its OPEN. So a frontend takes a *use* lease before it answers an OPEN (and
loads the blob's presence) and gives it back after the object is closed and its
presence saved; a trimmer takes the *trim* lease, which is refused while any use lease
is held and makes a new OPEN wait until the trim is over.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from cachefilesd_py.blobkey import BlobKey


class BlobLeases:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users: Counter[BlobKey] = Counter()
        self._trimming: set[BlobKey] = set()

    def acquire_use(self, key: BlobKey, timeout: float | None = None) -> bool:
        """Wait until no trim of ``key`` runs, then count one more user. False on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: key not in self._trimming, timeout):
                return False
            self._users[key] += 1
            return True

    def release_use(self, key: BlobKey) -> None:
        with self._cond:
            if self._users[key] <= 0:
                raise RuntimeError(f"use lease of {key!r} released more often than taken")
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
            self._cond.notify_all()

    def in_use(self) -> set[BlobKey]:
        with self._cond:
            return set(self._users)

    @contextmanager
    def trim(self, key: BlobKey) -> Iterator[bool]:
        """Yields True with the trim lease held (new users wait), or False at once if
        the blob has users (or another trim): then the caller must leave it alone."""
        with self._cond:
            granted = key not in self._users and key not in self._trimming
            if granted:
                self._trimming.add(key)
        try:
            yield granted
        finally:
            if granted:
                with self._cond:
                    self._trimming.discard(key)
                    self._cond.notify_all()

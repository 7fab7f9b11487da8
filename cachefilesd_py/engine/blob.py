"""A blob: one cache file's worth of bytes, as the engine knows it.

A blob is named by a :class:`~cachefilesd_py.blobkey.BlobKey`, which each frontend
builds from what its kernel gives it (``blobkey.py``). The engine keeps one
:class:`Blob` per key while any kernel object refers to it; several kernel objects may
refer to the same blob over time (an on-demand re-open gets a new object id for the
same cache file), and they share the blob's presence bitmap and its in-flight table.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.engine.readahead import StreamReadahead
from cachefilesd_py.presence.bitmap import ChunkGeometry
from cachefilesd_py.presence.store import BlobPresence
from cachefilesd_py.sources.base import BlobIdentity, Source

__all__ = ["Blob", "BlobKey", "InFlight"]


class InFlight:
    """One chunk being fetched by some worker; others wait on it instead of refetching."""

    __slots__ = ("_event", "ok")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.ok = False

    def finish(self, ok: bool) -> None:
        self.ok = ok
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """True if the chunk was fetched and written by its owner in time."""
        return self._event.wait(max(0.0, timeout)) and self.ok


@dataclass(eq=False)
class Blob:
    """Engine state of one blob.

    Lock order: ``Blob.lock`` may be taken while holding nothing else; while holding it
    the engine only touches ``inflight`` and asks ``presence`` (whose own lock nests
    inside). Network and disk I/O never happen with ``Blob.lock`` held.
    """

    key: BlobKey
    source: Source
    identity: BlobIdentity
    geometry: ChunkGeometry
    presence: BlobPresence | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    inflight: dict[int, InFlight] = field(default_factory=dict)
    #: kernel objects currently referring to this blob
    users: int = 0
    #: read-ahead stream cursors (None: read-ahead off); guarded by ``lock``
    readahead: StreamReadahead | None = None
    #: how metrics name its source (``sources/base.py`` ``source_label``): bounded
    source_label: str = ""
    #: wall-clock time (``time.time()``) of the last OPEN or READ the kernel sent for
    #: it; written without a lock (one float store), read by ``cachefilesctl blobs``
    last_use: float | None = None

    @property
    def size(self) -> int:
        return self.identity.size

    @property
    def chunk_size(self) -> int:
        return self.geometry.chunk_size

    def missing(self, offset: int, length: int) -> bool:
        """Whether the daemon's bitmap lacks a chunk of ``[offset, offset+length)``
        (a READ of present chunks raced with a fill: no fetch, no offline policy)."""
        if length <= 0 or offset >= self.size:
            return False
        if self.presence is None:
            return True
        first, last = self.geometry.chunks_for(offset, min(length, self.size - offset))
        return bool(self.presence.missing_runs(first, last))

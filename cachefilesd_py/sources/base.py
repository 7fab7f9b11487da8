"""What a blob source is: the narrow interface the engine fetches through.

A :class:`Source` is **one opening of one blob**: ``SourceFactory.open(url)`` returns a
new one for every call (the engine calls it once per blob it starts serving, i.e. at an
OPEN of a blob that no kernel object uses yet). Its first ``identity()`` learns the
blob's size and validators from the origin and **pins** them; every later
``identity()`` returns the pinned value, and ``fetch_into`` only ever reports bytes of
that version: when the origin changed since, the fetch raises :class:`IdentityChanged`
and the caller writes nothing. So a blob already open keeps its identity (its cache
file never mixes two versions), and the next OPEN after its last user is gone learns
the new one. Shared state (HTTP connection pools, open file descriptors) lives in the
factory, not in the handle, so handles are cheap and need no closing.

``fetch_into`` never returns a partially valid buffer: either it returns normally and
the whole buffer holds the requested bytes, or it raises :class:`SourceError` (or a
subclass), and the caller writes nothing to the cache. Every failure inside a source,
whatever its cause, comes out as a ``SourceError`` with a ``reason``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from cachefilesd_py.errors import IdentityChanged, SourceError, SourceNotFound
from cachefilesd_py.sources.policy import Deadline

__all__ = [
    "MAX_BLOB_SIZE",
    "BlobIdentity",
    "IdentityChanged",
    "Source",
    "SourceError",
    "SourceNotFound",
    "admitted",
    "check_blob_size",
    "source_label",
]

#: The largest blob a source accepts: 16 TiB. EROFS (Linux ≤ 6.14) addresses blocks
#: with 32 bits, so with 4 KiB blocks no image or extra device can reference more than
#: 2**32 * 4 KiB = 16 TiB; a larger claim from an origin is a lie or a mistake, and
#: believing it would size bitmaps and sidecars after it (a HEAD claiming 2 PiB asked
#: for a 256 MiB bitmap at 1 MiB chunks).
MAX_BLOB_SIZE = 16 << 40


@dataclass(frozen=True)
class BlobIdentity:
    """Size and version validators of a blob at its source.

    ``etag`` is the origin's entity tag exactly as sent (``"..."`` or ``W/"..."``; for
    files one built from the inode), ``last_modified`` its ``Last-Modified`` in whole
    seconds since the epoch (None when absent or not usable). Both go into
    :meth:`token`, which the sidecars persist: a restart against a changed origin sees
    another token, and the old chunks are a miss, never trusted.
    """

    size: int
    etag: str | None
    url: str
    last_modified: int | None = None

    def token(self) -> str:
        """A stable string naming this version of the blob, persisted in sidecars:
        ``size:etag:last-modified`` (``-`` for an absent part). An ETag never holds a
        ``"``-free ``:``-suffix of digits, so the three parts cannot be confused."""
        lm = "-" if self.last_modified is None else str(self.last_modified)
        return f"{self.size}:{self.etag or '-'}:{lm}"

    @classmethod
    def from_token(cls, token: str, url: str) -> BlobIdentity | None:
        """The identity a :meth:`token` names (None if ``token`` is not one): how a
        version the cache holds is asked for again (If-Match on its ETag) when the
        origin may have moved on. The ETag may hold ``:``; the size and the last part
        never do."""
        size_text, sep, rest = token.partition(":")
        etag, sep2, lm_text = rest.rpartition(":")
        if not (sep and sep2 and size_text.isdigit() and etag):
            return None
        if lm_text != "-" and not lm_text.isdigit():
            return None
        return cls(
            int(size_text),
            None if etag == "-" else etag,
            url,
            None if lm_text == "-" else int(lm_text),
        )


def check_blob_size(size: int, url: str) -> int:
    """``size`` if a blob may have it, else a permanent :class:`SourceError`."""
    if not 0 <= size <= MAX_BLOB_SIZE:
        raise SourceError(
            f"{url}: blob size {size} is outside 0..{MAX_BLOB_SIZE} (16 TiB, the most an "
            "EROFS image with 4 KiB blocks can address)",
            transient=False,
            reason="too-large",
            url=url,
        )
    return size


class Source(Protocol):
    """One opening of one blob (see the module docstring)."""

    @property
    def origin(self) -> str:
        """Where the bytes come from, for per-origin limits and scheduling:
        ``scheme://host:port`` for HTTP(S) (default ports written out), ``file:`` for
        local files."""
        ...

    def identity(self, deadline: Deadline) -> BlobIdentity: ...

    def fetch_into(self, offset: int, buf: memoryview, deadline: Deadline) -> None: ...

    def close(self) -> None: ...


def source_label(source: Source) -> str:
    """How metrics name where ``source`` fetches from: its ``source`` rule's label
    (``sources/resolve.py`` ``rule_label``) when it has one, else its origin. Never
    the blob's key: the label set stays as small as the configuration."""
    label = getattr(source, "label", None)
    return label if isinstance(label, str) and label else source.origin


@contextmanager
def admitted(
    gate: threading.BoundedSemaphore | None, deadline: Deadline, url: str
) -> Iterator[None]:
    """Hold one of the ``gate``'s slots (the factory's bound on fetches in flight, all
    origins together) for the ``with`` block; wait for one no longer than the deadline."""
    if gate is None:
        yield
        return
    if not gate.acquire(timeout=max(0.0, deadline.remaining())):
        raise SourceError(
            f"{url}: no fetch slot free before the deadline (all in use)",
            transient=True,
            reason="busy",
            url=url,
        )
    try:
        yield
    finally:
        gate.release()

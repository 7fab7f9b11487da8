"""What a blob source is: the narrow interface the engine fetches through.

A source knows one blob (one URL). It tells the blob's identity (size and, when the
server has one, an ETag) and fills caller-owned buffers with byte ranges. It never
returns a partially valid buffer: either ``fetch_into`` returns normally and the
whole buffer holds the requested bytes, or it raises :class:`SourceError`, and the
caller writes nothing to the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cachefilesd_py.errors import IdentityChanged, SourceError, SourceNotFound
from cachefilesd_py.sources.policy import Deadline

__all__ = ["BlobIdentity", "IdentityChanged", "Source", "SourceError", "SourceNotFound"]


@dataclass(frozen=True)
class BlobIdentity:
    """Size and version tag of a blob at its source."""

    size: int
    etag: str | None
    url: str

    def token(self) -> str:
        """A stable string naming this version of the blob, persisted in sidecars."""
        return f"{self.size}:{self.etag or '-'}"


class Source(Protocol):
    @property
    def origin(self) -> str:
        """Who serves the blob, for per-origin limits: ``scheme://host:port`` for
        HTTP(S), ``file:`` for local files. Sources with one origin share its limits."""
        ...

    def identity(self, deadline: Deadline) -> BlobIdentity: ...

    def fetch_into(self, offset: int, buf: memoryview, deadline: Deadline) -> None: ...

    def close(self) -> None: ...

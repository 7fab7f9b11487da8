"""Blobs whose origin changed while cached: conflicts, how each ends, kept on disk.

A **conflict** exists when the version of a blob the cache holds (its identity token,
``size:etag:last-modified``, the one its sidecar and its open kernel objects were
built on) is no longer the version its origin serves. The engine never mixes two
versions: every range request is conditioned on the cached version's validators
(``sources/validators.py``), so an origin that changed answers 412 or another ETag,
never bytes of the other version. What a conflict adds is a decision, and who sees it.

Found three ways: by the **resync** when a source comes back online (the engine asks
the origin for the identity of every open blob, and of every pinned blob whose cache
file names a version), at the **OPEN of a pinned blob** whose sidecar names another
version than the origin's, and when a **fetch is refused** by the validators (the
origin's new version is then not known yet: ``upstream`` is :data:`UNKNOWN`).

Each is in one of three states:

- ``open``: just found. The cached version stays in force: present chunks are served,
  missing ones fail (EIO: they exist only in the other version), and a new OPEN of the
  blob gets the cached version as long as its cache file still vouches for it.
- ``keep`` (``cachefilesctl resolve BLOB keep``): the operator chose the cached
  version. Served as above, no longer listed as needing attention. Another change
  upstream (a third version) opens a new conflict.
- ``refetch`` (``resolve BLOB refetch``): the operator chose the origin's version.
  Kernel objects open now keep the cached version to their end (never mixed); the
  next OPEN takes the origin's version, its stale cache file is replaced, and the
  conflict is gone.

The book is kept in ``<state dir>/conflicts.json`` (written whole by
``save_file_atomically``), so a decision survives a restart. An unreadable or corrupt
file is logged and the book starts empty: a conflict forgotten means only that the
origin's version wins at the next OPEN, which is what happens without this book.

Lock order: ``ConflictBook._lock`` is a leaf; ``on_found`` runs with it released.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path

import structlog

from cachefilesd_py.errors import IdentityChanged
from cachefilesd_py.kernel.durable import save_file_atomically
from cachefilesd_py.sources.base import BlobIdentity, Source
from cachefilesd_py.sources.policy import Deadline

log = structlog.get_logger("engine.conflicts")

CONFLICT_FILE_NAME = "conflicts.json"
#: the origin's version when only a refused fetch told us it changed
UNKNOWN = "?"
#: the most conflicts kept: each is a few hundred bytes; more means the origin is
#: being rewritten wholesale, and the oldest decisions are dropped (logged)
MAX_CONFLICTS = 10_000


class Resolution(Enum):
    OPEN = "open"
    KEEP = "keep"
    REFETCH = "refetch"


@dataclass(frozen=True)
class Conflict:
    """One blob's two versions: ``cached`` (served) and ``upstream`` (the origin's)."""

    blob: str
    cached: str
    upstream: str
    #: unix time it was found
    since: float
    resolution: Resolution = Resolution.OPEN

    @property
    def in_force(self) -> str | None:
        """The version a new OPEN gets, if not the origin's: the cached one."""
        return None if self.resolution is Resolution.REFETCH else self.cached

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "resolution": self.resolution.value}


class ConflictFileCorrupt(ValueError):
    pass


def decode(data: bytes) -> dict[str, Conflict]:
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ConflictFileCorrupt("not a version 1 conflicts file")
        out: dict[str, Conflict] = {}
        for item in doc["conflicts"]:
            c = Conflict(
                blob=str(item["blob"]),
                cached=str(item["cached"]),
                upstream=str(item["upstream"]),
                since=float(item["since"]),
                resolution=Resolution(item["resolution"]),
            )
            out[c.blob] = c
        return out
    except (ValueError, KeyError, TypeError) as exc:
        raise ConflictFileCorrupt(str(exc)) from None


def encode(conflicts: dict[str, Conflict]) -> bytes:
    items = sorted(conflicts.values(), key=lambda c: (c.since, c.blob))
    doc = {"version": 1, "conflicts": [c.to_json() for c in items]}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


class ConflictBook:
    """The conflicts of one cache. ``state_dir`` None keeps them in memory only.

    A book made with ``enabled=False`` records nothing (:meth:`found` is a no-op): for
    a frontend without the ``conflicts``/``resolve`` operations, where a conflict kept
    in force could never be ended; there the origin's version wins at the next open."""

    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        on_found: Callable[[Conflict], None] = lambda _c: None,
        clock: Callable[[], float] = time.time,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = state_dir / CONFLICT_FILE_NAME if state_dir is not None and enabled else None
        self.on_found = on_found
        self._clock = clock
        self._lock = threading.Lock()
        self._book = self._load()

    def _load(self) -> dict[str, Conflict]:
        if self.path is None:
            return {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.error("conflicts.unreadable", file=str(self.path), error=str(exc))
            return {}
        try:
            book = decode(data)
        except ConflictFileCorrupt as exc:
            log.error(
                "conflicts.corrupt",
                file=str(self.path),
                error=str(exc),
                note="starting with none: the origin's version wins at the next OPEN",
            )
            return {}
        if book:
            log.info("conflicts.loaded", file=str(self.path), conflicts=len(book))
        return book

    def _save(self, book: dict[str, Conflict]) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_file_atomically(self.path, encode(book))
        except OSError as exc:  # the decision holds until the restart
            log.error("conflicts.save_failed", file=str(self.path), error=str(exc))

    # -- queries -----------------------------------------------------------------------

    def get(self, blob: str) -> Conflict | None:
        with self._lock:
            return self._book.get(blob)

    def all(self) -> list[Conflict]:
        with self._lock:
            return sorted(self._book.values(), key=lambda c: (c.since, c.blob))

    def needing_attention(self) -> int:
        with self._lock:
            return sum(1 for c in self._book.values() if c.resolution is Resolution.OPEN)

    # -- transitions -------------------------------------------------------------------

    def found(self, blob: str, cached: str, upstream: str) -> Conflict | None:
        """The origin serves ``upstream`` while the cache holds ``cached``: the new
        conflict (and ``on_found`` called), or None when this one is already known or
        decided (the same versions, or no news: an :data:`UNKNOWN` upstream)."""
        if cached == upstream or not self.enabled:
            return None
        with self._lock:
            old = self._book.get(blob)
            if old is not None and old.cached == cached:
                if upstream in (old.upstream, UNKNOWN):
                    return None
                if old.resolution is Resolution.REFETCH:
                    return None  # decided for the origin's version, whichever it is
                if old.upstream == UNKNOWN and old.resolution is Resolution.OPEN:
                    new = replace(old, upstream=upstream)  # now we know which
                    self._book[blob] = new
                    self._save(self._book)
                    return None
            new = Conflict(blob, cached, upstream, self._clock())
            self._book[blob] = new
            self._trim()
            self._save(self._book)
        log.warning(
            "blob.conflict",
            blob=blob,
            cached=cached,
            upstream=upstream,
            note="the cached version stays in force; cachefilesctl resolve BLOB keep|refetch",
        )
        try:
            self.on_found(new)
        except Exception:  # a notifier's failure is not the engine's
            log.exception("conflict.notify_failed", blob=blob)
        return new

    def resolve(self, blob: str, how: Resolution) -> Conflict:
        """End (``refetch``) or accept (``keep``) ``blob``'s conflict; KeyError if none."""
        if how is Resolution.OPEN:
            raise ValueError("resolve with keep or refetch")
        with self._lock:
            new = replace(self._book[blob], resolution=how)
            self._book[blob] = new
            self._save(self._book)
        log.info("conflict.resolved", blob=blob, resolution=how.value, cached=new.cached)
        return new

    def forget(self, blob: str, why: str) -> None:
        """The conflict is over (the origin serves the cached version again, the
        origin's version was taken, or the cached one is gone)."""
        with self._lock:
            gone = self._book.pop(blob, None)
            if gone is not None:
                self._save(self._book)
        if gone is not None:
            log.info("conflict.ended", blob=blob, why=why)

    def _trim(self) -> None:
        while len(self._book) > MAX_CONFLICTS:
            oldest = min(self._book.values(), key=lambda c: c.since)
            del self._book[oldest.blob]
            log.warning("conflict.dropped", blob=oldest.blob, why="too many conflicts")


class CachedVersion:
    """A blob's source when the version the cache holds is served, not the one the
    origin was asked for: kept in force by a conflict, or opened while the origin
    could not be reached (a pinned blob, ``Engine.open_blob``).

    ``identity`` answers the cached version. A fetch first learns the origin's version
    (the source's own identity: already known for a conflict, asked once otherwise)
    and goes ahead only if it is the cached one; else it fails with
    :class:`IdentityChanged` (EIO for the reader) and no byte of the other version is
    read."""

    def __init__(self, source: Source, cached: BlobIdentity) -> None:
        self.source = source
        self.cached = cached
        self.label = getattr(source, "label", None)

    @property
    def origin(self) -> str:
        return self.source.origin

    def identity(self, deadline: Deadline) -> BlobIdentity:
        return self.cached

    def fetch_into(self, offset: int, buf: memoryview, deadline: Deadline) -> None:
        upstream = self.source.identity(deadline)
        if upstream.token() != self.cached.token():
            raise IdentityChanged(
                f"{self.cached.url}: the cache serves version {self.cached.token()}, the "
                f"origin {upstream.token()} (cachefilesctl conflicts)",
                url=self.cached.url,
            )
        self.source.fetch_into(offset, buf, deadline)

    def close(self) -> None:
        self.source.close()

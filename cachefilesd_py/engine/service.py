"""The frontend-independent engine: blobs by key, their sources, presence and fills.

A frontend (on-demand today, fanotify pre-content later) calls, per kernel object:

- :meth:`Engine.open_blob` when the kernel starts using a blob: resolves the blob's
  source from the ``source`` rules, learns its identity (size, ETag), and loads its
  presence bitmap from the sidecar if the cache file vouches for it;
- :meth:`Engine.ensure` for each range the kernel lacks;
- :meth:`Engine.release` when the kernel is done with the object: the blob is
  checkpointed and, if its cache file is now reachable, bound to its sidecar.

A background thread checkpoints dirty presence bitmaps every ``checkpoint_interval``
seconds: one ``syncfs`` of the cache filesystem, then the sidecars (see
``presence/store.py``), so a bit reaches the disk only after its data did.

Counters the daemon reads for its metrics (``daemon/control.py``), each kept where
its event happens: the filler's (``engine/fill.py``), OPENs whose source identity
failed by error kind (:attr:`Engine.open_errors`), and :attr:`Engine.checkpoints`
(checkpoints that saved sidecars, sidecars saved, failures) with their durations in
:attr:`Engine.checkpoint_times`.

Lock order: ``Engine._lock`` guards the table of blobs only and is a leaf: sources,
presence loads, checkpoints and binds all run without it. The locks taken below it
(``Blob.lock`` in fills, the presence store's I/O lock, ``BlobPresence.lock``) are
never taken while it is held.
"""

from __future__ import annotations

import fnmatch
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from cachefilesd_py.counters import LabelledCounts
from cachefilesd_py.engine.blob import Blob, BlobKey
from cachefilesd_py.engine.conflicts import UNKNOWN, CachedVersion, Conflict, ConflictBook
from cachefilesd_py.engine.fill import Filler, Sink
from cachefilesd_py.engine.latency import LatencyHistogram
from cachefilesd_py.engine.leases import BlobLeases
from cachefilesd_py.engine.offline import OfflineGate
from cachefilesd_py.engine.readahead import Prefetch, StreamReadahead
from cachefilesd_py.errors import IdentityChanged, SourceError, SourceNotFound, error_kind
from cachefilesd_py.kernel.dio import PAGE_SIZE, BufferPool
from cachefilesd_py.presence.bitmap import ChunkGeometry
from cachefilesd_py.presence.store import BlobPresence, PresenceStore
from cachefilesd_py.sources.base import BlobIdentity, Source, source_label
from cachefilesd_py.sources.policy import Deadline

log = structlog.get_logger("engine")

DEFAULT_CHUNK_SIZE = 1024 * 1024


@dataclass(frozen=True)
class EngineSettings:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    #: (glob over "<volume>/<cookie>", chunk size); first match wins
    chunk_size_rules: tuple[tuple[str, int], ...] = ()
    #: the largest read-ahead window of a sequential stream (0: no read-ahead)
    readahead: int = 0
    fetch_timeout: float = 30.0
    max_run: int = 4 * 1024 * 1024
    buffers: int = 12
    checkpoint_interval: float = 5.0


@dataclass
class CheckpointStats:
    """Presence checkpoints since start: the periodic ones, and each blob's at its
    release (a plain save, or the bind of its sidecar to the committed cache file)."""

    #: checkpoints that saved at least one sidecar
    checkpoints: int = 0
    #: sidecars saved by them
    sidecars_saved: int = 0
    #: checkpoints that failed: ``syncfs`` failed (nothing saved, the bitmaps stay
    #: dirty for the next one) or a bind's sidecar could not be saved
    checkpoint_failures: int = 0


@dataclass
class Engine:
    resolve: Callable[[bytes, bytes], str | None]
    open_source: Callable[[str], Source]
    presence: PresenceStore
    settings: EngineSettings = field(default_factory=EngineSettings)
    #: blobs whose origin changed while cached (``engine/conflicts.py``); the
    #: on-demand daemon gives one kept on disk, others record none
    conflicts: ConflictBook = field(default_factory=lambda: ConflictBook(enabled=False))

    def __post_init__(self) -> None:
        self._blobs: dict[BlobKey, Blob] = {}
        self._lock = threading.Lock()
        #: who may touch a blob's cache file: frontends take use leases, trims trim leases
        self.leases = BlobLeases()
        self.filler = Filler(BufferPool(self.settings.max_run, self.settings.buffers))
        self.filler.on_fetch_failed = self._refused_by_origin
        #: seconds per checkpoint that saved something (syncfs + sidecar writes)
        self.checkpoint_times = LatencyHistogram()
        self.checkpoints = CheckpointStats()
        self._checkpoints_lock = threading.Lock()  # a leaf: the counters only
        #: OPENs whose source identity could not be learnt, by error kind
        self.open_errors = LabelledCounts()
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        if self._checkpointer is None:
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="checkpoint", daemon=True
            )
            self._checkpointer.start()

    def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=30)
        self.checkpoint()
        self.filler.buffers.close()
        self.presence.close()

    # -- blobs -----------------------------------------------------------------------

    def chunk_size_for(self, key: BlobKey) -> int:
        return chunk_size_for(self.settings, key)

    def source_for(self, key: BlobKey) -> Source:
        """The source serving ``key`` (by the ``source`` rules). Raises
        :class:`SourceNotFound` when no rule matches, :class:`SourceError` for a URL
        no source can serve. Cheap: no network."""
        url = self.resolve(key.volume_key, key.name)
        if url is None:
            raise SourceNotFound(f"no source rule matches {key}")
        return self.open_source(url)

    def open_blob(
        self,
        key: BlobKey,
        cache_file: Path | None,
        deadline: Deadline,
        source: Source | None = None,
    ) -> Blob:
        """The blob for ``key``, shared with other kernel objects of the same key.
        ``source`` is :meth:`source_for`'s answer when the caller has it already.

        Raises :class:`SourceNotFound` when no rule matches or the source has no such
        blob, :class:`SourceError` when its identity cannot be learnt.
        """
        with self._lock:
            blob = self._blobs.get(key)
            if blob is not None:
                blob.users += 1
                blob.last_use = time.time()
                return blob
        if source is None:
            source = self.source_for(key)
        try:
            identity = self._identity(source, deadline)
        except SourceError as exc:
            offline = self._open_offline(key, cache_file, source, exc)
            if offline is None:
                self.open_errors.add(error_kind(exc))
                raise
            source, identity = offline
        else:
            source, identity = self._version_in_force(key, cache_file, source, identity)
        blob = self._new_blob(key, source, identity, cache_file)
        with self._lock:
            existing = self._blobs.get(key)
            if existing is not None:  # another worker opened it meanwhile
                existing.users += 1
                existing.last_use = time.time()
                return existing
            blob.users = 1
            blob.last_use = time.time()
            self._blobs[key] = blob
        return blob

    def _identity(self, source: Source, deadline: Deadline) -> BlobIdentity:
        """The source's identity, asked through the offline gate (not asked at all
        while the source is offline)."""
        return self.filler.gate.fetch(source.origin, lambda: source.identity(deadline))

    # -- versions (engine/conflicts.py) ------------------------------------------------

    def _version_in_force(
        self, key: BlobKey, cache_file: Path | None, source: Source, upstream: BlobIdentity
    ) -> tuple[Source, BlobIdentity]:
        """Which version a new OPEN of ``key`` gets: the origin's (``upstream``),
        unless a conflict keeps the cached one in force while the cache file still
        holds it. The OPEN of a pinned blob whose cache file holds another version
        than the origin's finds a conflict: pinned data is not silently replaced."""
        name = str(key)
        conflict = self.conflicts.get(name)
        if conflict is None and not self.gate.is_pinned(key):
            return source, upstream
        cached = self._cached_token(key, cache_file)
        if conflict is not None:
            if conflict.in_force is None:
                self.conflicts.forget(name, "the origin's version is taken")
                return source, upstream
            if cached != conflict.cached:
                self.conflicts.forget(name, "the cached version is no longer in the cache")
                return source, upstream
            if upstream.token() == cached:
                self.conflicts.forget(name, "the origin serves the cached version again")
                return source, upstream
            self.conflicts.found(name, cached, upstream.token())  # a third version?
        elif cached is None or cached == upstream.token():
            return source, upstream
        else:
            self.conflicts.found(name, cached, upstream.token())
        kept = BlobIdentity.from_token(cached, upstream.url)
        if kept is None:  # a sidecar vouched for a token we never write: distrust it
            self.conflicts.forget(name, "the cached version is not readable")
            return source, upstream
        log.warning("open.cached_version_kept", blob=name, cached=cached, upstream=upstream.token())
        return CachedVersion(source, kept), kept

    def _open_offline(
        self, key: BlobKey, cache_file: Path | None, source: Source, exc: SourceError
    ) -> tuple[Source, BlobIdentity] | None:
        """A pinned blob opens from its cache file while its origin cannot be reached
        (offline, refused, timed out): the version its sidecar vouches for, fetched
        from once the origin is back only if the origin still serves it. None for
        anything else (the OPEN fails as before)."""
        if exc.reason != "offline" and error_kind(exc) not in ("connection", "timeout"):
            return None
        if not self.gate.is_pinned(key):
            return None
        cached = self._cached_token(key, cache_file)
        url = getattr(source, "url", None) or exc.url or key.match_name
        kept = BlobIdentity.from_token(cached, url) if cached else None
        if kept is None:
            return None
        log.warning("open.offline_from_cache", blob=str(key), cached=cached, error=str(exc))
        return CachedVersion(source, kept), kept

    def _cached_token(self, key: BlobKey, cache_file: Path | None) -> str | None:
        """The version the cache file of ``key`` holds, if its sidecar vouches for it."""
        if cache_file is None:
            return None
        bound = self.presence.load_bound(key, cache_file)
        return bound.token if bound is not None else None

    def _refused_by_origin(self, blob: Blob, exc: SourceError) -> None:
        """A fetch for ``blob`` was refused by the origin's validators: it changed."""
        if isinstance(exc, IdentityChanged):
            self.conflicts.found(str(blob.key), blob.identity.token(), UNKNOWN)

    def resync(
        self, origin: str, idle: Iterable[tuple[BlobKey, Path]] = (), timeout: float = 10.0
    ) -> list[Conflict]:
        """Re-validate what the cache holds from ``origin`` (it came back online):
        the version of every open blob, and of every ``idle`` blob (pinned, not open:
        its cache file) whose sidecar names one, against a fresh identity from the
        origin. The conflicts found (each also logged and sent to ``on_found``)."""
        checks: dict[BlobKey, str] = {
            b.key: b.identity.token() for b in self.blobs() if b.source.origin == origin
        }
        for key, path in idle:
            if key not in checks:
                token = self._cached_token(key, path)
                if token is not None:
                    checks[key] = token
        found: list[Conflict] = []
        for key, cached in checks.items():
            try:
                fresh = self.source_for(key)
            except SourceError:
                continue
            try:
                if fresh.origin != origin:
                    continue
                upstream = self._identity(fresh, Deadline.after(timeout))
            except SourceError as exc:
                log.info("resync.unanswered", blob=str(key), error=str(exc), reason=exc.reason)
                if exc.reason == "offline":
                    break  # gone again: the next reconnect resyncs
                continue
            finally:
                fresh.close()
            name = str(key)
            if upstream.token() == cached:
                if self.conflicts.get(name) is not None:
                    self.conflicts.forget(name, "the origin serves the cached version again")
                continue
            conflict = self.conflicts.found(name, cached, upstream.token())
            if conflict is not None:
                found.append(conflict)
        log.info("resync.done", origin=origin, checked=len(checks), conflicts=len(found))
        return found

    def _new_blob(
        self, key: BlobKey, source: Source, identity: BlobIdentity, cache_file: Path | None
    ) -> Blob:
        """A trusted sidecar decides the blob's chunk size (a ``chunk_size`` change
        applies to new blobs only); the configured one applies otherwise."""
        presence: BlobPresence = self.presence.load(
            key,
            cache_file if cache_file is not None and cache_file.exists() else None,
            identity.size,
            identity.token(),
            chunk_size=self.chunk_size_for(key),
            chunk_size_ok=self.chunk_size_fits,
        )
        chunk = presence.geometry.chunk_size
        return Blob(
            key=key,
            source=source,
            identity=identity,
            geometry=ChunkGeometry(identity.size, chunk),
            presence=presence,
            readahead=self._stream_readahead(chunk),
            source_label=source_label(source),
        )

    def chunk_size_fits(self, chunk: int) -> bool:
        """Whether blobs of ``chunk``-byte chunks can be filled: one chunk must fit a
        fill buffer, and direct I/O needs whole pages."""
        return PAGE_SIZE <= chunk <= self.filler.max_run and chunk % PAGE_SIZE == 0

    def _stream_readahead(self, chunk: int) -> StreamReadahead | None:
        """Windows start at 1 MiB (or 2 chunks, if larger) and double up to the
        configured ``readahead``; a READ up to one chunk past a stream's end (the
        kernel asks for the next hole, which starts at a chunk boundary) continues it."""
        if self.settings.readahead <= 0:
            return None
        first = min(self.settings.readahead, max(1 << 20, 2 * chunk))
        return StreamReadahead(self.settings.readahead, first_window=first, slack=chunk)

    @property
    def gate(self) -> OfflineGate:
        """The offline gate of every fetch (``engine/offline.py``)."""
        return self.filler.gate

    def ensure(self, blob: Blob, offset: int, length: int, sink: Sink, deadline: Deadline) -> None:
        self.filler.ensure(blob, offset, length, sink, deadline)

    def plan_readahead(self, blob: Blob, offset: int, length: int) -> Prefetch | None:
        """The kernel's READ of ``[offset, offset+length)`` was served: what to fetch
        ahead of it (None for a READ that does not continue a sequential stream)."""
        if blob.readahead is None:
            return None
        with blob.lock:
            return blob.readahead.on_read(offset, length, blob.size)

    def readahead(self, blob: Blob, ahead: Prefetch, sink: Sink) -> None:
        """Fetch what :meth:`plan_readahead` asked for; errors are logged only."""
        try:
            self.filler.prefetch(
                blob,
                ahead.offset,
                ahead.length,
                sink,
                Deadline.after(self.settings.fetch_timeout),
            )
        except (SourceError, OSError) as exc:
            log.debug("readahead.failed", blob=str(blob.key), offset=ahead.offset, error=str(exc))

    def release(self, blob: Blob, committed: Callable[[], Path | None] | None = None) -> None:
        """One kernel object stopped using ``blob``. When it was the last, checkpoint
        the blob and bind its sidecar to the cache file ``committed()`` returns (the
        file the kernel has just linked into the cache, or None if not reachable)."""
        with self._lock:
            blob.users -= 1
            last = blob.users <= 0
            if last and self._blobs.get(blob.key) is blob:
                del self._blobs[blob.key]
        if not last or blob.presence is None:
            return
        path = committed() if committed is not None else None
        if path is not None:
            began = time.monotonic()
            try:
                self.presence.bind(blob.presence, path)
                self._count_checkpoint(began, 1)
                log.info(
                    "presence.bound",
                    blob=str(blob.key),
                    file=str(path),
                    present=blob.presence.bitmap.count(),
                    chunks=blob.geometry.nchunks,
                )
            except OSError as exc:
                with self._checkpoints_lock:
                    self.checkpoints.checkpoint_failures += 1
                log.warning("presence.bind_failed", blob=str(blob.key), error=str(exc))
        else:
            self._checkpoint([blob.presence])

    def blobs(self) -> list[Blob]:
        with self._lock:
            return list(self._blobs.values())

    # -- durability ------------------------------------------------------------------

    def checkpoint(self) -> None:
        presences = [b.presence for b in self.blobs() if b.presence is not None]
        if presences:
            self._checkpoint(presences)

    def _checkpoint(self, presences: list[BlobPresence]) -> None:
        """Save the dirty ones of ``presences`` (``PresenceStore.checkpoint``), counted
        and timed when something was saved; a failed ``syncfs`` is logged, counted and
        left for the next checkpoint (the bitmaps stay dirty)."""
        began = time.monotonic()
        try:
            saved = self.presence.checkpoint(presences)
        except OSError as exc:
            with self._checkpoints_lock:
                self.checkpoints.checkpoint_failures += 1
            log.warning("presence.checkpoint_failed", error=str(exc))
            return
        if saved:
            self._count_checkpoint(began, saved)

    def _count_checkpoint(self, began: float, saved: int) -> None:
        self.checkpoint_times.record(time.monotonic() - began)
        with self._checkpoints_lock:
            self.checkpoints.checkpoints += 1
            self.checkpoints.sidecars_saved += saved

    def checkpoint_fields(self) -> dict[str, int]:
        """The checkpoint counters, and sidecars that could not be saved."""
        with self._checkpoints_lock:
            out = dict(vars(self.checkpoints))
        out["sidecar_save_failures"] = self.presence.save_failures
        return out

    def _checkpoint_loop(self) -> None:
        while not self._stop.wait(self.settings.checkpoint_interval):
            self.checkpoint()


def chunk_size_for(settings: EngineSettings, key: BlobKey) -> int:
    """The chunk size a new blob gets: the first ``source_chunk_size`` rule matching
    its ``<volume>/<name>``, else the default."""
    for pattern, size in settings.chunk_size_rules:
        if fnmatch.fnmatchcase(key.match_name, pattern):
            return size
    return settings.chunk_size

"""Make a byte range of a blob present: the engine's one job, whatever the frontend.

``Filler.ensure(blob, offset, length, sink, deadline)``:

1. widens the range to whole chunks (the blob's chunk size) and clips it to the blob;
2. under the blob's lock, claims every chunk that is neither present (by the daemon's
   own bitmap, never by SEEK_DATA) nor already being fetched, and notes which chunks
   other workers are fetching;
3. coalesces the claimed chunks into runs of adjacent chunks (at most ``max_run`` bytes
   each) and, for each run, fetches it from the source into a page-aligned buffer with
   one request, hands it to the frontend's :class:`Sink` (which writes it into the
   cache file, e.g. by direct I/O into the on-demand anonymous fd), and only then
   notes the chunks as written in the presence bitmap (a bit may lag its data, never
   lead it);
4. waits for the chunks other workers were fetching; if one of them failed, claims it
   again while the deadline allows.

A frontend asks for a range because the kernel saw a hole there. If every chunk of the
range is marked present, that is usually a READ the kernel queued while another
worker's fill of the same chunks was still running: nothing to do. But if the cache
file still has a hole there, the bitmap contradicts the file (the file was replaced, or
a bit is wrong): the chunks are fetched again rather than trusting the bitmap, and the
contradiction is logged. SEEK_DATA is consulted only for this cross-check, never to
decide that data is present.

Before each run's fetch the filler's :class:`~cachefilesd_py.engine.offline.OfflineGate`
is asked whether the source may be fetched from (a fetch to an offline source is not
attempted: ``OfflineError``), and hears the fetch's outcome afterwards.

Errors: :class:`SourceError` from the source (after its own retries) and ``OSError``
from the sink propagate to the caller, which fails the kernel request (the reader sees
EIO). Nothing is marked present for a run whose fetch or write failed.

Counters (read by the daemon for its metrics, never pushed anywhere): ``stats``,
the fetch and write histograms, bytes fetched per source label and failed fills by
error kind (``errors.py`` ``error_kind``), each bumped once per run or failure, where
it happens.

Lock order: ``Blob.lock`` before ``BlobPresence.lock`` (a claim asks the bitmap while
holding the blob's lock); ``Filler._stats_lock`` and the counters' locks are leaves.
No lock is held while fetching, writing or waiting for another worker's chunk, and
buffers are borrowed from the pool with no lock held.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from cachefilesd_py.counters import LabelledCounts
from cachefilesd_py.engine.blob import Blob, InFlight
from cachefilesd_py.engine.latency import LatencyHistogram
from cachefilesd_py.engine.offline import OfflineGate
from cachefilesd_py.errors import SourceError, error_kind
from cachefilesd_py.kernel.dio import AlignedBuffer, BufferPool
from cachefilesd_py.sources.policy import Deadline

log = structlog.get_logger("engine")


class Sink(Protocol):
    """Where fetched bytes go: the frontend's handle on the blob's cache file."""

    def write(self, offset: int, buf: AlignedBuffer, length: int) -> None:
        """Write ``buf[:length]`` at ``offset`` (chunk aligned) durably enough that the
        kernel sees data there, or raise ``OSError``."""

    def has_hole(self, offset: int, length: int) -> bool:
        """Whether the cache file has a hole in the range (SEEK_DATA/SEEK_HOLE). Used
        only to tell a lying bitmap from a READ that raced with a finished fill."""


@dataclass
class FillStats:
    """Counters since start, for logs, status and benchmarks."""

    requests: int = 0
    runs: int = 0
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    waits: int = 0
    contradictions: int = 0
    failures: int = 0


class Filler:
    """Fetches missing chunks of blobs and writes them through a sink."""

    def __init__(self, buffers: BufferPool) -> None:
        self.buffers = buffers
        self.max_run = buffers.size
        self.stats = FillStats()
        #: seconds per source fetch (one range request or file read per run)
        self.fetch_times = LatencyHistogram()
        #: seconds per write of a fetched run into the cache file (retries for room
        #: after ENOBUFS included)
        self.write_times = LatencyHistogram()
        #: bytes fetched (and written), by the blob's source label
        self.fetched_by_source = LabelledCounts()
        #: fills that failed, by error kind (``errors.py`` ERROR_KINDS)
        self.errors = LabelledCounts()
        self._stats_lock = threading.Lock()
        #: admits each fetch by its source's connectivity and hears its outcome
        #: (``engine/offline.py``; without a connectivity driver it admits everything)
        self.gate = OfflineGate()
        #: told of each failed fill (the engine looks for a version the origin refused)
        self.on_fetch_failed: Callable[[Blob, SourceError], None] = lambda _b, _e: None

    def ensure(self, blob: Blob, offset: int, length: int, sink: Sink, deadline: Deadline) -> None:
        """Make ``[offset, offset+length)`` of ``blob`` present, or raise."""
        geom = blob.geometry
        if length <= 0 or offset >= blob.size:
            return
        first, last = geom.chunks_for(offset, min(length, blob.size - offset))
        blob.last_use = time.time()
        with self._stats_lock:
            self.stats.requests += 1
        force = self._all_marked(blob, first, last)
        if force and not sink.has_hole(offset, min(length, blob.size - offset)):
            return  # raced with a fill that has finished meanwhile
        if force:
            self._log_contradiction(blob, first, last)
        for _attempt in range(3):
            mine, theirs = self._claim(blob, first, last, force)
            force = False
            self._fetch_claimed(blob, mine, sink, deadline)
            if not theirs:
                return
            with self._stats_lock:
                self.stats.waits += 1
            if all(f.wait(deadline.remaining()) for f in theirs):
                return
            if deadline.expired():
                break
        late = SourceError(
            f"{blob.key}: chunks {first}..{last - 1} still missing at the deadline",
            transient=True,
            reason="deadline",
        )
        self.errors.add(error_kind(late))
        raise late

    def prefetch(
        self, blob: Blob, offset: int, length: int, sink: Sink, deadline: Deadline
    ) -> None:
        """Read-ahead: fetch what is missing, skip what others fetch, never wait."""
        if length <= 0 or offset >= blob.size:
            return
        first, last = blob.geometry.chunks_for(offset, min(length, blob.size - offset))
        mine, _theirs = self._claim(blob, first, last, force=False)
        self._fetch_claimed(blob, mine, sink, deadline)

    # -- internals -------------------------------------------------------------------

    @staticmethod
    def _all_marked(blob: Blob, first: int, last: int) -> bool:
        presence = blob.presence
        if presence is None or presence.missing_runs(first, last):
            return False
        with blob.lock:
            return not any(i in blob.inflight for i in range(first, last))

    def _log_contradiction(self, blob: Blob, first: int, last: int) -> None:
        with self._stats_lock:
            self.stats.contradictions += 1
        log.warning(
            "presence.contradicted",
            blob=str(blob.key),
            first=first,
            last=last,
            note="the cache file has a hole where the bitmap says present; refetching",
        )

    def _claim(
        self, blob: Blob, first: int, last: int, force: bool
    ) -> tuple[list[tuple[int, InFlight]], list[InFlight]]:
        mine: list[tuple[int, InFlight]] = []
        theirs: list[InFlight] = []
        presence = blob.presence
        with blob.lock:
            for i in range(first, last):
                other = blob.inflight.get(i)
                if other is not None:
                    theirs.append(other)
                    continue
                if not force and presence is not None and presence.is_present(i):
                    continue
                mark = InFlight()
                blob.inflight[i] = mark
                mine.append((i, mark))
        return mine, theirs

    def _release(self, blob: Blob, claimed: list[tuple[int, InFlight]], ok: bool) -> None:
        with blob.lock:
            for i, mark in claimed:
                if blob.inflight.get(i) is mark:
                    del blob.inflight[i]
        for _i, mark in claimed:
            mark.finish(ok)

    def _runs(
        self, blob: Blob, claimed: list[tuple[int, InFlight]]
    ) -> list[list[tuple[int, InFlight]]]:
        per_run = max(1, self.max_run // blob.chunk_size)
        runs: list[list[tuple[int, InFlight]]] = []
        for item in claimed:
            if runs and runs[-1][-1][0] + 1 == item[0] and len(runs[-1]) < per_run:
                runs[-1].append(item)
            else:
                runs.append([item])
        return runs

    def _fetch_claimed(
        self, blob: Blob, claimed: list[tuple[int, InFlight]], sink: Sink, deadline: Deadline
    ) -> None:
        if not claimed:
            return
        runs = self._runs(blob, claimed)
        failure: BaseException | None = None
        for index, run in enumerate(runs):
            if failure is not None:
                self._release(blob, run, ok=False)
                continue
            try:
                self._fetch_run(blob, run, sink, deadline)
            except BaseException as exc:
                failure = exc
                self._release(blob, run, ok=False)
                for rest in runs[index + 1 :]:
                    self._release(blob, rest, ok=False)
                break
            self._release(blob, run, ok=True)
        if failure is not None:
            with self._stats_lock:
                self.stats.failures += 1
            self.errors.add(error_kind(failure))
            if isinstance(failure, SourceError):
                self.on_fetch_failed(blob, failure)
            raise failure

    def _fetch_run(
        self, blob: Blob, run: list[tuple[int, InFlight]], sink: Sink, deadline: Deadline
    ) -> None:
        geom = blob.geometry
        first = run[0][0]
        start, _ = geom.chunk_range(first)
        last_start, last_len = geom.chunk_range(run[-1][0])
        length = last_start + last_len - start
        with self.buffers.borrow() as buf, buf.view[:length] as view:
            began = time.monotonic()
            self.gate.fetch(
                blob.source.origin, lambda: blob.source.fetch_into(start, view, deadline)
            )
            fetched = time.monotonic()
            self.fetch_times.record(fetched - began)
            sink.write(start, buf, length)
            self.write_times.record(time.monotonic() - fetched)
        if blob.presence is not None:
            blob.presence.note_written(first, len(run))
        with self._stats_lock:
            self.stats.runs += 1
            self.stats.chunks_fetched += len(run)
            self.stats.bytes_fetched += length
        self.fetched_by_source.add(blob.source_label, length)

"""Trimming a cache file while EROFS reads it: bits first, a settle, then the punch.

A mounted image's cache file cannot be removed, but its chunks can be given back: the
blob's bits are cleared, holes punched over the chunks, and the next read of them
raises an event that fills them again. What must never happen is a reader getting the
zeros of a punched hole (``docs/protocol-fanotify.md``, traps 3 to 5). What the kernel
does, and how each step answers it:

- A backing read raises its pre-content event *before* it reads (``vfs_iocb_iter_read``
  checks, then calls ``read_iter`` in the same task). A read allowed from the bitmap a
  moment before the bits were cleared may therefore still be on its way to the page
  cache when the trimmer runs. So the trimmer clears the bits (durably: a bit may lag
  its data, never lead it), then waits until every answer the reader thread decided
  from the bits before they went has been written (:meth:`TrimGuard.wait_allows`: the
  reader registers before each bitmap lookup and deregisters after writing the
  answer), then waits :data:`SETTLE_SECONDS` more — long enough for the reads those
  answers let go to have copied their pages — and only then punches. Punching
  truncates the backing file's page cache for the range; a read that already holds
  those pages copies the old bytes; a read that starts later finds a hole, but its
  event came after the bits were cleared, so it was sent to the fill path.
  The residual risk, stated plainly: a reader whose task stalls, in the kernel, for
  longer than the settle time between being woken by its answer and its page-cache
  lookup could read a hole. EROFS's
  own page cache (decompressed data, metadata) is separate and stays valid.
- An event whose chunks are missing becomes a fill; a fill of a blob being trimmed is
  **parked** (:meth:`TrimGuard.enter_fill` returns False, no worker waits) and
  resubmitted when the trim ends, when it fetches the punched chunks again. A trim
  starts only once the fills already running on the blob have finished, so a fill
  never sets a bit over a range being punched.
- A blob with an ignore mark (every chunk was present) raises no events at all: the
  ignore mark is removed first (``images.unsilence``), before the bits are cleared,
  and the settle covers the reads it let through.
- The punch itself, through an fd opened after the mark, raises a pre-content event
  for the punched range from the daemon's own process (trap 4) and waits for the
  answer: the reader thread allows it (:meth:`TrimGuard.own_punch`), and the punch runs
  in the space thread, never in the thread that answers events.

Lock order: :class:`TrimGuard`'s condition is a leaf; nothing is called with it held.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from cachefilesd_py.engine.cull import punch_runs
from cachefilesd_py.presence.store import BlobPresence, PresenceStore
from cachefilesd_py.space.chunks import KEEP_HEAD_BYTES, chunks_to_trim, keep_head_chunks
from cachefilesd_py.space.plan import Outcome

log = structlog.get_logger("fanotify")

#: seconds between clearing a trim's bits and punching its holes: reads allowed before
#: the bits went have long copied their pages by then
SETTLE_SECONDS = 0.5


@dataclass(eq=False)
class TrimGuard:
    """Fills and a trim of one served blob exclude each other; see the module
    docstring."""

    _cond: threading.Condition = field(default_factory=threading.Condition)
    trimming: bool = False
    active_fills: int = 0
    #: fills that arrived during a trim, resubmitted when it ends
    parked: list[Callable[[], None]] = field(default_factory=list)
    #: the byte ranges being punched now (the daemon's own events on them are allowed)
    punching: tuple[tuple[int, int], ...] = ()
    #: answers from the bitmap being decided or written, by epoch (``begin_allow``)
    _allows: Counter[int] = field(default_factory=Counter)
    _epoch: int = 0

    def begin_allow(self) -> int:
        """Called by the reader thread *before* it looks a range up in the bitmap; the
        epoch it returns goes back to :meth:`end_allow` once the answer is written."""
        with self._cond:
            self._allows[self._epoch] += 1
            return self._epoch

    def end_allow(self, epoch: int) -> None:
        with self._cond:
            self._allows[epoch] -= 1
            if not self._allows[epoch]:
                del self._allows[epoch]
                self._cond.notify_all()

    def wait_allows(self, timeout: float) -> bool:
        """Wait until every answer from the bitmap that began before this call has
        been written (later ones saw the cleared bits). False on timeout."""
        with self._cond:
            before = self._epoch
            self._epoch += 1
            return self._cond.wait_for(lambda: not any(e <= before for e in self._allows), timeout)

    def enter_fill(self, resume: Callable[[], None]) -> bool:
        """True: go ahead (call :meth:`exit_fill` after). False: a trim runs, the fill
        is parked and ``resume`` is called when it ends."""
        with self._cond:
            if self.trimming:
                self.parked.append(resume)
                return False
            self.active_fills += 1
            return True

    def exit_fill(self) -> None:
        with self._cond:
            self.active_fills -= 1
            self._cond.notify_all()

    def begin_trim(self, timeout: float) -> bool:
        """Stop new fills, wait for running ones; False (nothing changed) if they did
        not finish within ``timeout`` or another trim runs."""
        with self._cond:
            if self.trimming:
                return False
            self.trimming = True
            if not self._cond.wait_for(lambda: self.active_fills == 0, timeout):
                self.trimming = False
                parked, self.parked = self.parked, []
            else:
                return True
        for resume in parked:
            resume()
        return False

    def end_trim(self) -> None:
        with self._cond:
            self.trimming = False
            self.punching = ()
            parked, self.parked = self.parked, []
        for resume in parked:
            resume()

    def set_punching(self, ranges: tuple[tuple[int, int], ...]) -> None:
        with self._cond:
            self.punching = ranges

    def own_punch(self, offset: int, length: int) -> bool:
        """Whether ``[offset, offset+length)`` lies inside a range being punched."""
        with self._cond:
            return any(start <= offset and offset + length <= end for start, end in self.punching)


@dataclass(frozen=True)
class TrimTarget:
    """What the trimmer needs of a served blob (the frontend's ``ServedBlob``)."""

    path: Path
    presence: BlobPresence
    guard: TrimGuard
    blob_size: int
    #: remove the blob's ignore mark if it has one (before any bit is cleared)
    unsilence: Callable[[], None]


def trim_served(
    store: PresenceStore,
    target: TrimTarget,
    need_bytes: int,
    *,
    settle: float = SETTLE_SECONDS,
    fill_wait: float = 30.0,
    keep_head_bytes: int = KEEP_HEAD_BYTES,
) -> tuple[Outcome, int]:
    """Give back about ``need_bytes`` of a mounted blob's tail chunks (the head that
    every mount reads stays): ``(TRIMMED, bytes freed)``, ``(BUSY, 0)`` if its fills
    did not finish within ``fill_wait``, ``(UNTRIMMABLE, 0)`` with nothing to give."""
    presence = target.presence
    geo = presence.geometry
    guard = target.guard
    if not guard.begin_trim(fill_wait):
        return Outcome.BUSY, 0
    try:
        with presence.lock:
            present = presence.bitmap.present_runs(0, geo.nchunks)
            trusted = presence.trusted
        runs = chunks_to_trim(
            present,
            geo.blob_size,
            geo.chunk_size,
            need_bytes,
            keep_head_chunks(geo.chunk_size, keep_head_bytes),
        )
        if not runs or not trusted:
            return Outcome.UNTRIMMABLE, 0
        target.unsilence()
        store.clear_runs(presence, runs)  # durable before any byte goes
        # answers decided from the bits before they went are written by now ...
        if not guard.wait_allows(fill_wait):
            return Outcome.BUSY, 0  # (the bits lag the bytes: a refetch, never zeros)
        # ... and the reads they let go have reached the page cache
        time.sleep(settle)
        guard.set_punching(tuple((f * geo.chunk_size, (f + c) * geo.chunk_size) for f, c in runs))
        try:
            freed = punch_runs(target.path, runs, geo.chunk_size)
        except OSError as exc:
            # the bits are gone already: at worst a refetch, never wrong bytes
            log.warning("fanotify.trim_failed", file=str(target.path), error=str(exc))
            return Outcome.UNTRIMMABLE, 0
    finally:
        guard.end_trim()
    log.info(
        "fanotify.trimmed",
        file=str(target.path),
        chunks=sum(c for _f, c in runs),
        freed=freed,
        present=presence.bitmap.count(),
    )
    return (Outcome.TRIMMED, freed) if freed > 0 else (Outcome.UNTRIMMABLE, 0)

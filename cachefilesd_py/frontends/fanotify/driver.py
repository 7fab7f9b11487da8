"""The fanotify frontend: serves EROFS file-backed mounts of sparse cache files.

The driver does I/O and nothing else; what an event means and how it is answered is
the session's business (``session.py``, sans-IO). It owns one pre-content group
(``kernel.fanotify.pre_content_group``: ``FAN_UNLIMITED_QUEUE``, so a full queue never
lets a read through), and

- the **reader** thread polls the group and reads whole events; each ``read()`` goes to
  the session with ``identify`` (``fstat`` of the event's fd: which cache file it is),
  and the session's actions are carried out at once. An event whose range is present
  by the daemon's bitmap is answered in this thread, without a fill: every backing
  read raises an event, present or not, so this path is a bitmap lookup and one
  ``write()``;
- a missing range goes to the **fill** scheduler (a lane per origin, so one stalled
  origin cannot hold every worker): the engine fills it through the event's own fd
  (``EventFdSink``: writes through that fd raise no event), exactly as on-demand READs
  are filled (same chunks, in-flight table, presence bits after the data), then the
  event is allowed; a failed fill is denied with ``FAN_DENY_ERRNO(EIO)`` (plain
  ``FAN_DENY``, EPERM, on a kernel that does not take it; EROFS reports EIO to its
  reader either way). Never allowed unfilled.
- a blob whose every chunk is present gets an ignore mark (``images.silence``): the
  kernel stops asking for it;
- a blob a mount reads is never trimmed while mounted (``space.py`` says why), so an
  answer from the bitmap stays true until the reader has its bytes;
- each answer is written, then the event's fd closed (``OwnedFd``), in that order: the
  kernel matches answers by fd number, and a number closed first could be handed to
  the next event.

The reader stops reading while the fill scheduler is full; unread events wait in the
kernel's queue (unbounded), so memory stays bounded. There is no shedding: an event
read is answered after its fill, however long the origin takes (its ``fetch_timeout``
bounds that).

Lock order: the session's lock, the scheduler's condition and the stats lock are
leaves, never held while calling out; fills take ``Blob.lock`` and the presence locks
inside the engine. No lock is held while writing to the group.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from cachefilesd_py.engine.latency import LatencyHistogram
from cachefilesd_py.engine.schedule import LaneScheduler
from cachefilesd_py.engine.service import Engine
from cachefilesd_py.errors import CachefilesdError
from cachefilesd_py.frontends.fanotify import session as sess
from cachefilesd_py.frontends.fanotify import wire
from cachefilesd_py.frontends.fanotify.images import ServedBlob, silence
from cachefilesd_py.frontends.fanotify.inflight import InflightJournal
from cachefilesd_py.kernel import fanotify
from cachefilesd_py.kernel.dio import AlignedBuffer
from cachefilesd_py.kernel.fd import OwnedFd
from cachefilesd_py.sources.policy import Deadline

log = structlog.get_logger("fanotify")


class EventFdSink:
    """Writes fetched runs into the cache file through an event's fd (opened by the
    kernel without notifications: the write raises no event of its own)."""

    def __init__(self, fd: OwnedFd, size: int) -> None:
        self._fd = fd
        self._size = size

    def write(self, offset: int, buf: AlignedBuffer, length: int) -> None:
        length = min(length, self._size - offset)
        view = memoryview(buf.view)[:length]
        done = 0
        with self._fd.borrow() as fd:
            while done < length:
                n = os.pwrite(fd, view[done:], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"short write into the cache file at {offset + done}")
                done += n

    def has_hole(self, offset: int, length: int) -> bool:
        with self._fd.borrow() as fd:
            try:
                if os.lseek(fd, offset, os.SEEK_DATA) != offset:
                    return True
                return os.lseek(fd, offset, os.SEEK_HOLE) < offset + length
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return True
                raise


def deny_errno_of(group_fd: int) -> int:
    """EIO if the kernel takes ``FAN_DENY_ERRNO(EIO)`` (6.14+), else EPERM."""
    try:
        if fanotify.accepts_response(group_fd, wire.deny_errno_probe(errno.EIO)):
            return errno.EIO
    except OSError as exc:
        log.warning("fanotify.deny_errno_probe_failed", error=str(exc))
    return errno.EPERM


@dataclass
class DriverStats:
    responses_failed: int = 0
    fills_failed: int = 0
    read_pauses: int = 0
    #: blobs that got an ignore mark (every chunk present: no more events)
    silenced: int = 0


class FanotifyDriver:
    """Reads the group's events and answers every one of them."""

    def __init__(
        self,
        group: OwnedFd,
        engine: Engine,
        *,
        workers: int = 8,
        fetch_timeout: float = 30.0,
        capacity: int = 1024,
        silence_complete: bool = True,
        journal: InflightJournal | None = None,
    ) -> None:
        self.group = group
        #: where events are read into, so a successor can answer what this process
        #: read and did not answer (``inflight.py``); None: plain reads
        self.journal = journal
        #: give a blob whose every chunk is present an ignore mark (off: benchmarks of
        #: the event path)
        self.silence_complete = silence_complete
        self.engine = engine
        self.fetch_timeout = fetch_timeout
        self.deny_errno = deny_errno_of(group.fileno())
        self.session: sess.Session[ServedBlob] = sess.Session(_present, deny_errno=self.deny_errno)
        self.fills = LaneScheduler("fanotify-fill", workers=workers, capacity=capacity)
        self.stats = DriverStats()
        self._stats_lock = threading.Lock()
        #: seconds from reading an event to answering it, by path
        self.present_times = LatencyHistogram()
        self.fill_times = LatencyHistogram()
        #: event fds of fills in flight, owned here until their answer is written
        self._fill_fds: dict[int, OwnedFd] = {}
        self._fds_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: told of every miss (the cull policy's "touch"), from the reader thread
        self.on_miss: Callable[[ServedBlob], None] = lambda _served: None

    # -- the loop --------------------------------------------------------------------

    def start(self) -> None:
        """Serve events in a reader thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self.serve, name="fanotify-reader", daemon=True)
        self._thread.start()

    def serve(self, poll_interval: float = 0.5) -> None:
        poller = select.poll()
        poller.register(self.group.fileno(), select.POLLIN)
        while not self._stop.is_set():
            if not self.fills.has_room():
                with self._stats_lock:
                    self.stats.read_pauses += 1
                self.fills.wait_room(poll_interval)
                continue
            if self.journal is not None and not self.journal.has_room():
                with self._stats_lock:
                    self.stats.read_pauses += 1
                self._stop.wait(0.01)
                continue
            if poller.poll(int(poll_interval * 1000)):
                self.drain()

    def drain(self) -> int:
        """Read and answer events until the group has none or the fill scheduler is full."""
        handled = 0
        journal = self.journal
        while self.fills.has_room():
            slot = None
            try:
                if journal is None:
                    raw = fanotify.read_events(self.group.fileno())
                else:
                    got = journal.read(self.group.fileno())
                    if got is None:  # every slot holds events being filled
                        return handled
                    slot, raw = got
            except OSError as exc:
                # EMFILE/ENFILE: the kernel could not install the event's fd and has
                # denied the access itself (docs/protocol-fanotify.md, trap 10)
                log.error("fanotify.read_failed", errno=exc.errno, error=str(exc))
                return handled
            if not raw:
                return handled
            received = time.monotonic()
            handled += 1
            self.run(self.session.receive(raw, _identify), received)
            if journal is not None and slot is not None:
                with self._fds_lock:
                    filling = set(self._fill_fds)
                journal.settle(slot, filling)
        return handled

    def stop(self) -> None:
        """Stop reading, then finish every fill in flight (each gets its answer)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.fills.shutdown(wait=True)

    # -- carrying out actions --------------------------------------------------------

    def run(self, actions: list[sess.Action[ServedBlob]], received: float) -> None:
        for action in actions:
            if isinstance(action, sess.Answer):
                self._answer(action)
                if action.reason is sess.Reason.PRESENT:
                    self.present_times.record(time.monotonic() - received)
            elif isinstance(action, sess.Fill):
                self._submit_fill(action, received)
            elif isinstance(action, sess.CloseFd):
                if self.journal is not None:
                    self.journal.done(action.fd)
                OwnedFd(action.fd).close()
            else:
                getattr(log, action.level)(action.event, **dict(action.fields))

    def _answer(self, answer: sess.Answer) -> None:
        """Write the answer, then close the fd (never the other way round)."""
        with self._fds_lock:
            owned = self._fill_fds.pop(answer.fd, None)
        if owned is None:
            owned = OwnedFd(answer.fd)
        try:
            record = wire.allow(answer.fd) if answer.allow else wire.deny(answer.fd, answer.err)
            try:
                fanotify.write_response(self.group.fileno(), record)
            except OSError as exc:
                if answer.allow or exc.errno != errno.EINVAL or answer.err == errno.EPERM:
                    raise
                # the kernel refused the errno: the event is still pending, deny plainly
                fanotify.write_response(self.group.fileno(), wire.deny(answer.fd))
        except OSError as exc:
            with self._stats_lock:
                self.stats.responses_failed += 1
            log.error(
                "fanotify.response_failed",
                fd=answer.fd,
                allow=answer.allow,
                errno=exc.errno,
                error=str(exc),
            )
        finally:
            if self.journal is not None:  # answered (or failed for good): not an orphan
                self.journal.done(answer.fd)
            owned.close()
        if not answer.allow:
            log.warning(
                "fanotify.denied", fd=answer.fd, reason=answer.reason.value, errno=answer.err
            )

    def _submit_fill(self, fill: sess.Fill[ServedBlob], received: float) -> None:
        owned = OwnedFd(fill.fd)
        with self._fds_lock:
            self._fill_fds[fill.fd] = owned
        self.on_miss(fill.image)
        self.fills.submit(fill.image.origin, lambda: self._fill(fill, owned, received))

    def _fill(self, fill: sess.Fill[ServedBlob], owned: OwnedFd, received: float) -> None:
        if self._fill_range(fill, owned, received):
            self.maybe_silence(fill.image)

    def _fill_range(self, fill: sess.Fill[ServedBlob], owned: OwnedFd, received: float) -> bool:
        ok = False
        try:
            blob = fill.image.blob
            self.engine.ensure(
                blob,
                fill.offset,
                fill.length,
                EventFdSink(owned, blob.size),
                Deadline.after(self.fetch_timeout),
            )
            ok = True
        except (CachefilesdError, OSError) as exc:
            with self._stats_lock:
                self.stats.fills_failed += 1
            log.warning(
                "fanotify.fill_failed",
                blob=str(fill.image.key),
                offset=fill.offset,
                length=fill.length,
                pid=fill.pid,
                error=str(exc),
                reason=getattr(exc, "reason", None),
            )
        except BaseException:
            log.exception("fanotify.fill_crashed", blob=str(fill.image.key))
            raise
        finally:
            # whatever happened, the event gets its answer (deny unless filled)
            self.run(self.session.filled(fill.ticket, ok), received)
            self.fill_times.record(time.monotonic() - received)
        return ok

    def maybe_silence(self, served: ServedBlob) -> None:
        """An ignore mark for a blob whose every chunk is present (counted)."""
        if not self.silence_complete:
            return
        try:
            if silence(self.group.fileno(), served):
                with self._stats_lock:
                    self.stats.silenced += 1
        except OSError as exc:  # the events keep coming: still correct, only slower
            log.warning("fanotify.silence_failed", blob=str(served.key), error=str(exc))

    # -- stats -----------------------------------------------------------------------

    def held_fds(self) -> int:
        """Event fds of fills in flight (each closed right after its answer)."""
        with self._fds_lock:
            return len(self._fill_fds)

    def stats_fields(self) -> dict[str, Any]:
        with self._stats_lock:
            fields: dict[str, Any] = dict(vars(self.stats))
        fields.update(vars(self.session.counts()))
        fields.update(self.present_times.summary_ms("present"))
        fields.update(self.fill_times.summary_ms("fill"))
        with contextlib.suppress(OSError):
            fields["queued_bytes"] = fanotify.queued_bytes(self.group.fileno())
        return fields


def _identify(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _present(served: ServedBlob, offset: int, length: int) -> bool:
    """Whether every chunk of the range is present by the daemon's bitmap (in memory:
    a bit is set only after its chunk's bytes were written)."""
    blob = served.blob
    presence = blob.presence
    if presence is None:
        return False
    first, last = blob.geometry.chunks_for(offset, length)
    return not presence.missing_runs(first, last)

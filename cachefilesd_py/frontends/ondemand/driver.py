"""The on-demand frontend: serves ``/dev/cachefiles`` bound with ``bind ondemand``.

The driver does I/O and nothing else. What a kernel message means and what must
follow from it is the session's business (``session.py``, sans-IO); the driver reads
the device, hands each message to the session and carries out the actions it returns:

- it reads while there is room for more work: ``read()`` returns **one whole message
  or 0 bytes**, never blocks, never EAGAIN (``docs/protocol-ondemand.md`` §2.1), so it
  polls for POLLIN and drains until 0. Before 6.8 POLLIN stays raised while any
  request is outstanding, even ones already read: spurious wake-ups cost one empty
  read (§2.7);
- it adopts the fd of every OPEN the moment the session sees it (``OwnedFd``: FD_CLOEXEC
  at once, closed exactly once, never under a borrower, §2.3 and §3.3);
- OPEN work (the blob's source identity, its presence, an unvouched file discarded,
  ``opener.py``) runs in its own small scheduler, so an OPEN never waits behind fills;
  READ fills run in another; both are :class:`~cachefilesd_py.engine.schedule.LaneScheduler`
  with one lane per origin, so a stalled origin cannot hold every worker;
- a READ is completed with ``CACHEFILES_IOC_READ_COMPLETE`` on an fd of its object
  (6.10 rule), **always**, success or failure (§3.2); its fill gets ``fetch_timeout``
  from the moment a worker takes it up;
- releases after CLOSE (presence saved and bound once the kernel has committed the
  file, ``commit.py``) run in a third, tiny scheduler, never behind fills;
- read-ahead runs in a fourth, for READs that continue a sequential stream; it is
  dropped, never queued, when that scheduler is full.

**Bounded work.** The driver stops reading the device while its OPEN or READ
scheduler holds ``capacity`` items: the kernel keeps the rest queued, and the memory
the daemon spends on requests stays bounded (the fill buffers are a fixed pool,
``kernel/dio.BufferPool``). CLOSE needs no worker (the session handles it in the
reader, its release goes to its own scheduler), and room comes back within about one
``fetch_timeout``: from a pause until the READ scheduler is down to half its capacity,
a READ that has already waited that long is completed at once without fetching (its
reader gets EIO, as it would after a failed fetch). So under a flood a CLOSE waits
about that long at most and umount never stalls; without a flood nothing is shed.

Space: a :class:`~cachefilesd_py.frontends.ondemand.space.SpaceWatcher` culls on
POLLOUT (asked for only while no pass runs) and on ENOBUFS from fills.

Lock order: ``Session._lock``, ``LaneScheduler._cond``, the stats lock and
``_releasing`` (a condition) are leaves,
never held while calling out; fills take ``Blob.lock`` and the presence locks inside
the engine (``engine/blob.py``); the culler's locks are its own (``engine/cull.py``).
No lock is held while the driver writes to the device.
"""

from __future__ import annotations

import errno
import functools
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.engine.cull import BlobCuller
from cachefilesd_py.engine.latency import LatencyHistogram
from cachefilesd_py.engine.offline import HeldReads, OfflineError
from cachefilesd_py.engine.offline_policy import FailNow, WaitUntil
from cachefilesd_py.engine.schedule import LaneScheduler
from cachefilesd_py.engine.service import Engine
from cachefilesd_py.errors import CachefilesdError, error_kind
from cachefilesd_py.frontends.ondemand import session as sess
from cachefilesd_py.frontends.ondemand.commit import wait_commit
from cachefilesd_py.frontends.ondemand.objects import AnonFdSink, OnDemandObject
from cachefilesd_py.frontends.ondemand.opener import Opener
from cachefilesd_py.frontends.ondemand.space import SpaceWatcher
from cachefilesd_py.kernel import commands
from cachefilesd_py.kernel.device import Device
from cachefilesd_py.kernel.fd import ClosedFdError, OwnedFd
from cachefilesd_py.sources.policy import Deadline

log = structlog.get_logger("ondemand")

Action = sess.Action[OwnedFd, OnDemandObject]


@dataclass
class DriverStats:
    opens: int = 0
    opens_refused: int = 0
    reads: int = 0
    reads_failed: int = 0
    closes: int = 0
    malformed: int = 0
    unvouched_discarded: int = 0
    #: READs dropped unfilled: they waited a whole fetch_timeout while the queue was full
    reads_expired: int = 0
    #: times the reader stopped reading because its queues were full
    read_pauses: int = 0
    #: READs held by the ``wait`` offline policy (each counted once)
    reads_held: int = 0
    #: READs failed at once because their source was offline (the policy said so)
    reads_offline_failed: int = 0


class OnDemandDriver:
    """Reads kernel requests and answers every one of them."""

    def __init__(
        self,
        device: Device,
        engine: Engine,
        cache_dir: Path,
        *,
        workers: int = 8,
        open_workers: int = 4,
        readahead_workers: int = 4,
        fetch_timeout: float = 30.0,
        culler: BlobCuller | None = None,
        capacity: int = 1024,
    ) -> None:
        self.device = device
        self.engine = engine
        self.cache_dir = cache_dir
        self.fetch_timeout = fetch_timeout
        self.culler = culler
        self.stats = DriverStats()
        self._stats_lock = threading.Lock()
        #: seconds from reading a READ off the device to completing it (queueing,
        #: waits for other fills and the fetch included)
        self.read_times = LatencyHistogram()
        self.session: sess.Session[OwnedFd, OnDemandObject] = sess.Session()
        self.opens = LaneScheduler("open", workers=open_workers, capacity=max(16, capacity // 4))
        self.reads = LaneScheduler("fill", workers=workers, capacity=capacity)
        self.finishes = LaneScheduler("finish", workers=2, per_lane=2, capacity=1 << 30)
        self.readaheads = LaneScheduler(
            "readahead", workers=readahead_workers, capacity=4 * readahead_workers
        )
        self.space: SpaceWatcher | None = None
        self.opener = Opener(self)
        #: set when the reader paused for room, cleared when the READ scheduler is
        #: down to half its capacity: while set, long-waiting READs are shed
        self._overflow = False
        #: liveness, for the supervisor's watchdog (daemon/health.py): when the request
        #: loop last went round, and since when each READ taken off the device has been
        #: in service (queued or filling), by msg id
        self.last_loop = time.monotonic()
        self._in_service: dict[int, float] = {}
        self._in_service_lock = threading.Lock()
        #: releases queued or running, per blob key: an OPEN of that key waits for them
        #: (``wait_released``), so it never shares the blob of an object the kernel has
        #: already closed, and learns the source's identity afresh
        self._releasing: dict[BlobKey, int] = {}
        self._released = threading.Condition()
        #: READs the ``wait`` offline policy holds (``engine/offline.py``): no worker
        #: is spent on them; they come back to the READ scheduler when their source
        #: changes state or at their cap
        self.held = HeldReads()
        #: called once per held READ: (blob key, offset, length, cap in seconds)
        self.on_read_waiting: Callable[[BlobKey, int, int, float], None] | None = None
        self._stopping = False

    # -- start-up --------------------------------------------------------------------

    def bind(self, setup: list[bytes]) -> None:
        """Send the configuration commands, one per write, then ``bind ondemand``."""
        for cmd in setup:
            self.device.write_command(cmd)
        self.device.write_command(commands.encode_bind(ondemand=True))
        log.info("bound", mode="ondemand", cache_dir=str(self.cache_dir))

    def restore(self) -> None:
        """Ask a (6.8+) kernel to deliver again every request a previous daemon read."""
        self.device.write_command(commands.encode_restore())

    # -- the loop --------------------------------------------------------------------

    def serve(self, stop: threading.Event, poll_interval: float = 0.5) -> None:
        """Poll for requests (POLLIN) while there is room for more work and, when
        culling is on, for space pressure (POLLOUT, level-triggered while below
        *cull*: asked for only while no cull pass runs or backs off)."""
        if self.culler is not None and self.space is None:
            self.space = SpaceWatcher(self.culler)
        if self.space is not None:
            self.space.start(stop)
        poller = select.poll()
        fd = self.device.fileno()
        watching_out = False
        poller.register(fd, select.POLLIN)
        self.last_loop = time.monotonic()  # a spare built long ago starts afresh
        try:
            while not stop.is_set():
                self.last_loop = time.monotonic()
                if not self._has_room():
                    self._wait_room(stop, poll_interval)
                    continue
                want_out = self.space is not None and self.space.idle.is_set()
                if want_out != watching_out:
                    poller.register(fd, select.POLLIN | (select.POLLOUT if want_out else 0))
                    watching_out = want_out
                for _fd, ev in poller.poll(int(poll_interval * 1000)):
                    if ev & select.POLLOUT and self.space is not None:
                        self.space.kick("pollout")
                        watching_out = False
                        poller.register(fd, select.POLLIN)
                    if ev & select.POLLIN:
                        self.drain()
        finally:
            if self.space is not None:
                self.space.stop()

    @property
    def culling(self) -> bool:
        """Whether a cull pass is running (or asked for)."""
        return self.space is not None and not self.space.idle.is_set()

    def oldest_read_age(self) -> float | None:
        """Seconds the oldest READ now in service has been, or None."""
        with self._in_service_lock:
            oldest = min(self._in_service.values(), default=None)
        return None if oldest is None else time.monotonic() - oldest

    def _has_room(self) -> bool:
        return self.reads.has_room() and self.opens.has_room()

    def _wait_room(self, stop: threading.Event, poll_interval: float) -> None:
        self._overflow = True
        with self._stats_lock:
            self.stats.read_pauses += 1
        log.info("device.paused", reads=self.reads.held, opens=self.opens.held)
        end = time.monotonic() + poll_interval
        while not stop.is_set() and time.monotonic() < end and not self._has_room():
            self.reads.wait_room(0.05)
            self.opens.wait_room(0.05)

    def drain(self) -> int:
        """Read and dispatch messages until the kernel has none pending or the
        schedulers are full."""
        handled = 0
        if self._overflow and self.reads.held <= self.reads.capacity // 2:
            self._overflow = False
        while self._has_room():
            try:
                buf = self.device.read_message()
            except OSError as exc:
                # EMSGSIZE cannot happen with our buffer; fd-allocation errors fail the
                # OPEN inside the kernel already; EEXIST (6.10) likewise.
                log.error("device.read_failed", errno=exc.errno, error=str(exc))
                return handled
            if not buf:
                return handled
            handled += 1
            self.dispatch(buf)
            # reading is the loop's progress: under a steady stream of requests this
            # loop may not return to poll() for a long time, and the supervisor must
            # not take that for a stuck reader (daemon/health.py)
            self.last_loop = time.monotonic()
        return handled

    def dispatch(self, raw: bytes) -> None:
        """One message from the device: to the session, and its actions carried out."""
        received = time.monotonic()
        self.run(self.session.receive(raw, self._adopt), received)

    def _adopt(self, fd: int) -> OwnedFd:
        return OwnedFd(fd, closer=self.device.close_fd)

    # -- carrying out actions --------------------------------------------------------

    def run(self, actions: list[Action], received: float | None = None) -> None:
        for action in actions:
            if isinstance(action, sess.ServeRead):
                self._on_read(action, received if received is not None else time.monotonic())
            elif isinstance(action, sess.OpenObject):
                self._count("opens")
                self.opener.submit(action)
            elif isinstance(action, sess.Copen):
                self._copen(action)
            elif isinstance(action, sess.CloseFd):
                action.fd.close()
            elif isinstance(action, sess.Release):
                key = action.handle.blob.key
                with self._released:
                    self._releasing[key] = self._releasing.get(key, 0) + 1
                self.finishes.submit("finish", functools.partial(self._release, action))
            else:
                self._report(action)

    def _report(self, report: sess.Report) -> None:
        fields = dict(report.fields)
        if report.event == "kernel.malformed_message":
            self._count("malformed")
        elif report.event == "read.unknown_object":
            self._count("reads")
            self._count("reads_failed")
        elif report.event == "close":
            self._count("closes")
        getattr(log, report.level)(report.event, **fields)

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def _copen(self, action: sess.Copen) -> None:
        try:
            self.device.write_command(commands.encode_copen(action.msg_id, action.value))
        except OSError as exc:
            # EINVAL: the OPEN is gone (cache dead, object dropped, duplicate after restore)
            log.warning("copen.failed", msg_id=action.msg_id, errno=exc.errno, error=str(exc))
            self.run(self.session.copen_failed(action.ticket))
            return
        self.session.copen_written(action.ticket)
        if action.key is not None and self.culler is not None:
            self.culler.opened(action.key, action.value)

    # -- READ ------------------------------------------------------------------------

    def _on_read(self, action: sess.ServeRead[OwnedFd, OnDemandObject], received: float) -> None:
        self._count("reads")
        with self._in_service_lock:
            self._in_service[action.msg_id] = received
        obj = action.handle
        if not action.fill or obj is None:
            self._serve(action, received, False)
            return
        if self.culler is not None:
            self.culler.missed(obj.blob.key)
        self.reads.submit(obj.origin, lambda: self._serve(action, received, True))

    def _shed(self, received: float) -> bool:
        """Whether a READ taken up now is dropped unfilled: only in an overflow (from
        a pause of the reader until the READ scheduler is down to half its capacity)
        and only if the READ has waited a whole ``fetch_timeout`` already."""
        return self._overflow and time.monotonic() - received > self.fetch_timeout

    def _serve(
        self,
        action: sess.ServeRead[OwnedFd, OnDemandObject],
        received: float,
        fill: bool,
        waited: float = 0.0,
    ) -> None:
        """Fill (when the session asks for it, and unless the READ is shed), then
        complete the READ on its object's fd whatever happened, then tell the
        session. A READ the offline policy holds is not completed here: it comes back
        later (``waited`` seconds held so far) and is completed then."""
        obj = action.handle
        ok = False
        held = False
        try:
            if not fill or obj is None:
                self._count("reads_failed")
                log.warning(
                    "read.not_filled",
                    blob=str(obj.blob.key) if obj is not None else None,
                    offset=action.offset,
                    length=action.length,
                    msg_id=action.msg_id,
                    object_id=action.object_id,
                    reason=action.why_not,
                )
            elif waited == 0.0 and self._shed(received):
                self._count("reads_failed")
                self._count("reads_expired")
                log.warning(
                    "read.shed",
                    blob=str(obj.blob.key),
                    offset=action.offset,
                    length=action.length,
                    waited=round(time.monotonic() - received, 1),
                    reason="waited a whole fetch_timeout in a full queue",
                )
            else:
                outcome = self._fill_online(obj, action, received, waited)
                held = outcome is None
                ok = outcome is True
        finally:
            if not held:  # a held READ is completed when it comes back
                self._complete(action)
                with self._in_service_lock:
                    self._in_service.pop(action.msg_id, None)
                self.read_times.record(time.monotonic() - received)
                self.run(self.session.served(action.ticket))
        if ok and obj is not None:
            self._plan_readahead(obj, action.offset, action.length)

    def _fill_online(
        self,
        obj: OnDemandObject,
        action: sess.ServeRead[OwnedFd, OnDemandObject],
        received: float,
        waited: float,
    ) -> bool | None:
        """Fill, unless the offline policy says otherwise (``engine/offline.py``): True
        when filled, False when failed, None when held (answered later)."""
        blob, offset, length = obj.blob, action.offset, action.length
        gate = self.engine.gate
        if gate.watches(blob.source.origin) and blob.missing(offset, length):
            decision = self.engine.gate.decide(blob, offset, length, waited)
            if isinstance(decision, WaitUntil) and not self._stopping:
                self._hold(action, received, waited, decision)
                return None
            if isinstance(decision, WaitUntil | FailNow):
                reason = "daemon stopping" if self._stopping else decision.reason
                self._count("reads_failed")
                self._count("reads_offline_failed")
                log.warning(
                    "read.offline",
                    blob=str(blob.key),
                    offset=offset,
                    length=length,
                    waited=round(waited, 1),
                    reason=reason,
                )
                return False
        try:
            self.engine.ensure(blob, offset, length, obj.sink, Deadline.after(self.fetch_timeout))
            return True
        except OfflineError as exc:
            # the source went offline between the decision and the fetch: ask again
            decision = self.engine.gate.decide(blob, offset, length, waited)
            if isinstance(decision, WaitUntil) and not self._stopping:
                self._hold(action, received, waited, decision)
                return None
            return self._failed(obj, action, exc)
        except (CachefilesdError, OSError) as exc:
            return self._failed(obj, action, exc)

    def _hold(
        self,
        action: sess.ServeRead[OwnedFd, OnDemandObject],
        received: float,
        waited: float,
        decision: WaitUntil,
    ) -> None:
        """Park a READ until its source changes state or its cap (no worker waits)."""
        obj = action.handle
        assert obj is not None
        if waited == 0.0:  # announced once per READ
            self._count("reads_held")
            cap = self.engine.gate.policy_for(obj.blob.key).wait_cap
            log.warning(
                "read.waiting_for_network",
                blob=str(obj.blob.key),
                offset=action.offset,
                length=action.length,
                cap=cap,
                reason=decision.reason,
            )
            if self.on_read_waiting is not None:
                self.on_read_waiting(obj.blob.key, action.offset, action.length, cap)
        with self._in_service_lock:  # held is not stuck: the watchdog must not see it
            self._in_service.pop(action.msg_id, None)
        since = time.monotonic()

        def resume() -> None:
            more = waited + (time.monotonic() - since)
            with self._in_service_lock:
                self._in_service[action.msg_id] = time.monotonic()
            self.reads.submit(obj.origin, lambda: self._serve(action, received, True, more))

        self.held.hold(obj.origin, decision.deadline, resume)

    def source_changed(self, origin: str) -> None:
        """A source went online or offline: held READs of it ask again."""
        self.held.source_changed(origin)

    def policy_changed(self) -> None:
        """The offline policy was switched: every held READ asks again."""
        self.held.wake_all()

    def _failed(
        self,
        obj: OnDemandObject,
        action: sess.ServeRead[OwnedFd, OnDemandObject],
        exc: CachefilesdError | OSError,
    ) -> bool:
        self._count("reads_failed")
        if isinstance(exc, OSError) and exc.errno == errno.ENOBUFS and self.space is not None:
            self.space.kick("enobufs")
        log.warning(
            "read.failed",
            blob=str(obj.blob.key),
            offset=action.offset,
            length=action.length,
            error=str(exc),
            reason=getattr(exc, "reason", None)
            or errno.errorcode.get(getattr(exc, "errno", 0) or 0),
            kind=error_kind(exc),
        )
        return False

    def _complete(self, action: sess.ServeRead[OwnedFd, OnDemandObject]) -> None:
        try:
            with action.fd.borrow() as fd:
                self.device.read_complete(fd, action.msg_id)
        except ClosedFdError:  # cannot happen: the session closes no fd under a READ
            log.error("cread.fd_closed", msg_id=action.msg_id, object_id=action.object_id)
        except OSError as exc:
            log.warning("cread.failed", msg_id=action.msg_id, errno=exc.errno, error=str(exc))

    def _plan_readahead(self, obj: OnDemandObject, offset: int, length: int) -> None:
        ahead = self.engine.plan_readahead(obj.blob, offset, length)
        if ahead is None:
            return
        if not self.readaheads.has_room():
            return  # read-ahead is a hint: dropped, never queued without bound
        self.readaheads.submit(obj.origin, lambda: self.engine.readahead(obj.blob, ahead, obj.sink))

    # -- CLOSE -----------------------------------------------------------------------

    def _release(self, action: sess.Release[OnDemandObject]) -> None:
        """The kernel is done with the object: save (and, after CLOSE, bind) its
        presence, then give back its use lease, so a trim never sees a sidecar being
        written."""
        obj = action.handle
        try:
            self.engine.release(
                obj.blob,
                committed=(
                    (lambda: wait_commit(obj.cache_path, obj.stale_ino)) if action.commit else None
                ),
            )
        finally:
            self.engine.leases.release_use(obj.blob.key)
            with self._released:
                left = self._releasing.get(obj.blob.key, 1) - 1
                if left > 0:
                    self._releasing[obj.blob.key] = left
                else:
                    self._releasing.pop(obj.blob.key, None)
                self._released.notify_all()

    def wait_released(self, key: BlobKey, timeout: float) -> bool:
        """Wait until no release of ``key`` is queued or running; False on timeout.

        The kernel holds at most one object per cookie: an OPEN of a key arrives only
        after the previous object of that key was closed, but its release (checkpoint,
        sidecar bound to the committed file) runs in the finish lane and may still be
        pending; an OPEN that did not wait would share that closed object's blob and its
        pinned, possibly outdated, identity."""
        with self._released:
            return self._released.wait_for(lambda: key not in self._releasing, timeout)

    # -- shutdown --------------------------------------------------------------------

    def objects(self) -> list[OnDemandObject]:
        return self.session.handles()

    def shutdown(self) -> None:
        """Finish in-flight work, persist presence, close every fd we own. The device
        itself is closed by its owner (closing it unbinds the cache)."""
        self._stopping = True
        self.held.close()  # held READs come back and fail: every READ is answered
        self.opens.shutdown(wait=True)
        self.reads.shutdown(wait=True)
        self.readaheads.shutdown(wait=True, cancel=True)
        self.finishes.shutdown(wait=True)
        self.run(self.session.close_all())
        self.engine.close()

    # -- for the opener --------------------------------------------------------------

    def sink_for(self, obj: OnDemandObject) -> AnonFdSink:
        return AnonFdSink(
            self.device, obj, self.space.make_room if self.space is not None else None
        )

    def count(self, name: str, n: int = 1) -> None:
        self._count(name, n)

    def stats_fields(self) -> dict[str, Any]:
        with self._stats_lock:
            return dict(vars(self.stats))

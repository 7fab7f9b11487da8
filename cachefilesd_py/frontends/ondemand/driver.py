"""The on-demand frontend: serves ``/dev/cachefiles`` bound with ``bind ondemand``.

How the kernel talks to us (details and sources: shared/reference/ondemand-protocol.md):

* ``read()`` on the device returns **one whole message or 0 bytes** (never EAGAIN, never
  blocks), so the loop polls for POLLIN and drains until 0. Before 6.8, POLLIN stays
  raised while any request is outstanding, even ones already read: spurious wake-ups
  are normal and cost one empty read (§2.9).
* **OPEN** (§2.3): reading it installs an anonymous fd in *this* process (without
  FD_CLOEXEC: it is wrapped in an :class:`OwnedFd` in the reader thread at once, so no
  child ever inherits it and ``/dev/cachefiles`` never stays busy). Every OPEN gets a
  ``copen <id>,<size>`` reply, or ``copen <id>,-errno`` to refuse it (the mount or
  lookup then fails cleanly); an OPEN left unanswered blocks a kernel worker for good.
  The size must be the same at every OPEN of a blob, or the kernel discards the cache
  file (§2.7).
* **READ** (§2.5): the kernel found a hole in ``[off, off+len)``. We fill whole chunks
  around it through the anonymous fd (direct I/O: page-aligned buffers, offsets and
  lengths, §2.6) and complete it with ``CACHEFILES_IOC_READ_COMPLETE`` on an fd of the
  same object (6.10 rule), **always**, success or failure: a READ completed without data
  gives the reader EIO, one never completed hangs it.
* **CLOSE** (§2.4): no reply; the object's fds are closed once no fill uses them any
  more (the fd holder defers the close), so a recycled fd number can never receive
  another blob's bytes (pitfall 6). A new blob's cache file is an unlinked tmpfile
  until the kernel commits it right after CLOSE; once it appears in the cache tree,
  the blob's presence sidecar is bound to it.

Threads: one reader (this loop) decodes messages and hands OPEN and READ to a pool of
workers, because answering them needs the network; the loop itself never blocks on the
network. Read-ahead runs in a second, smaller pool so it never delays demand reads.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from cachefilesd_py.engine.blob import Blob, BlobKey
from cachefilesd_py.engine.latency import LatencyHistogram
from cachefilesd_py.engine.service import Engine
from cachefilesd_py.errors import CachefilesdError, KernelProtocolError, SourceError
from cachefilesd_py.frontends.ondemand import wire
from cachefilesd_py.frontends.ondemand.space import OnDemandCuller
from cachefilesd_py.kernel import layout
from cachefilesd_py.kernel.device import Device
from cachefilesd_py.kernel.dio import AlignedBuffer, pwrite_direct
from cachefilesd_py.kernel.fd import ClosedFdError, OwnedFd
from cachefilesd_py.sources.policy import Deadline

log = structlog.get_logger("ondemand")

#: how long to wait for the kernel to link a new cache file after CLOSE
COMMIT_WAIT = 5.0
#: the kernel's coherency xattr on every cache file (object size, content type)
KERNEL_AUX_XATTR = "user.CacheFiles.cache"


@dataclass
class DriverStats:
    opens: int = 0
    opens_refused: int = 0
    reads: int = 0
    reads_failed: int = 0
    closes: int = 0
    malformed: int = 0
    unvouched_discarded: int = 0


def has_hole(fd: int, offset: int, length: int) -> bool:
    try:
        if os.lseek(fd, offset, os.SEEK_DATA) != offset:
            return True
        return os.lseek(fd, offset, os.SEEK_HOLE) < offset + length
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data at or after offset
            return True
        raise


class AnonFdSink:
    """Writes fetched runs into a cache file through the object's anonymous fd."""

    #: writes retried after asking the culler for room (ENOBUFS below *stop*)
    ROOM_ATTEMPTS = 4

    def __init__(
        self,
        device: Device,
        obj: OnDemandObject,
        make_room: Callable[[], bool] | None = None,
    ) -> None:
        self._device = device
        self._obj = obj
        self._make_room = make_room

    def write(self, offset: int, buf: AlignedBuffer, length: int) -> None:
        """ENOBUFS that outlives the short "object settling" retries means the cache
        is below *stop*: ask the culler for room, wait for its pass, write again (a
        few times: the kernel also counts blocks still being written, which drain)."""
        for attempt in range(self.ROOM_ATTEMPTS + 1):
            try:
                with self._obj.fd.borrow() as fd:
                    pwrite_direct(
                        self._device.pwrite,
                        fd,
                        buf,
                        length,
                        offset,
                        limit=self._obj.blob.size,
                        object_may_be_settling=True,
                    )
                return
            except OSError as exc:
                if (
                    exc.errno != errno.ENOBUFS
                    or attempt == self.ROOM_ATTEMPTS
                    or self._make_room is None
                    or not self._make_room()
                ):
                    raise

    def has_hole(self, offset: int, length: int) -> bool:
        """lseek on the anonymous fd is passed to the backing cache file."""
        with self._obj.fd.borrow() as fd:
            return has_hole(fd, offset, length)


@dataclass(eq=False)
class OnDemandObject:
    """One kernel cache object: its id, its anonymous fd, and the blob it serves."""

    object_id: int
    fd: OwnedFd
    blob: Blob
    cache_path: Path | None
    #: inode of a stale file at ``cache_path`` that the kernel will replace
    stale_ino: int | None = None
    sink: AnonFdSink = field(init=False)


class OnDemandDriver:
    """Reads kernel requests and answers every one of them."""

    def __init__(
        self,
        device: Device,
        engine: Engine,
        cache_dir: Path,
        *,
        workers: int = 8,
        readahead_workers: int = 4,
        fetch_timeout: float = 30.0,
        culler: OnDemandCuller | None = None,
    ) -> None:
        self.device = device
        self.culler = culler
        self._cull_kick = threading.Event()
        self._cull_idle = threading.Event()
        self._cull_idle.set()
        #: set when serving ends: nothing may wait for a cull pass after that
        self._stopping = threading.Event()
        self.engine = engine
        self.cache_dir = cache_dir
        self.fetch_timeout = fetch_timeout
        self.stats = DriverStats()
        #: seconds from reading a READ off the device to completing it (queueing,
        #: waits for other fills and the fetch included)
        self.read_times = LatencyHistogram()
        self._objects: dict[int, OnDemandObject] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fill")
        self._ra_pool = ThreadPoolExecutor(readahead_workers, thread_name_prefix="readahead")
        #: liveness, for the supervisor's watchdog (daemon/health.py): when the request
        #: loop last went round, and since when each READ being served is in service
        self.last_loop = time.monotonic()
        self._in_service: dict[int, float] = {}

    # -- start-up --------------------------------------------------------------------

    def bind(self, commands: list[bytes]) -> None:
        """Send the configuration commands, one per write, then ``bind ondemand``."""
        for cmd in commands:
            self.device.write_command(cmd)
        self.device.write_command(wire.encode_bind(ondemand=True))
        log.info("bound", mode="ondemand", cache_dir=str(self.cache_dir))

    def restore(self) -> None:
        """Ask a (6.8+) kernel to deliver again every request a previous daemon read."""
        self.device.write_command(wire.encode_restore())

    # -- the loop --------------------------------------------------------------------

    def serve(self, stop: threading.Event, poll_interval: float = 0.5) -> None:
        """Poll for requests (POLLIN) and, when culling is on, for space pressure
        (POLLOUT, level-triggered while below *cull*: it is only asked for while no
        cull pass is running or backing off, so a full disk cannot spin the loop)."""
        poller = select.poll()
        fd = self.device.fileno()
        space = None
        if self.culler is not None:
            space = threading.Thread(
                target=self._space_loop, args=(stop,), name="space", daemon=True
            )
            space.start()
        watching_out = False
        poller.register(fd, select.POLLIN)
        while not stop.is_set():
            self.last_loop = time.monotonic()
            want_out = self.culler is not None and self._cull_idle.is_set()
            if want_out != watching_out:
                poller.register(fd, select.POLLIN | (select.POLLOUT if want_out else 0))
                watching_out = want_out
            events = poller.poll(int(poll_interval * 1000))
            for _fd, ev in events:
                if ev & select.POLLOUT and self.culler is not None:
                    self.kick_cull("pollout")
                    watching_out = False
                    poller.register(fd, select.POLLIN)
                if ev & select.POLLIN:
                    self.drain()
        self._stopping.set()
        self._cull_kick.set()
        self._cull_idle.set()  # release fills waiting in make_room
        if space is not None:
            space.join(timeout=30)

    @property
    def culling(self) -> bool:
        """Whether a cull pass is running (or asked for)."""
        return not self._cull_idle.is_set()

    def oldest_read_age(self) -> float | None:
        """Seconds the oldest READ now being served has been in service, or None."""
        with self._lock:
            oldest = min(self._in_service.values(), default=None)
        return None if oldest is None else time.monotonic() - oldest

    def make_room(self, timeout: float = 10.0) -> bool:
        """Start a cull pass (or join the running one), wait for it to end, then pause
        briefly. False when the daemon is stopping (no pass will come) or the pass
        did not end in time. Called by fills that hit ENOBUFS."""
        if self._stopping.is_set():
            return False
        self.kick_cull("enobufs")
        if not self._cull_idle.wait(timeout) or self._stopping.is_set():
            return False
        self._stopping.wait(0.2)
        return not self._stopping.is_set()

    def kick_cull(self, why: str) -> None:
        if self.culler is not None and self._cull_idle.is_set():
            log.info("space.pressure", signal=why)
            self._cull_idle.clear()
            self._cull_kick.set()

    def _space_loop(
        self, stop: threading.Event, period: float = 30.0, backoff: float = 5.0
    ) -> None:
        assert self.culler is not None
        passes = 0
        while not stop.is_set():
            kicked = self._cull_kick.wait(period)
            self._cull_kick.clear()
            if stop.is_set():
                break
            try:
                outcome = self.culler.cull_pass()
                passes += 1
                if passes % 20 == 0:
                    self.culler.remove_orphan_sidecars()
            except Exception:
                log.exception("space.cull_failed")
                outcome = None
            if kicked and (outcome is None or (outcome.needed and outcome.acted == 0)):
                stop.wait(backoff)  # nothing cullable: do not spin on POLLOUT
            elif kicked and outcome is not None and outcome.acted == 0:
                # statvfs shows no shortage but the kernel signalled one (it also
                # counts blocks still being written): look again soon, not in 5 s
                stop.wait(0.5)
            self._cull_idle.set()

    def drain(self) -> int:
        """Read and dispatch messages until the kernel has none pending."""
        handled = 0
        while True:
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
            self._dispatch(buf)

    def _dispatch(self, buf: bytes) -> None:
        try:
            req = wire.decode(buf)
        except KernelProtocolError as exc:
            self.stats.malformed += 1
            log.error(
                "kernel.malformed_message", error=str(exc), length=len(buf), head=buf[:32].hex()
            )
            return
        if isinstance(req, wire.OpenRequest):
            # Own the fd before anything else can fail or fork.
            try:
                fd = OwnedFd(req.fd, closer=self.device.close_fd)
            except OSError as exc:
                log.error("open.bad_fd", msg_id=req.msg_id, fd=req.fd, error=str(exc))
                self._reply_copen(req.msg_id, -errno.EBADF)
                return
            self._pool.submit(self._guard, self._on_open, req, fd)
        elif isinstance(req, wire.ReadRequest):
            self._pool.submit(self._guard, self._on_read, req, time.monotonic())
        elif isinstance(req, wire.CloseRequest):
            self._on_close(req)

    def _guard(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except Exception:  # a bug must never kill a worker silently
            log.exception("worker.crashed", handler=getattr(fn, "__name__", str(fn)))

    # -- OPEN ------------------------------------------------------------------------

    def _on_open(self, req: wire.OpenRequest, fd: OwnedFd) -> None:
        """Take the blob's use lease (waiting out a trim of its cache file: the kernel
        cannot read the file before our ``copen``), then open it; the lease is given
        back when the object closes, or at once if the OPEN fails."""
        self.stats.opens += 1
        lease = (req.volume_key, req.cookie_key)
        if not self.engine.leases.acquire_use(lease, timeout=self.fetch_timeout):
            log.warning("open.lease_timeout", msg_id=req.msg_id)
            self._reply_copen(req.msg_id, -errno.EIO)
            fd.close()
            return
        opened = False
        try:
            opened = self._open_object(req, fd)
        finally:
            if not opened:
                self.engine.leases.release_use(lease)

    def _open_object(self, req: wire.OpenRequest, fd: OwnedFd) -> bool:
        """Answer the OPEN; True when the object is now served (and holds its lease)."""
        key = BlobKey(req.volume_key, req.cookie_key)
        try:
            cache_path: Path | None = layout.object_path(
                self.cache_dir, req.volume_key, req.cookie_key
            )
        except ValueError:
            cache_path = None
        try:
            blob = self.engine.open_blob(key, cache_path, Deadline.after(self.fetch_timeout))
        except SourceError as exc:
            self.stats.opens_refused += 1
            log.warning(
                "open.refused",
                blob=str(key),
                msg_id=req.msg_id,
                reason=exc.reason,
                error=str(exc),
                errno=exc.kernel_errno,
            )
            self._reply_copen(req.msg_id, -exc.kernel_errno)
            fd.close()
            return False
        except Exception as exc:
            self.stats.opens_refused += 1
            log.exception("open.failed", blob=str(key), msg_id=req.msg_id)
            self._reply_copen(req.msg_id, -getattr(exc, "kernel_errno", errno.EIO))
            fd.close()
            return False
        presence = blob.presence
        stale_ino = None
        if (
            cache_path is not None
            and blob.users == 1
            and presence is not None
            and not presence.trusted
            and cache_path.exists()
        ):
            stale_ino = self._discard_unvouched(key, cache_path)
        obj = OnDemandObject(req.object_id, fd, blob, cache_path, stale_ino)
        obj.sink = AnonFdSink(self.device, obj, self.make_room if self.culler else None)
        with self._lock:
            stale = self._objects.get(req.object_id)
            self._objects[req.object_id] = obj
        if stale is not None:  # the id was recycled without a CLOSE reaching us
            log.warning("open.stale_object", object_id=req.object_id, blob=str(stale.blob.key))
            stale.fd.close()
            self._finish(stale, committed=False)
        if self._reply_copen(req.msg_id, blob.size):
            if self.culler is not None:
                self.culler.opened((key.volume, key.cookie), blob.size)
            log.info(
                "open",
                blob=str(key),
                object_id=req.object_id,
                size=blob.size,
                chunk=blob.chunk_size,
                present=presence.bitmap.count() if presence is not None else 0,
            )
            return True
        with self._lock:
            if self._objects.get(req.object_id) is obj:
                del self._objects[req.object_id]
        fd.close()
        self.engine.release(blob)
        return False

    def _reply_copen(self, msg_id: int, size_or_errno: int) -> bool:
        try:
            self.device.write_command(wire.encode_copen(msg_id, size_or_errno))
            return True
        except OSError as exc:
            # EINVAL: the OPEN is gone (cache dead, object dropped, duplicate after restore)
            log.warning("copen.failed", msg_id=msg_id, errno=exc.errno, error=str(exc))
            return False

    def _discard_unvouched(self, key: BlobKey, path: Path) -> int | None:
        """A cache file our sidecars do not vouch for (a crash before binding, another
        daemon's file, an older version of the blob) must not be served. It cannot be
        culled now: the kernel marks it in use before it sends OPEN (``cull`` gives
        EBUSY). But the kernel checks the file's coherency xattr
        (``user.CacheFiles.cache``: object size and content type) only *after* our
        ``copen``, and a file that fails the check is replaced by a fresh one. So we
        spoil that xattr (same length, impossible object size) and the kernel starts
        the blob afresh; the stale file is replaced when the new one is committed.
        Verified on 6.12 in the guest tests. Returns the stale file's inode number."""
        try:
            st = path.stat()
            aux = os.getxattr(path, KERNEL_AUX_XATTR)
            os.setxattr(path, KERNEL_AUX_XATTR, b"\xff" * max(len(aux), 8))
        except OSError as exc:
            log.warning(
                "open.unvouched_discard_failed",
                blob=str(key),
                file=str(path),
                errno=exc.errno,
                error=str(exc),
            )
            return None
        self.stats.unvouched_discarded += 1
        log.warning("open.unvouched_file_discarded", blob=str(key), file=str(path))
        return st.st_ino

    # -- READ ------------------------------------------------------------------------

    def _on_read(self, req: wire.ReadRequest, received: float | None = None) -> None:
        with self._lock:
            self._in_service[req.msg_id] = time.monotonic()
        try:
            self._serve_read(req, received)
        finally:
            with self._lock:
                self._in_service.pop(req.msg_id, None)

    def _serve_read(self, req: wire.ReadRequest, received: float | None) -> None:
        self.stats.reads += 1
        with self._lock:
            obj = self._objects.get(req.object_id)
        if obj is not None and self.culler is not None:
            self.culler.missed((obj.blob.key.volume, obj.blob.key.cookie))
        if obj is None:
            # Without an fd of that object (6.10 rule) it cannot be completed; this
            # only happens if the kernel broke protocol or we lost track of an OPEN.
            self.stats.reads_failed += 1
            log.error("read.unknown_object", msg_id=req.msg_id, object_id=req.object_id)
            return
        try:
            with obj.fd.borrow() as fd:
                ok = False
                try:
                    self.engine.ensure(
                        obj.blob,
                        req.offset,
                        req.length,
                        obj.sink,
                        Deadline.after(self.fetch_timeout),
                    )
                    ok = True
                except (CachefilesdError, OSError) as exc:
                    self.stats.reads_failed += 1
                    if isinstance(exc, OSError) and exc.errno == errno.ENOBUFS:
                        self.kick_cull("enobufs")
                    log.warning(
                        "read.failed",
                        blob=str(obj.blob.key),
                        offset=req.offset,
                        length=req.length,
                        error=str(exc),
                        reason=getattr(exc, "reason", None),
                    )
                finally:
                    self._complete(fd, req.msg_id)
                    if received is not None:
                        self.read_times.record(time.monotonic() - received)
        except ClosedFdError:
            self.stats.reads_failed += 1
            log.info("read.object_closed", msg_id=req.msg_id, object_id=req.object_id)
            return
        ahead = self.engine.plan_readahead(obj.blob, req.offset, req.length) if ok else None
        if ahead is not None:
            self._ra_pool.submit(self._guard, self.engine.readahead, obj.blob, ahead, obj.sink)

    def _complete(self, fd: int, msg_id: int) -> None:
        try:
            self.device.read_complete(fd, msg_id)
        except OSError as exc:
            log.warning("cread.failed", msg_id=msg_id, errno=exc.errno, error=str(exc))

    # -- CLOSE -----------------------------------------------------------------------

    def _on_close(self, req: wire.CloseRequest) -> None:
        self.stats.closes += 1
        with self._lock:
            obj = self._objects.pop(req.object_id, None)
        if obj is None:
            log.warning("close.unknown_object", object_id=req.object_id)
            return
        obj.fd.close()
        log.info("close", blob=str(obj.blob.key), object_id=req.object_id)
        self._pool.submit(self._guard, self._finish, obj)

    def _finish(self, obj: OnDemandObject, committed: bool = True) -> None:
        """The kernel is done with the object: save (and bind) its presence, then give
        back its use lease, so a trim never sees a sidecar being written."""
        try:
            self.engine.release(
                obj.blob,
                committed=(
                    (lambda: self._wait_commit(obj.cache_path, obj.stale_ino))
                    if committed
                    else None
                ),
            )
        finally:
            self.engine.leases.release_use((obj.blob.key.volume, obj.blob.key.cookie))

    @staticmethod
    def _wait_commit(path: Path | None, stale_ino: int | None) -> Path | None:
        """The kernel links a new cache file into the tree right after we read its
        CLOSE (tmpfile commit). Wait briefly until a file other than the stale one is
        there; None if it does not come (the sidecar then stays unbound: a miss later,
        never wrong data)."""
        if path is None:
            return None
        end = time.monotonic() + COMMIT_WAIT
        while time.monotonic() < end:
            try:
                if path.stat().st_ino != stale_ino:
                    return path
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        return None

    # -- shutdown --------------------------------------------------------------------

    def objects(self) -> list[OnDemandObject]:
        with self._lock:
            return list(self._objects.values())

    def shutdown(self) -> None:
        """Finish in-flight work, persist presence, close every fd we own. The device
        itself is closed by its owner (closing it unbinds the cache)."""
        self._pool.shutdown(wait=True)
        self._ra_pool.shutdown(wait=True, cancel_futures=True)
        for obj in self.objects():
            obj.fd.close()
        self.engine.close()

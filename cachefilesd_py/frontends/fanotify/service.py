"""The fanotify frontend as the daemon runs it: group, images, driver, in the right order.

Start (:meth:`FanotifyFrontend.start`):

1. one pre-content group (``FAN_UNLIMITED_QUEUE``), the driver's reader thread on it,
   and the deny errno the kernel takes (probed once);
2. per configured image, per blob: lease, engine blob, cache file, sidecar binding,
   identity registered with the session, **mark** (``images.py``);
3. per image: any stale mount on its mount point removed, then **mount** (every blob
   marked first: EROFS opens its files while mounting, and only files opened after the
   mark raise events). An image that fails is logged and left out (its blobs released),
   the others are served; :meth:`start` reports which failed.

Stop (:meth:`FanotifyFrontend.stop`) never fails open (trap 1: closing the group
allows every pending and future read of a hole, zeros through EROFS):

1. every mount is unmounted, plainly (a lazy detach would outlive the group); while a
   mount is in use (EBUSY) the daemon keeps serving it and tries again every second,
   logging ``fanotify.unmount_busy`` every ``BUSY_LOG_EVERY`` seconds, for as long as
   it takes. The group is never closed under a live mount;
2. the reader stops and every fill in flight gets its answer;
3. marks are removed, the group closed, each blob released (presence checkpointed and
   bound to its file) and its use lease given back.

Run by the daemon, the group is not this process's: the supervisor made it (or took it
back from systemd's fd store) and holds it, so a worker's death never closes it
(``daemon/fanotify_keeper.py``, docs/failover.md). Then ``journal`` records the events
read and not answered yet, and a worker taking over (``journal.set_up``: a worker
before it marked and mounted with this group) starts differently:

1. per image whose mount point is mounted: **adopt** it (blobs opened, files checked,
   never truncated, marks added again: a no-op); other images as above, after their
   old marks are removed;
2. answer the dead worker's orphans (``takeover.py``) through the supervisor's silent
   fds, **before** the reader reads an event of its own;
3. start the reader, then mount what is not mounted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.config.model import FanotifyImage
from cachefilesd_py.engine.service import Engine
from cachefilesd_py.errors import CachefilesdError
from cachefilesd_py.frontends.fanotify import images as img
from cachefilesd_py.frontends.fanotify.driver import FanotifyDriver
from cachefilesd_py.frontends.fanotify.inflight import InflightJournal
from cachefilesd_py.frontends.fanotify.space import FanotifyCuller, SpaceThread
from cachefilesd_py.frontends.fanotify.takeover import TakeoverReport, answer_orphans
from cachefilesd_py.kernel import fanotify
from cachefilesd_py.kernel.fd import OwnedFd
from cachefilesd_py.sources.policy import Deadline

log = structlog.get_logger("fanotify")

#: how often a busy mount is logged while the daemon waits to unmount it
BUSY_LOG_EVERY = 10.0
#: bytes :func:`read_through` reads per ``pread``
READ_STEP = 1 << 20


def read_through(path: Path, offset: int, length: int) -> None:
    """Read ``[offset, offset+length)`` of ``path`` and drop the bytes: on a marked
    cache file, each ``pread`` waits for the group's answer (trap 2: an fd opened
    after the mark raises events)."""
    buf = bytearray(min(length, READ_STEP))
    end = offset + length
    with OwnedFd(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)) as fd:
        pos = offset
        while pos < end:
            n = os.preadv(fd.fileno(), [memoryview(buf)[: min(len(buf), end - pos)]], pos)
            if n <= 0:
                raise OSError(errno.EIO, f"{path}: read ended at {pos} of {end}")
            pos += n


class FanotifyFrontend:
    def __init__(
        self,
        engine: Engine,
        cache_dir: Path,
        specs: tuple[FanotifyImage, ...],
        *,
        workers: int = 8,
        fetch_timeout: float = 30.0,
        silence_complete: bool = True,
        culler: Callable[[FanotifyFrontend], FanotifyCuller] | None = None,
        group: OwnedFd | None = None,
        journal: InflightJournal | None = None,
        silent: dict[tuple[int, int], int] | None = None,
    ) -> None:
        self.silence_complete = silence_complete
        #: builds the culler once the group exists (None: no culling, ``nocull``)
        self.make_culler = culler
        self.culler: FanotifyCuller | None = None
        self.space: SpaceThread | None = None
        #: the group, when the supervisor holds it (else made by :meth:`start`)
        self.given_group = group
        self.journal = journal
        #: (st_dev, st_ino) -> an fd of that cache file opened before any mark
        self.silent = silent or {}
        self.takeover: TakeoverReport | None = None
        self.engine = engine
        self.cache_dir = cache_dir
        self.specs = specs
        self.workers = workers
        self.fetch_timeout = fetch_timeout
        self.group: OwnedFd | None = None
        self.driver: FanotifyDriver | None = None
        self.images: list[img.ServedImage] = []
        #: reads a range of a marked cache file (:meth:`prefetch`); the kernel raises
        #: the pre-content events (host tests put a stand-in kernel here)
        self.read_through: Callable[[Path, int, int], None] = read_through

    def start(self) -> list[tuple[FanotifyImage, str]]:
        """Make the group, serve it, prepare and mount every image; returns the images
        that could not be served, with why."""
        self.group = self.given_group or fanotify.pre_content_group()
        journal = self.journal
        self.driver = FanotifyDriver(
            self.group,
            self.engine,
            workers=self.workers,
            fetch_timeout=self.fetch_timeout,
            silence_complete=self.silence_complete,
            journal=journal,
        )
        adopt = journal is not None and journal.set_up
        if journal is not None:
            journal.set_up = True
        log.info("fanotify.group", deny_errno=self.driver.deny_errno, takeover=adopt)
        failed: list[tuple[FanotifyImage, str]] = []
        ready: list[img.ServedImage] = []
        for spec in self.specs:
            try:
                ready.append(self._prepare_image(spec, adopt))
            except (CachefilesdError, OSError, ValueError) as exc:
                self._image_failed(spec, exc, failed)
        if journal is not None:
            served = [b for image in ready for b in image.blobs]
            self.takeover = answer_orphans(
                self.group.fileno(),
                self.engine,
                journal.orphans(),
                served,
                self.silent,
                deny_errno=self.driver.deny_errno,
                fetch_timeout=self.fetch_timeout,
                workers=self.workers,
            )
            journal.clear()
        self.driver.start()
        for image in ready:
            try:
                if not image.mounted:
                    img.mount_image(image)
                    self._log_mounted(image)
                self.images.append(image)
            except (CachefilesdError, OSError, ValueError) as exc:
                self._release_image(image)
                self._image_failed(image.spec, exc, failed)
        if self.make_culler is not None:
            self.culler = self.make_culler(self)
            culler = self.culler
            self.driver.on_miss = lambda served: culler.missed(served.key)
            for image in self.images:
                for served_blob in image.blobs:
                    culler.opened(served_blob.key, served_blob.size)
            self.space = SpaceThread(culler).start()
        return failed

    def served(self) -> dict[BlobKey, img.ServedBlob]:
        """The blobs mounts read now, by key (the culler leaves them alone)."""
        return {b.key: b for image in self.images for b in image.blobs}

    def prefetch(self, key: BlobKey, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` of a served blob present the way a mount's
        reader does: read it through a fresh fd of its cache file. The file is marked,
        so the read raises pre-content events that this frontend's reader answers like
        any other: from the bitmap when present, else by a fill through the event's
        fd (the engine's fill path: one fetch per chunk however many wait for it,
        presence bits after the data), then allowed. A failed fill is denied: the read
        fails with EIO (OSError), and nothing is marked present."""
        served = self.served().get(key)
        if served is None:
            raise OSError(errno.ENOENT, f"{key}: not served (no mounted image has it)")
        self.read_through(served.path, offset, length)

    def stats_fields(self) -> dict[str, Any]:
        """The driver's counters and the culler's totals."""
        fields: dict[str, Any] = self.driver.stats_fields() if self.driver is not None else {}
        if self.culler is not None:
            fields.update({f"cull_{k}": v for k, v in self.culler.totals.as_fields().items()})
            fields["cull_freed_bytes"] = self.culler.totals.freed_bytes
        return fields

    def _image_failed(
        self, spec: FanotifyImage, exc: BaseException, failed: list[tuple[FanotifyImage, str]]
    ) -> None:
        log.error(
            "fanotify.image_failed",
            image=f"{spec.volume}/{spec.name}",
            mountpoint=spec.mountpoint,
            error=str(exc),
            config=f"{spec.file}:{spec.line}",
        )
        failed.append((spec, str(exc)))

    def _prepare_image(self, spec: FanotifyImage, adopt: bool) -> img.ServedImage:
        """Blobs ready and marked; mounted already if adopted."""
        assert self.group is not None and self.driver is not None
        image = img.ServedImage(spec)
        mounted = adopt and os.path.ismount(image.mountpoint)
        try:
            if adopt and not mounted:  # a dead worker may have marked it: start clean
                for key in img.blob_keys(spec):
                    path = img.cache_path(self.cache_dir, key.volume.decode(), key.name.decode())
                    with contextlib.suppress(OSError):
                        fanotify.unmark_pre_access(self.group.fileno(), path)
            if not mounted:
                img.clear_stale_mount(image.mountpoint)
            for key in img.blob_keys(spec):
                served = img.prepare_blob(
                    self.engine,
                    self.cache_dir,
                    key,
                    Deadline.after(self.fetch_timeout),
                    adopt=mounted,
                )
                image.blobs.append(served)
                self.driver.session.add_image(served.identity, served, served.size)
                img.mark(self.group.fileno(), served)
                self.driver.maybe_silence(served)
        except BaseException:
            if mounted:  # the mark stays: its reads are denied (EIO), never zeros
                for served in image.blobs:
                    served.marked = False
            self._release_image(image)
            if mounted:  # never left behind: stop() unmounts it
                image.mounted = True
                self.images.append(image)
            raise
        if mounted:
            image.mounted = True
            log.info("fanotify.adopted", mountpoint=str(image.mountpoint))
        return image

    def _log_mounted(self, image: img.ServedImage) -> None:
        spec = image.spec
        presence = [b.blob.presence for b in image.blobs]
        log.info(
            "fanotify.mounted",
            image=f"{spec.volume}/{spec.name}",
            mountpoint=spec.mountpoint,
            blobs=len(image.blobs),
            size=image.blobs[0].size,
            present=[p.bitmap.count() if p is not None else 0 for p in presence],
        )

    def _release_image(self, image: img.ServedImage) -> None:
        """Give back everything of an image that is not mounted."""
        assert self.group is not None and self.driver is not None
        assert not image.mounted
        for served in image.blobs:
            img.unmark(self.group.fileno(), served)
            session = self.driver.session
            if served.identity in {b.identity for b in session.images()}:
                session.close_image(served.identity)
                while True:
                    try:
                        session.forget_image(served.identity)
                        break
                    except RuntimeError:  # a fill still runs: it gets its answer first
                        time.sleep(0.05)
            path = served.path
            try:
                self.engine.release(served.blob, committed=lambda p=path: p)  # type: ignore[misc]
            finally:
                self.engine.leases.release_use(served.key)
        image.blobs.clear()

    def stop(self, abort: threading.Event | None = None) -> bool:
        """Unmount everything (waiting out busy mounts while serving them), then close
        the group. Returns False, with the group still open and served, only if
        ``abort`` was set while a mount was still busy."""
        if self.driver is None or self.group is None:
            return True
        if self.space is not None:  # no pass runs while images go down
            self.space.stop()
            self.space = None
        waited_since = time.monotonic()
        last_log = 0.0
        while True:
            busy = [i for i in self.images if not img.unmount_image(i)]
            if not busy:
                break
            now = time.monotonic()
            if now - last_log >= BUSY_LOG_EVERY:
                last_log = now
                log.warning(
                    "fanotify.unmount_busy",
                    mountpoints=[str(i.mountpoint) for i in busy],
                    waited=round(now - waited_since),
                    note="still serving: the group stays open while a mount lives",
                )
            if abort is not None and abort.wait(1.0):
                return False
            if abort is None:
                time.sleep(1.0)
        for image in self.images:
            log.info("fanotify.unmounted", mountpoint=str(image.mountpoint))
        self.driver.stop()
        for image in self.images:
            self._release_image(image)
        self.images.clear()
        self.group.close()
        self.group = None
        return True

"""Answering an OPEN: the blob's lease, source, identity and presence, then ``copen``.

For every OPEN the session asks for (``OpenObject``), the opener

1. finds the blob's source from the ``source`` rules in the reader thread (cheap, no
   network): its origin picks the lane of the OPEN scheduler, so OPENs of a stalled
   origin wait only behind each other. A blob no rule serves is refused at once;
2. in an OPEN worker, waits for a pending release of the same key (the kernel closed
   the previous object; its release may still be running: ``driver.wait_released``),
   takes the blob's use lease (waiting out a trim of its cache
   file: the kernel cannot read the file before our ``copen``, ``engine/leases.py``),
   then opens the blob in the engine: the source's identity (size, ETag), the presence
   bitmap if the cache file's sidecar vouches for it;
3. spoils the coherency xattr of a cache file no sidecar vouches for
   (``unvouched.py``), so the kernel replaces it instead of serving it;
4. reports to the session, which answers ``copen`` with the blob's size, or with the
   errno the failure carries (``SourceError.kernel_errno``; EIO for anything else).

The lease is given back when the object is released, or at once if the OPEN fails.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from cachefilesd_py.errors import SourceError
from cachefilesd_py.frontends.ondemand import session as sess
from cachefilesd_py.frontends.ondemand.objects import OnDemandObject
from cachefilesd_py.frontends.ondemand.unvouched import spoil_coherency
from cachefilesd_py.kernel.fd import OwnedFd
from cachefilesd_py.sources.base import Source
from cachefilesd_py.sources.policy import Deadline

if TYPE_CHECKING:
    from cachefilesd_py.frontends.ondemand.driver import OnDemandDriver

log = structlog.get_logger("ondemand")

OpenAction = sess.OpenObject[OwnedFd]


class Opener:
    def __init__(self, driver: OnDemandDriver) -> None:
        self.driver = driver

    def submit(self, action: OpenAction) -> None:
        """Resolve the blob's source now; open it in the OPEN scheduler's lane of its
        origin (or refuse it at once when no source serves it)."""
        try:
            source = self.driver.engine.source_for(action.key)
        except SourceError as exc:
            self._refused(action, exc)
            return
        queued = time.monotonic()
        self.driver.opens.submit(source.origin, lambda: self.open(action, source, queued))

    def open(self, action: OpenAction, source: Source, queued: float | None = None) -> None:
        driver = self.driver
        leases = driver.engine.leases
        started = time.monotonic()
        if not driver.wait_released(action.key, timeout=driver.fetch_timeout):
            log.warning("open.release_pending", msg_id=action.msg_id, blob=str(action.key))
        released = time.monotonic()
        if not leases.acquire_use(action.key, timeout=driver.fetch_timeout):
            log.warning("open.lease_timeout", msg_id=action.msg_id, blob=str(action.key))
            driver.count("opens_refused")
            driver.run(driver.session.opened(action.ticket, None, -errno.EIO))
            return
        leased = time.monotonic()
        obj: OnDemandObject | None = None
        try:
            obj = self._open_object(action, source)
        finally:
            if obj is None:
                leases.release_use(action.key)
        if obj is None:
            return
        opened = time.monotonic()
        driver.run(driver.session.opened(action.ticket, obj, obj.blob.size))
        # where an OPEN's time goes (a failover re-opens every live object at once)
        log.debug(
            "open.timing",
            object_id=action.object_id,
            queued_s=round(started - (queued if queued is not None else started), 4),
            release_wait_s=round(released - started, 4),
            lease_s=round(leased - released, 4),
            blob_s=round(opened - leased, 4),
            copen_s=round(time.monotonic() - opened, 4),
        )
        presence = obj.blob.presence
        log.info(
            "open",
            blob=str(action.key),
            object_id=action.object_id,
            size=obj.blob.size,
            chunk=obj.blob.chunk_size,
            present=presence.bitmap.count() if presence is not None else 0,
        )

    def _open_object(self, action: OpenAction, source: Source) -> OnDemandObject | None:
        """The object of an OPEN, its blob opened; None after refusing the OPEN."""
        driver = self.driver
        key = action.key
        try:
            cache_path: Path | None = key.cache_path(driver.cache_dir)
        except ValueError:
            cache_path = None
        try:
            blob = driver.engine.open_blob(
                key, cache_path, Deadline.after(driver.fetch_timeout), source
            )
        except SourceError as exc:
            self._refused(action, exc)
            return None
        except Exception as exc:
            driver.count("opens_refused")
            log.exception("open.failed", blob=str(key), msg_id=action.msg_id)
            errno_ = getattr(exc, "kernel_errno", errno.EIO)
            driver.run(driver.session.opened(action.ticket, None, -errno_))
            return None
        presence = blob.presence
        stale_ino = None
        if (
            cache_path is not None
            and blob.users == 1
            and presence is not None
            and not presence.trusted
            and cache_path.exists()
        ):
            stale_ino = spoil_coherency(cache_path, str(key))
            if stale_ino is not None:
                driver.count("unvouched_discarded")
        obj = OnDemandObject(action.object_id, action.fd, blob, cache_path, stale_ino)
        obj.sink = driver.sink_for(obj)
        return obj

    def _refused(self, action: OpenAction, exc: SourceError) -> None:
        driver = self.driver
        driver.count("opens_refused")
        log.warning(
            "open.refused",
            blob=str(action.key),
            msg_id=action.msg_id,
            reason=exc.reason,
            error=str(exc),
            errno=exc.kernel_errno,
        )
        driver.run(driver.session.opened(action.ticket, None, -exc.kernel_errno))

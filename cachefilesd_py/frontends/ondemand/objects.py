"""One on-demand kernel object as the driver holds it, and how bytes reach its file.

An object is what one OPEN created: an object id, the anonymous fd the kernel
installed (owned by an :class:`~cachefilesd_py.kernel.fd.OwnedFd`), and the engine's
blob it serves. Fetched bytes go into the blob's cache file through that fd
(:class:`AnonFdSink`): ``pwrite`` on the anonymous fd is passed to the cache file as
direct I/O (``docs/protocol-ondemand.md`` §3.4), and ``lseek`` with SEEK_DATA/SEEK_HOLE
to the cache file as well.

ENOBUFS from such a write means one of four things (§3.4): an unaligned offset (never
here: ``kernel/dio.py`` refuses it first), an object whose file is not ready yet (just
after ``copen``: retried briefly by ``pwrite_direct``), an object already withdrawn
(after CLOSE), or a cache below *stop*. For the last one the sink asks the culler for
room and writes again.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cachefilesd_py.engine.blob import Blob
from cachefilesd_py.kernel.device import Device
from cachefilesd_py.kernel.dio import AlignedBuffer, pwrite_direct
from cachefilesd_py.kernel.fd import OwnedFd


def has_hole(fd: int, offset: int, length: int) -> bool:
    try:
        if os.lseek(fd, offset, os.SEEK_DATA) != offset:
            return True
        return os.lseek(fd, offset, os.SEEK_HOLE) < offset + length
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data at or after offset
            return True
        raise


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

    @property
    def origin(self) -> str:
        return self.blob.source.origin


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

"""Direct-I/O writes into the on-demand anonymous fd.

The kernel opens every cache file with O_DIRECT and writes what we ``pwrite`` to the
anonymous fd as direct I/O (ondemand-protocol.md §2.6):

- the **offset** must be PAGE_SIZE aligned, else the write fails with ENOBUFS (a "DIO
  misfit");
- the **buffer** must suit the device's DMA alignment: Python ``bytes`` are not even
  512-byte aligned, so writes come from anonymous ``mmap`` memory, which is page aligned;
- the **length** is padded to a page multiple (zeros after the blob's end), clipped to
  ``round_up(blob_size, PAGE_SIZE)``, the size of the cache file;
- on kernels up to 6.12 a successful write returns the *page-rounded* length (fixed in
  6.13): any return value ≥ the length asked for is success;
- ENOBUFS also means "object not ready yet" (just after ``copen`` the kernel may still be
  opening the backing file), "object withdrawn" or "cache below bstop". Only the first
  is worth a short retry, and only the caller knows whether it may apply.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from collections.abc import Callable

PAGE_SIZE = os.sysconf("SC_PAGESIZE")


def round_up(n: int, to: int = PAGE_SIZE) -> int:
    return (n + to - 1) // to * to


class AlignedBuffer:
    """A page-aligned buffer (anonymous mmap) of ``size`` bytes, rounded up to pages."""

    def __init__(self, size: int) -> None:
        self.size = round_up(max(size, 1))
        self._map: mmap.mmap | None = mmap.mmap(-1, self.size)
        self.view = memoryview(self._map)

    def close(self) -> None:
        """Unmap now, or leave it to the garbage collector if a slice of the buffer is
        still referenced somewhere (a traceback, a library's internal reference)."""
        if self._map is not None:
            self.view.release()
            try:
                self._map.close()
            except BufferError:
                return
            self._map = None


def pwrite_direct(
    pwrite: Callable[[int, memoryview, int], int],
    fd: int,
    buf: AlignedBuffer,
    length: int,
    offset: int,
    *,
    limit: int,
    object_may_be_settling: bool = False,
    retries: int = 20,
    retry_delay: float = 0.01,
) -> int:
    """Write ``buf[:length]`` at ``offset`` with direct-I/O padding; returns the padded
    length written. ``limit`` is the blob size (the cache file holds
    ``round_up(limit)`` bytes)."""
    if offset % PAGE_SIZE:
        raise ValueError(f"offset {offset} is not page aligned")
    if length <= 0:
        return 0
    padded = min(round_up(length), round_up(limit) - offset)
    if padded < length:
        raise ValueError(f"write of {length} at {offset} runs past the blob end {limit}")
    if padded > buf.size:
        raise ValueError(f"padded length {padded} exceeds the buffer ({buf.size})")
    if padded > length:
        buf.view[length:padded] = bytes(padded - length)
    attempt = 0
    while True:
        try:
            written = pwrite(fd, buf.view[:padded], offset)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS and object_may_be_settling and attempt < retries:
                attempt += 1
                time.sleep(retry_delay)
                continue
            raise
        if written < padded:
            raise OSError(errno.EIO, f"short direct write: {written} of {padded} at {offset}")
        return padded

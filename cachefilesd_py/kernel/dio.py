"""Direct-I/O writes into the on-demand anonymous fd.

The kernel opens every cache file with O_DIRECT and forwards what we ``pwrite`` to the
anonymous fd as direct I/O (``docs/protocol-ondemand.md`` §3.4):

- the **offset** must be PAGE_SIZE aligned, else the kernel fails the write with
  ENOBUFS (a "DIO misfit"). That ENOBUFS would look like "cache full", so
  :func:`pwrite_direct` refuses an unaligned offset itself with ValueError;
- the **buffer** must meet the backing device's DMA alignment: Python ``bytes`` are not
  even 512-byte aligned, so writes come from anonymous ``mmap`` memory, which is page
  aligned (:class:`AlignedBuffer`);
- the **length** is padded to a page multiple (zeros after the blob's end) and clipped
  to ``round_up(blob_size, PAGE_SIZE)``, the size the kernel gave the cache file;
- on kernels up to 6.12 a successful write returns the *page-rounded* length (6.13 and
  the 6.11.y/6.12.y stables return the real count): any return value >= the length
  asked for is success, a smaller one is an error (direct I/O is never partial here);
- ENOBUFS also means "object not ready yet" (just after ``copen`` the kernel may still
  be opening or creating the backing file), "object withdrawn" (after CLOSE) or "cache
  below bstop/fstop". Only the first is worth a short retry, and only the caller knows
  whether it may apply, so it says so (``object_may_be_settling``).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

PAGE_SIZE: int = os.sysconf("SC_PAGESIZE")

PWrite = Callable[[int, memoryview, int], int]


def round_up(n: int, to: int = PAGE_SIZE) -> int:
    return -(-n // to) * to


def round_down(n: int, to: int = PAGE_SIZE) -> int:
    return n // to * to


class AlignedBuffer:
    """A page-aligned buffer (anonymous mmap) of ``size`` bytes, rounded up to whole
    pages. ``view`` is a writable memoryview of all of it; slice it freely."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"negative buffer size {size}")
        self.size = round_up(max(size, 1))
        self._map: mmap.mmap | None = mmap.mmap(-1, self.size)
        self.view = memoryview(self._map)

    def __len__(self) -> int:
        return self.size

    @property
    def closed(self) -> bool:
        return self._map is None

    def close(self) -> None:
        """Unmap now, or leave it to the garbage collector if a slice of the buffer is
        still referenced somewhere (a traceback, a library's internal reference)."""
        if self._map is None:
            return
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            return
        self._map = None

    def __enter__(self) -> AlignedBuffer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class BufferPool:
    """A fixed set of ``count`` aligned buffers of ``buf_size`` bytes, reused.

    ``borrow()`` blocks while all are out, which bounds the memory that fills in flight
    can hold at once; with ``timeout`` it raises TimeoutError instead of waiting on."""

    def __init__(self, buf_size: int, count: int) -> None:
        if count < 1:
            raise ValueError("a buffer pool needs at least one buffer")
        self.buf_size = round_up(max(buf_size, 1))
        self.count = count
        self._free = [AlignedBuffer(self.buf_size) for _ in range(count)]
        self._cond = threading.Condition()
        self._closed = False

    @property
    def size(self) -> int:
        """Alias of ``buf_size`` (the largest write one buffer can carry)."""
        return self.buf_size

    def _can_take(self) -> bool:
        return bool(self._free) or self._closed

    @contextmanager
    def borrow(self, timeout: float | None = None) -> Iterator[AlignedBuffer]:
        with self._cond:
            if not self._cond.wait_for(self._can_take, timeout):
                raise TimeoutError("no free buffer")
            if self._closed:
                raise RuntimeError("buffer pool is closed")
            buf = self._free.pop()
        try:
            yield buf
        finally:
            with self._cond:
                if self._closed:
                    buf.close()
                else:
                    self._free.append(buf)
                    self._cond.notify()

    def close(self) -> None:
        """Unmap the free buffers now; borrowed ones are unmapped when returned."""
        with self._cond:
            self._closed = True
            for buf in self._free:
                buf.close()
            self._free.clear()
            self._cond.notify_all()


def padded_length(length: int, offset: int, limit: int) -> int:
    """The length a direct write of ``length`` bytes at ``offset`` is sent with: padded
    to whole pages, clipped to ``round_up(limit)`` (the cache file's size)."""
    if offset % PAGE_SIZE:
        raise ValueError(f"offset {offset} is not page aligned ({PAGE_SIZE})")
    if length <= 0:
        return 0
    padded = min(round_up(length), round_up(limit) - offset)
    if padded < length:
        raise ValueError(f"write of {length} at {offset} runs past the blob end {limit}")
    return padded


def pwrite_direct(
    write: PWrite,
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
    """Write ``buf[:length]`` at ``offset`` through ``write(fd, view, offset)`` (a
    device port's ``pwrite``, or ``os.pwrite``), padded for direct I/O; returns the
    padded length written. ``limit`` is the blob size.

    The bytes between ``length`` and the padded end are zeroed in ``buf``. ENOBUFS is
    retried (``retries`` times, ``retry_delay`` apart) only if
    ``object_may_be_settling``; every other error, and a short write, raises OSError.
    """
    padded = padded_length(length, offset, limit)
    if padded == 0:
        return 0
    if padded > buf.size:
        raise ValueError(f"padded length {padded} exceeds the buffer ({buf.size})")
    if padded > length:
        buf.view[length:padded] = bytes(padded - length)
    attempt = 0
    while True:
        try:
            written = write(fd, buf.view[:padded], offset)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS and object_may_be_settling and attempt < retries:
                attempt += 1
                time.sleep(retry_delay)
                continue
            raise
        if written < padded:
            raise OSError(errno.EIO, f"short direct write: {written} of {padded} at {offset}")
        return padded

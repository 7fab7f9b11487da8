"""The fd holder and direct-I/O padding, on real fds."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

import pytest

from cachefilesd_py.kernel.dio import PAGE_SIZE, AlignedBuffer, pwrite_direct
from cachefilesd_py.kernel.fd import ClosedFdError, OwnedFd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_owned_fd_sets_cloexec_and_closes_once() -> None:
    r, w = os.pipe2(0)
    holder = OwnedFd(r)
    assert fcntl.fcntl(r, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    holder.close()
    holder.close()
    assert holder.fileno() == -1 and not is_open(r)
    with pytest.raises(ClosedFdError), holder.borrow():
        pass
    os.close(w)


def test_close_while_borrowed_is_deferred() -> None:
    r, w = os.pipe()
    holder = OwnedFd(r)
    inside = threading.Event()
    release = threading.Event()

    def worker() -> None:
        with holder.borrow() as fd:
            inside.set()
            release.wait(5)
            assert is_open(fd)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    holder.close()
    assert is_open(r), "closed under a borrower's feet"
    release.set()
    t.join()
    assert not is_open(r)
    os.close(w)


def test_bogus_fd_is_refused() -> None:
    with pytest.raises(OSError):
        OwnedFd(999_999)


class Recorder:
    def __init__(self, results: list[int | OSError]) -> None:
        self.calls: list[tuple[int, int]] = []
        self.results = results

    def __call__(self, fd: int, view: memoryview, offset: int) -> int:
        self.calls.append((len(view), offset))
        res = self.results.pop(0) if self.results else len(view)
        if isinstance(res, OSError):
            raise res
        return res


def test_pads_to_pages_and_clips_to_the_blob() -> None:
    buf = AlignedBuffer(3 * PAGE_SIZE)
    buf.view[:] = b"\xaa" * buf.size
    rec = Recorder([])
    assert pwrite_direct(rec, 5, buf, 100, 0, limit=10 * PAGE_SIZE) == PAGE_SIZE
    assert buf.view[100:PAGE_SIZE] == bytes(PAGE_SIZE - 100)
    assert (
        pwrite_direct(rec, 5, buf, PAGE_SIZE + 1, 2 * PAGE_SIZE, limit=3 * PAGE_SIZE + 1)
        == 2 * PAGE_SIZE
    )
    with pytest.raises(ValueError):
        pwrite_direct(rec, 5, buf, 10, 100, limit=10 * PAGE_SIZE)
    assert pwrite_direct(Recorder([4 * PAGE_SIZE]), 5, buf, 10, 0, limit=PAGE_SIZE) == PAGE_SIZE


def test_enobufs_retried_only_when_settling() -> None:
    buf = AlignedBuffer(PAGE_SIZE)
    enobufs = OSError(errno.ENOBUFS, "no")
    with pytest.raises(OSError):
        pwrite_direct(Recorder([enobufs]), 5, buf, 10, 0, limit=PAGE_SIZE)
    rec = Recorder([enobufs, enobufs])
    assert (
        pwrite_direct(
            rec, 5, buf, 10, 0, limit=PAGE_SIZE, object_may_be_settling=True, retry_delay=0
        )
        == PAGE_SIZE
    )
    assert len(rec.calls) == 3
    with pytest.raises(OSError, match="short"):
        pwrite_direct(Recorder([100]), 5, buf, 10, 0, limit=PAGE_SIZE)


def test_real_odirect_write_from_aligned_buffer(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        pytest.skip("this filesystem has no O_DIRECT")
    buf = AlignedBuffer(2 * PAGE_SIZE)
    buf.view[:5] = b"hello"
    try:
        pwrite_direct(os.pwrite, fd, buf, 5, PAGE_SIZE, limit=PAGE_SIZE + 5)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[PAGE_SIZE : PAGE_SIZE + 5] == b"hello" and len(data) == 2 * PAGE_SIZE

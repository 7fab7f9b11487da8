"""Direct-I/O helpers: aligned buffers, the pool, padding/clipping and the ENOBUFS rule."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.kernel.dio import (
    PAGE_SIZE,
    AlignedBuffer,
    BufferPool,
    padded_length,
    pwrite_direct,
    round_down,
    round_up,
)


def address(buf: AlignedBuffer) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf.view))


class Recorder:
    """A pwrite stand-in: records (length, offset, bytes) and returns/raises a script."""

    def __init__(self, results: list[int | OSError] | None = None) -> None:
        self.calls: list[tuple[int, int, bytes]] = []
        self.results = list(results or [])

    def __call__(self, fd: int, view: memoryview, offset: int) -> int:
        self.calls.append((len(view), offset, bytes(view)))
        res = self.results.pop(0) if self.results else len(view)
        if isinstance(res, OSError):
            raise res
        return res


@pytest.mark.parametrize(("size", "expected"), [(0, 1), (1, 1), (PAGE_SIZE, 1), (PAGE_SIZE + 1, 2)])
def test_buffer_is_page_aligned_and_whole_pages(size: int, expected: int) -> None:
    with AlignedBuffer(size) as buf:
        assert buf.size == len(buf) == expected * PAGE_SIZE
        assert address(buf) % PAGE_SIZE == 0
        buf.view[:3] = b"abc"
        assert bytes(buf.view[:3]) == b"abc"
    assert buf.closed


def test_buffer_close_tolerates_live_slices() -> None:
    buf = AlignedBuffer(PAGE_SIZE)
    piece = buf.view[:10]
    buf.close()  # the slice keeps the map alive; no BufferError
    assert bytes(piece) == bytes(10)
    piece.release()


@given(st.integers(0, 10**12), st.integers(1, 2**16))
def test_rounding(n: int, to: int) -> None:
    assert round_down(n, to) <= n <= round_up(n, to)
    assert round_up(n, to) % to == 0 and round_down(n, to) % to == 0
    assert round_up(n, to) - n < to and n - round_down(n, to) < to


@pytest.mark.parametrize(
    ("length", "offset", "limit", "expected"),
    [
        (100, 0, 10 * PAGE_SIZE, PAGE_SIZE),
        (PAGE_SIZE, 0, PAGE_SIZE, PAGE_SIZE),
        (PAGE_SIZE + 1, PAGE_SIZE, 3 * PAGE_SIZE + 1, 2 * PAGE_SIZE),
        (10, 2 * PAGE_SIZE, 2 * PAGE_SIZE + 10, PAGE_SIZE),  # the blob's tail
        (0, 0, PAGE_SIZE, 0),
    ],
)
def test_padded_length(length: int, offset: int, limit: int, expected: int) -> None:
    assert padded_length(length, offset, limit) == expected


@pytest.mark.parametrize(
    ("length", "offset", "limit"),
    [(10, 100, PAGE_SIZE), (10, PAGE_SIZE // 2, PAGE_SIZE), (2 * PAGE_SIZE, 0, PAGE_SIZE)],
)
def test_padded_length_refuses(length: int, offset: int, limit: int) -> None:
    with pytest.raises(ValueError):
        padded_length(length, offset, limit)


@given(st.integers(1, 8 * PAGE_SIZE), st.integers(0, 8), st.integers(0, 16 * PAGE_SIZE))
def test_padding_invariants(length: int, page: int, extra: int) -> None:
    offset = page * PAGE_SIZE
    limit = offset + length + extra
    padded = padded_length(length, offset, limit)
    assert padded % PAGE_SIZE == 0 or offset + padded == round_up(limit)
    assert length <= padded < length + PAGE_SIZE
    assert offset + padded <= round_up(limit)


def test_pwrite_pads_with_zeros_and_returns_the_padded_length() -> None:
    with AlignedBuffer(3 * PAGE_SIZE) as buf:
        buf.view[:] = b"\xaa" * buf.size
        rec = Recorder()
        assert pwrite_direct(rec, 5, buf, 100, 0, limit=10 * PAGE_SIZE) == PAGE_SIZE
        [(n, off, data)] = rec.calls
        assert (n, off) == (PAGE_SIZE, 0)
        assert data[:100] == b"\xaa" * 100 and data[100:] == bytes(PAGE_SIZE - 100)


def test_pwrite_clips_to_the_cache_file() -> None:
    with AlignedBuffer(3 * PAGE_SIZE) as buf:
        rec = Recorder()
        written = pwrite_direct(rec, 5, buf, PAGE_SIZE + 1, 2 * PAGE_SIZE, limit=3 * PAGE_SIZE + 1)
        assert written == 2 * PAGE_SIZE and rec.calls[0][:2] == (2 * PAGE_SIZE, 2 * PAGE_SIZE)


def test_pwrite_refuses_unaligned_offset_before_the_kernel() -> None:
    with AlignedBuffer(PAGE_SIZE) as buf:
        rec = Recorder()
        with pytest.raises(ValueError):
            pwrite_direct(rec, 5, buf, 10, 100, limit=10 * PAGE_SIZE)
        assert rec.calls == []


def test_pwrite_refuses_more_than_the_buffer() -> None:
    with AlignedBuffer(PAGE_SIZE) as buf, pytest.raises(ValueError):
        pwrite_direct(Recorder(), 5, buf, 2 * PAGE_SIZE, 0, limit=4 * PAGE_SIZE)


@pytest.mark.parametrize(
    ("returned", "ok"),
    [(PAGE_SIZE, True), (2 * PAGE_SIZE, True), (PAGE_SIZE - 1, False), (0, False)],
)
def test_return_value_rule(returned: int, ok: bool) -> None:
    """<= 6.12 returns the page-rounded length (>= asked: fine); less is a failure."""
    with AlignedBuffer(PAGE_SIZE) as buf:
        write = Recorder([returned])
        if ok:
            assert pwrite_direct(write, 5, buf, 10, 0, limit=PAGE_SIZE) == PAGE_SIZE
        else:
            with pytest.raises(OSError, match="short") as e:
                pwrite_direct(write, 5, buf, 10, 0, limit=PAGE_SIZE)
            assert e.value.errno == errno.EIO


def test_enobufs_is_retried_only_when_the_object_may_be_settling() -> None:
    enobufs = OSError(errno.ENOBUFS, "no buffer space")
    with AlignedBuffer(PAGE_SIZE) as buf:
        once = Recorder([enobufs])
        with pytest.raises(OSError) as e:
            pwrite_direct(once, 5, buf, 10, 0, limit=PAGE_SIZE)
        assert e.value.errno == errno.ENOBUFS and len(once.calls) == 1

        settling = Recorder([enobufs, enobufs])
        assert (
            pwrite_direct(
                settling,
                5,
                buf,
                10,
                0,
                limit=PAGE_SIZE,
                object_may_be_settling=True,
                retry_delay=0,
            )
            == PAGE_SIZE
        )
        assert len(settling.calls) == 3

        forever = Recorder([enobufs] * 10)
        with pytest.raises(OSError):
            pwrite_direct(
                forever,
                5,
                buf,
                10,
                0,
                limit=PAGE_SIZE,
                object_may_be_settling=True,
                retries=3,
                retry_delay=0,
            )
        assert len(forever.calls) == 4


def test_other_errors_are_never_retried() -> None:
    with AlignedBuffer(PAGE_SIZE) as buf:
        rec = Recorder([OSError(errno.EIO, "io")])
        with pytest.raises(OSError):
            pwrite_direct(rec, 5, buf, 10, 0, limit=PAGE_SIZE, object_may_be_settling=True)
        assert len(rec.calls) == 1


def test_real_odirect_write_from_an_aligned_buffer(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        pytest.skip("this filesystem has no O_DIRECT")
    try:
        with AlignedBuffer(2 * PAGE_SIZE) as buf:
            buf.view[:5] = b"hello"
            assert pwrite_direct(os.pwrite, fd, buf, 5, PAGE_SIZE, limit=PAGE_SIZE + 5) == PAGE_SIZE
            with pytest.raises(OSError) as e:  # the same bytes from Python memory
                os.pwrite(fd, b"x" * 100, 0)
            assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[PAGE_SIZE : PAGE_SIZE + 5] == b"hello" and len(data) == 2 * PAGE_SIZE


def test_pool_reuses_and_bounds_buffers() -> None:
    pool = BufferPool(PAGE_SIZE + 1, 2)
    assert pool.buf_size == pool.size == 2 * PAGE_SIZE
    with pool.borrow() as a, pool.borrow() as b:
        assert a is not b and a.size == 2 * PAGE_SIZE
        with pytest.raises(TimeoutError), pool.borrow(timeout=0.01):
            pass
        first = {id(a), id(b)}
    with pool.borrow() as c:
        assert id(c) in first
    pool.close()


def test_pool_borrow_blocks_until_a_buffer_comes_back() -> None:
    pool = BufferPool(PAGE_SIZE, 1)
    got = threading.Event()
    with pool.borrow() as held:

        def waiter() -> None:
            with pool.borrow() as buf:
                assert buf is held
                got.set()

        t = threading.Thread(target=waiter)
        t.start()
        assert not got.wait(0.05)
    t.join(10)
    assert got.is_set()
    pool.close()


def test_pool_close_unmaps_returned_buffers() -> None:
    pool = BufferPool(PAGE_SIZE, 2)
    with pool.borrow() as buf:
        pool.close()
        assert not buf.closed
    assert buf.closed
    with pytest.raises(RuntimeError), pool.borrow():
        pass

"""The fd holder on real fds: CLOEXEC at once, close exactly once, deferred close while
borrowed (the fd-number reuse race, docs/protocol-ondemand.md §3.3)."""

from __future__ import annotations

import fcntl
import gc
import os
import threading
import warnings
from collections.abc import Iterator

import pytest

from cachefilesd_py.kernel.fd import ClosedFdError, OwnedFd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """An inheritable pipe (as the kernel's anon fds arrive: without CLOEXEC)."""
    r, w = os.pipe2(0)
    yield r, w
    for fd in (r, w):
        if is_open(fd):
            os.close(fd)


class CountingCloser:
    def __init__(self) -> None:
        self.closed: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        with self.lock:
            self.closed.append(fd)
        os.close(fd)


def test_sets_cloexec_at_once(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    assert not fcntl.fcntl(r, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    holder = OwnedFd(r)
    assert fcntl.fcntl(r, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    holder.close()


def test_closes_exactly_once(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    closer = CountingCloser()
    holder = OwnedFd(r, closer)
    assert holder.fileno() == r and not holder.closed
    holder.close()
    holder.close()
    assert closer.closed == [r]
    assert holder.fileno() == -1 and holder.closed and not is_open(r)


def test_borrow_after_close_raises_ebadf(pipe: tuple[int, int]) -> None:
    holder = OwnedFd(pipe[0])
    holder.close()
    with pytest.raises(ClosedFdError) as e, holder.borrow():
        pass
    assert e.value.errno == 9


def test_close_while_borrowed_is_deferred_to_the_last_borrower(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    closer = CountingCloser()
    holder = OwnedFd(r, closer)
    with holder.borrow() as fd1:
        with holder.borrow() as fd2:
            assert fd1 == fd2 == r and holder.borrows == 2
            holder.close()
            assert holder.fileno() == -1, "fileno must say closed at once"
            with pytest.raises(ClosedFdError), holder.borrow():
                pass
            assert is_open(r) and closer.closed == []
        assert is_open(r), "closed while the outer borrow still runs"
    assert closer.closed == [r] and not is_open(r)


def test_close_from_another_thread_waits_for_the_borrower(pipe: tuple[int, int]) -> None:
    r, w = pipe
    holder = OwnedFd(r)
    inside = threading.Event()
    release = threading.Event()
    seen: list[bytes] = []

    def worker() -> None:
        with holder.borrow() as fd:
            inside.set()
            release.wait(10)
            seen.append(os.read(fd, 5))  # EBADF here would mean the race is open

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    holder.close()
    os.write(w, b"hello")
    assert is_open(r)
    release.set()
    t.join(10)
    assert seen == [b"hello"] and not is_open(r)


def test_many_threads_borrow_while_one_closes(pipe: tuple[int, int]) -> None:
    """Hammer: every borrow that got in sees a live fd; the fd is closed exactly once,
    after the last of them; every thread is refused once close() has happened."""
    r, _ = pipe
    closer = CountingCloser()
    holder = OwnedFd(r, closer)
    start = threading.Barrier(9)
    problems: list[str] = []
    borrowed = [0] * 8

    def borrower(i: int) -> None:
        start.wait()
        while True:  # until refused: close() is bound to happen
            try:
                with holder.borrow() as fd:
                    if not is_open(fd):
                        problems.append(f"fd {fd} closed under a borrower")
                    borrowed[i] += 1
            except ClosedFdError:
                return

    threads = [threading.Thread(target=borrower, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    start.wait()
    holder.close()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert problems == []
    assert closer.closed == [r] and not is_open(r)


def test_bogus_fd_is_refused() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError) as e:
        OwnedFd(fd)
    assert e.value.errno == 9


def test_unclosed_holder_closes_in_del_with_a_warning(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    holder = OwnedFd(r)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del holder
        gc.collect()
    assert not is_open(r)
    assert any(issubclass(w.category, ResourceWarning) for w in caught)


def test_closed_holder_del_is_silent(pipe: tuple[int, int]) -> None:
    holder = OwnedFd(pipe[0])
    holder.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del holder
        gc.collect()
    assert caught == []


def test_context_manager_closes(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    with OwnedFd(r) as holder:
        assert holder.fileno() == r
    assert not is_open(r)

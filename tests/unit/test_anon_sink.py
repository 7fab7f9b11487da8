"""A fill that meets ENOBUFS below *stop* asks the culler for room and writes again."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefilesd_py.frontends.ondemand.objects import AnonFdSink
from cachefilesd_py.kernel.dio import AlignedBuffer
from cachefilesd_py.kernel.fd import OwnedFd

PAGE = 4096


class RefusingDevice:
    """pwrite refuses with ENOBUFS until ``room`` becomes True (a cull pass freed space)."""

    def __init__(self) -> None:
        self.room = False
        self.refused = 0

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        if not self.room:
            self.refused += 1
            raise OSError(errno.ENOBUFS, "below stop")
        return os.pwrite(fd, data, offset)


@dataclass
class _Blob:
    size: int


@dataclass
class _Obj:
    fd: OwnedFd
    blob: _Blob


@pytest.fixture
def obj(tmp_path: Path) -> _Obj:
    return _Obj(OwnedFd(os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)), _Blob(2 * PAGE))


def filled(n: int) -> AlignedBuffer:
    buf = AlignedBuffer(PAGE)
    buf.view[:n] = b"x" * n
    return buf


def test_write_succeeds_after_the_culler_makes_room(obj: _Obj) -> None:
    dev = RefusingDevice()
    calls = []

    def make_room() -> bool:
        calls.append(1)
        dev.room = len(calls) == 2  # the second pass frees enough
        return True

    AnonFdSink(dev, obj, make_room).write(0, filled(100), 100)  # type: ignore[arg-type]
    assert len(calls) == 2
    assert os.pread(obj.fd.fileno(), 100, 0) == b"x" * 100


def test_gives_up_when_no_room_comes(obj: _Obj) -> None:
    dev = RefusingDevice()
    calls = []

    def make_room() -> bool:
        calls.append(1)
        return True

    with pytest.raises(OSError) as e:
        AnonFdSink(dev, obj, make_room).write(0, filled(100), 100)  # type: ignore[arg-type]
    assert e.value.errno == errno.ENOBUFS
    assert len(calls) == AnonFdSink.ROOM_ATTEMPTS


def test_stopping_daemon_fails_the_write_at_once(obj: _Obj) -> None:
    dev = RefusingDevice()
    calls = []

    def make_room() -> bool:  # the daemon is stopping: no cull pass will come
        calls.append(1)
        return False

    with pytest.raises(OSError):
        AnonFdSink(dev, obj, make_room).write(0, filled(100), 100)  # type: ignore[arg-type]
    assert len(calls) == 1


def test_without_a_culler_enobufs_is_final(obj: _Obj) -> None:
    dev = RefusingDevice()
    with pytest.raises(OSError):
        AnonFdSink(dev, obj).write(0, filled(100), 100)  # type: ignore[arg-type]
    assert dev.refused > 0

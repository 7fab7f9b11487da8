"""The kernel contract cases against the fake (the guest tier runs the same cases on
the real kernel: tests/vm/test_kernel_contract_guest.py)."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefilesd_py.testing.fake_kernel import FakeCachefiles, FakeObject
from cachefilesd_py.testing.kernel_contract import CASES, KernelHarness
from cachefilesd_py.testing.pattern import pattern_bytes


class FakeMount:
    """What an EROFS mount does to the fake: look the blob up, read its superblock."""

    def __init__(self, h: FakeHarness, fsid: str) -> None:
        self.h = h
        self.obj: FakeObject | None = None
        self.error: int | None = None
        self.done = threading.Event()
        threading.Thread(target=self._mount, args=(fsid,), daemon=True).start()

    def _mount(self, fsid: str) -> None:
        try:
            self.obj = self.h.device.lookup(b"erofs," + fsid.encode(), fsid.encode(), 30)
            self.obj.read(0, 4096, 30)
            self.error = 0
        except OSError:
            # EROFS reports any failed cookie lookup or superblock read as EIO
            self.error = errno.EIO
        finally:
            self.done.set()

    def wait(self, timeout: float) -> int:
        if not self.done.wait(timeout):
            return errno.ETIMEDOUT
        return self.error or 0

    def read(self, offset: int, length: int) -> bytes:
        assert self.obj is not None
        return self.obj.read(self.h.payload_offset + offset, length, 30)

    def umount(self) -> None:
        assert self.obj is not None
        self.obj.withdraw(30)


class FakeHarness:
    def __init__(self, cache: Path) -> None:
        self.device = FakeCachefiles()
        self.device.write_command(b"dir " + str(cache).encode())
        self.device.write_command(b"bind ondemand")
        self.payload_offset = 8192
        self.payload = pattern_bytes(4, 0, 100_000)
        self.image = bytes(self.payload_offset) + self.payload + bytes(3000)

    def mount(self, fsid: str) -> FakeMount:
        return FakeMount(self, fsid)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_contract_on_fake(case: Callable[[KernelHarness], None], tmp_path: Path) -> None:
    h = FakeHarness(tmp_path)
    try:
        case(h)
    finally:
        h.device.close()

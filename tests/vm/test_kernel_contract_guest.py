"""The kernel contract cases (cachefilesd_py/testing/kernel_contract.py) on the real
6.12 kernel: the same expectations the fake is held to in the integration tier."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cachefilesd_py.frontends.ondemand import wire
from cachefilesd_py.kernel.device import CachefilesDevice
from cachefilesd_py.testing.kernel_contract import CASES, KernelHarness
from cachefilesd_py.testing.pattern import pattern_bytes
from tests.vm.rig import mkfs_erofs, run

pytestmark = [pytest.mark.guest, pytest.mark.ondemand]

_libc = ctypes.CDLL(None, use_errno=True)


class RealMount:
    """mount(2) called directly (util-linux would turn ENOENT into "special device
    none does not exist"), in a thread, because it blocks until the daemon answers."""

    def __init__(self, mnt: Path, fsid: str) -> None:
        self.mnt = mnt
        mnt.mkdir(parents=True, exist_ok=True)
        self.result: int | None = None
        self.mounted = False
        self._thread = threading.Thread(target=self._mount, args=(fsid,), daemon=True)
        self._thread.start()

    def _mount(self, fsid: str) -> None:
        ret = _libc.mount(b"none", str(self.mnt).encode(), b"erofs", 0, f"fsid={fsid}".encode())
        self.result = 0 if ret == 0 else ctypes.get_errno()
        self.mounted = ret == 0

    def wait(self, timeout: float) -> int:
        self._thread.join(timeout if timeout > 0 else 0.001)
        return errno.ETIMEDOUT if self.result is None else self.result

    def read(self, offset: int, length: int) -> bytes:
        fd = os.open(self.mnt / "payload.bin", os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def umount(self) -> None:
        run("umount", str(self.mnt))
        self.mounted = False


class RecordingDevice(CachefilesDevice):
    """The real device, remembering every anonymous fd handed out so that a failed
    case cannot leave one open (an open anon fd keeps /dev/cachefiles busy)."""

    def __init__(self) -> None:
        super().__init__()
        self.anon: set[int] = set()

    def read_message(self) -> bytes:
        buf = super().read_message()
        if buf:
            req = wire.decode(buf)
            if isinstance(req, wire.OpenRequest):
                self.anon.add(req.fd)
        return buf

    def close_fd(self, fd: int) -> None:
        self.anon.discard(fd)
        super().close_fd(fd)

    def close(self) -> None:
        for fd in self.anon:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.anon.clear()
        super().close()


class RealHarness:
    def __init__(self, work: Path, cache: Path) -> None:
        self.work = work
        src = work / "src"
        src.mkdir()
        self.payload = pattern_bytes(4, 0, 256 * 1024)
        (src / "payload.bin").write_bytes(self.payload)
        image = mkfs_erofs(work / "contract.erofs", src, "-Enoinline_data")
        self.image = image.read_bytes()
        self.payload_offset = self.image.find(self.payload[:8192])
        assert self.payload_offset > 0 and self.payload_offset % 4096 == 0
        self.device = RecordingDevice()
        for cmd in (b"dir " + str(cache).encode(), b"tag contract", b"bind ondemand"):
            self.device.write_command(cmd)
        self.mounts: list[RealMount] = []

    def mount(self, fsid: str) -> RealMount:
        m = RealMount(self.work / f"mnt-{fsid}", fsid)
        self.mounts.append(m)
        return m


@pytest.fixture
def harness(workdir: Path, loop_fs: Callable[..., Path]) -> Iterator[RealHarness]:
    h = RealHarness(workdir, loop_fs(64))
    yield h
    for m in h.mounts:
        if m.mounted:
            run("umount", str(m.mnt), check=False)
    h.device.close()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_contract_on_real_kernel(
    case: Callable[[KernelHarness], None], harness: RealHarness
) -> None:
    case(harness)

"""The kernel contract cases (cachefilesd_py/testing/kernel_contract.py) on the real
6.12 kernel: the same expectations the fake is held to in the integration tier."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cachefilesd_py.kernel.device import CachefilesDevice
from cachefilesd_py.testing.kernel_contract import CASES, KernelHarness
from cachefilesd_py.testing.pattern import pattern_bytes
from tests.vm.rig import mkfs_erofs, run

pytestmark = pytest.mark.guest

STRERROR = {os.strerror(i): i for i in range(1, 134)}


class RealMount:
    def __init__(self, mnt: Path, fsid: str) -> None:
        self.mnt = mnt
        mnt.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["mount", "-t", "erofs", "none", "-o", f"fsid={fsid}", str(mnt)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.mounted = False

    def wait(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout if timeout > 0 else 0.001)
        except subprocess.TimeoutExpired:
            return errno.ETIMEDOUT
        if self.proc.returncode == 0:
            self.mounted = True
            return 0
        err = self.proc.stderr.read() if self.proc.stderr else ""
        for text, number in STRERROR.items():
            if text in err:
                return number
        return errno.EIO

    def read(self, offset: int, length: int) -> bytes:
        fd = os.open(self.mnt / "payload.bin", os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def umount(self) -> None:
        run("umount", str(self.mnt))
        self.mounted = False


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
        self.device = CachefilesDevice()
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

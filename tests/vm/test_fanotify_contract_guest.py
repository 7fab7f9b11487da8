"""The fanotify kernel contract (cachefilesd_py/testing/fanotify_contract.py) on the real
7.3 kernel: pre-content events on a sparse file on ext4 (every case) and xfs (the core
cases), that file mounted as file-backed EROFS. What each case measured is left in
``$CACHEFILESD_VM_RESULTS/fanotify-contract.json`` (docs/protocol-fanotify.md quotes it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cachefilesd_py.frontends.fanotify import wire
from cachefilesd_py.kernel import _sys, fanotify, mount
from cachefilesd_py.kernel.fd import OwnedFd
from cachefilesd_py.testing.fanotify_contract import (
    CASES,
    CORE_CASES,
    STEP_TIMEOUT,
    Group,
    Observations,
    PreContentHarness,
)
from cachefilesd_py.testing.pattern import pattern_bytes
from tests.vm.rig import mkfs_erofs

pytestmark = [pytest.mark.guest, pytest.mark.fanotify]

MAX_QUEUED = Path("/proc/sys/fs/fanotify/max_queued_events")


class RealGroup:
    def __init__(self, queue_limit: int | None) -> None:
        if queue_limit is None:
            self.fd = fanotify.pre_content_group()
        else:
            # the limit is read from the sysctl when the group is made
            saved = MAX_QUEUED.read_text()
            MAX_QUEUED.write_text(str(queue_limit))
            try:
                self.fd = fanotify.pre_content_group(unlimited_queue=False)
            finally:
                MAX_QUEUED.write_text(saved)
        self.event_fds: set[int] = set()

    def fileno(self) -> int:
        return self.fd.fileno()

    def mark(self, path: Path) -> None:
        fanotify.mark_pre_access(self.fd.fileno(), path)

    def unmark(self, path: Path) -> None:
        fanotify.unmark_pre_access(self.fd.fileno(), path)

    def ignore(self, path: Path) -> None:
        fanotify.ignore_pre_access(self.fd.fileno(), path)

    def read(self) -> bytes:
        raw = fanotify.read_events(self.fd.fileno())
        with contextlib.suppress(wire.MalformedEvent):
            self.event_fds.update(e.fd for e in wire.decode_events(raw) if e.fd >= 0)
        return raw

    def queued_bytes(self) -> int:
        return fanotify.queued_bytes(self.fd.fileno())

    def respond(self, record: bytes) -> None:
        fanotify.write_response(self.fd.fileno(), record)

    def pwrite(self, event_fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(event_fd, data, offset)

    def same_file(self, event_fd: int, path: Path) -> bool:
        a, b = os.fstat(event_fd), os.stat(path)
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def close_fd(self, event_fd: int) -> None:
        self.event_fds.discard(event_fd)
        os.close(event_fd)

    def close(self) -> None:
        self.fd.close()
        for fd in self.event_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.event_fds.clear()


#: the other holder of a group: takes its lower fds, reads one event (a 48-byte buffer
#: holds one pre-content event, so later ones stay queued), reports it, waits
HOLDER = r"""
import os, select, sys
group = int(sys.argv[1])
target = int(sys.stdin.readline())
pad = []
while True:
    fd = os.open("/dev/null", os.O_RDONLY)
    if fd >= target:
        os.close(fd)
        break
    pad.append(fd)
select.select([group], [], [])
raw = os.read(group, 48)
sys.stdout.write(raw.hex() + "\n")
sys.stdout.flush()
sys.stdin.readline()
"""


class RealHolder:
    def __init__(self, group: Group) -> None:
        fd = group.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", HOLDER, str(fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(fd,),
        )

    def read_one(self, fd_number: int) -> wire.Event:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{fd_number}\n".encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], STEP_TIMEOUT)
        assert ready, "the holder read no event in time"
        (ev,) = wire.decode_events(bytes.fromhex(self.proc.stdout.readline().decode()))
        return ev

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


class RealHarness:
    def __init__(self, work: Path, cache: Path) -> None:
        self.work = work
        self.cache = cache
        src = work / "src"
        src.mkdir()
        self.payload_name = "payload.bin"
        self.payload = pattern_bytes(6, 0, 256 * 1024)
        (src / self.payload_name).write_bytes(self.payload)
        (src / "small.txt").write_bytes(b"metadata and a small file\n")
        self.image = mkfs_erofs(work / "contract.erofs", src, "-Enoinline_data").read_bytes()
        self.payload_offset = self.image.find(self.payload[:8192])
        assert self.payload_offset > 0 and self.payload_offset % 4096 == 0
        self.reader_pid = os.getpid()
        self.groups: list[RealGroup] = []
        self.mounts: list[Path] = []
        self.open_fds: list[OwnedFd] = []
        self.holders: list[RealHolder] = []
        self._n = 0

    def backing_file(self, name: str, *, filled: bool = False) -> Path:
        path = self.cache / name
        with open(path, "xb") as f:
            if filled:
                f.write(self.image)
            else:
                f.truncate(len(self.image))
        return path

    def group(self, *, queue_limit: int | None = None) -> RealGroup:
        g = RealGroup(queue_limit)
        self.groups.append(g)
        return g

    def read_file(self, path: Path, offset: int, length: int) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def open_file(self, path: Path) -> Callable[[int, int], bytes]:
        owned = OwnedFd(os.open(path, os.O_RDONLY))
        self.open_fds.append(owned)

        def pread(offset: int, length: int) -> bytes:
            with owned.borrow() as fd:
                return os.pread(fd, length, offset)

        return pread

    def write_file(self, path: Path, data: bytes, offset: int) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def punch(self, path: Path, offset: int, length: int) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            _sys.punch_hole(fd, offset, length)
        finally:
            os.close(fd)

    def mount(self, backing: Path, *, by_fd: bool = False) -> Path:
        self._n += 1
        mnt = self.work / f"mnt-{self._n}"
        mnt.mkdir()
        if by_fd:
            with OwnedFd(os.open(backing, os.O_RDONLY)) as src:
                mount.mount_fd(src.fileno(), mnt)
        else:
            mount.mount_file(backing, mnt)
        self.mounts.append(mnt)
        return mnt

    def umount(self, mnt: Path) -> None:
        mount.umount(mnt)
        self.mounts.remove(mnt)

    def holder(self, group: Group) -> RealHolder:
        h = RealHolder(group)
        self.holders.append(h)
        return h

    def lowest_free_fd(self) -> int:
        fd = os.dup(0)
        os.close(fd)
        return fd

    def close(self) -> None:
        # groups first: closing them lets any reader or mount still waiting go on
        for h in self.holders:
            if h.proc.poll() is None:
                h.kill()
        for g in self.groups:
            g.close()
        for owned in self.open_fds:
            owned.close()
        for mnt in reversed(self.mounts):
            with contextlib.suppress(OSError):
                mount.umount(mnt, detach=True)


@pytest.fixture
def fs_type(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def harness(workdir: Path, loop_fs: Callable[..., Path], fs_type: str) -> Iterator[RealHarness]:
    # mkfs.xfs wants 300 MiB at least; the image file is sparse
    h = RealHarness(workdir, loop_fs(320 if fs_type == "xfs" else 64, fs_type))
    try:
        yield h
    finally:
        h.close()


def record(name: str, seen: Observations) -> None:
    results = os.environ.get("CACHEFILESD_VM_RESULTS")
    if not results:
        return
    path = Path(results) / "fanotify-contract.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = seen
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def _cases() -> list[object]:
    out: list[object] = []
    for case in CASES:
        for fs in ("ext4", "xfs"):
            if fs == "xfs" and case not in CORE_CASES:
                continue
            out.append(pytest.param(case, fs, id=f"{case.__name__}-{fs}"))
    return out


@pytest.mark.parametrize(("case", "fs_type"), _cases(), indirect=["fs_type"])
def test_fanotify_contract_on_real_kernel(
    case: Callable[[PreContentHarness], Observations], fs_type: str, harness: RealHarness
) -> None:
    seen = case(harness)
    record(f"{case.__name__}[{fs_type}]", seen)


def test_pre_content_marks_are_refused_on_tmpfs(workdir: Path) -> None:
    """Filesystems opt in to pre-content events: on tmpfs the mark fails (EOPNOTSUPP),
    so the cache must live on ext4, xfs or btrfs."""
    tmp = workdir / "tmpfs"
    tmp.mkdir()
    mount.mount("tmpfs", tmp, "tmpfs", 0, "size=1m")
    try:
        (tmp / "f").write_bytes(b"x")
        with fanotify.pre_content_group() as g, pytest.raises(OSError) as caught:
            fanotify.mark_pre_access(g.fileno(), tmp / "f")
        assert caught.value.errno == errno.EOPNOTSUPP
    finally:
        mount.umount(tmp)


def test_mount_errors_carry_the_kernels_text(workdir: Path, loop_fs: Callable[..., Path]) -> None:
    """With the new mount API the kernel explains a refusal in words (read back from the
    context fd); the legacy call gives the bare errno. A file on tmpfs cannot back EROFS
    (no read path): ENOTBLK."""
    cache = loop_fs(64)
    image = cache / "not-an-image"
    image.write_bytes(b"\0" * 8192)
    mnt = workdir / "mnt-errors"
    mnt.mkdir()
    with OwnedFd(os.open(image, os.O_RDONLY)) as src:
        with pytest.raises(OSError) as bogus:
            mount.mount_fd(src.fileno(), mnt, options=["bogus_option"])
        assert bogus.value.errno == errno.EINVAL
        assert "bogus_option" in str(bogus.value), str(bogus.value)
        with pytest.raises(OSError) as empty:
            mount.mount_fd(src.fileno(), mnt)
        assert empty.value.errno == errno.EINVAL, empty.value
    tmp = workdir / "tmpfs-src"
    tmp.mkdir()
    mount.mount("tmpfs", tmp, "tmpfs", 0, "size=1m")
    try:
        (tmp / "img").write_bytes(b"\0" * 8192)
        with pytest.raises(OSError) as on_tmpfs:
            mount.mount_file(tmp / "img", mnt)
        assert on_tmpfs.value.errno == errno.ENOTBLK
    finally:
        mount.umount(tmp)

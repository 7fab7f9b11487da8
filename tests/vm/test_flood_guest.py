"""A READ flood under a memory ceiling: many readers on many blobs, the daemon in a
cgroup v2 with ``memory.max``. Every byte read must be right, the daemon must stay
alive and under the ceiling (no OOM kill): its requests queue in the kernel when its
own queues are full, and its fill buffers are a fixed pool."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vm.rig import Daemon, Nginx, mkfs_erofs, mount_tracked, run, umount_tracked

pytestmark = pytest.mark.guest

IMAGES = 6
FILES = 3
FILE_SIZE = 1 << 20
READERS = 32
READS_EACH = 24
CEILING = 200 << 20
CGROUP_ROOT = Path("/sys/fs/cgroup")


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """A fresh cgroup v2 with the memory controller and ``memory.max`` = CEILING."""
    if not (CGROUP_ROOT / "cgroup.controllers").exists():
        run("mount", "-t", "cgroup2", "none", str(CGROUP_ROOT))
    if "memory" not in (CGROUP_ROOT / "cgroup.subtree_control").read_text().split():
        (CGROUP_ROOT / "cgroup.subtree_control").write_text("+memory\n")
    group = CGROUP_ROOT / f"cfpy-flood-{os.getpid()}"
    group.mkdir()
    (group / "memory.max").write_text(f"{CEILING}\n")
    (group / "memory.swap.max").write_text("0\n")
    yield group
    for pid in (group / "cgroup.procs").read_text().split():
        run("kill", "-9", pid, check=False)
    deadline = time.monotonic() + 30
    while (group / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    group.rmdir()


def memory_events(group: Path) -> dict[str, int]:
    return {
        k: int(v)
        for k, v in (line.split() for line in (group / "memory.events").read_text().splitlines())
    }


@pytest.mark.timeout(1500)
def test_a_read_flood_stays_under_a_memory_ceiling(
    workdir: Path,
    loop_fs: Callable[..., Path],
    nginx: Callable[[Path], Nginx],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
    cgroup: Path,
) -> None:
    blobs = workdir / "blobs"
    blobs.mkdir()
    rng = random.Random(7)
    files: dict[str, bytes] = {}
    for i in range(IMAGES):
        src = workdir / f"src{i}"
        src.mkdir()
        for j in range(FILES):
            data = rng.randbytes(FILE_SIZE)
            (src / f"f{j}.bin").write_bytes(data)
            files[f"{i}/f{j}.bin"] = data
        mkfs_erofs(blobs / f"img{i}.erofs", src, "-Enoinline_data")
    cache = loop_fs(256)
    srv = nginx(blobs)
    d = daemon(f"dir {cache}\ntag flood\nondemand\nsource * {srv.url}/{{cookie}}\nchunk_size 64K\n")
    d.cgroup = cgroup
    d.debug = False  # a debug line per READ would measure the log, not the daemon
    try:
        d.start(timeout=300)
    except RuntimeError as exc:
        raise AssertionError(
            f"{exc}\nmemory.current {(cgroup / 'memory.current').read_text().strip()}, "
            f"events {memory_events(cgroup)}, procs {(cgroup / 'cgroup.procs').read_text()!r}"
        ) from None
    mnts = []
    for i in range(IMAGES):
        mnt = workdir / f"mnt{i}"
        mount_tracked(mnt, f"img{i}.erofs", mounts)
        mnts.append(mnt)
    run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")

    wrong: list[str] = []
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        r = random.Random(seed)
        try:
            for _ in range(READS_EACH):
                name = r.choice(sorted(files))
                image, fname = name.split("/")
                off = r.randrange(0, FILE_SIZE - 4096) & ~4095
                n = r.choice([4096, 65536, 200_000])
                with open(mnts[int(image)] / fname, "rb", buffering=0) as f:
                    f.seek(off)
                    got = f.read(n)
                if got != files[name][off : off + n]:
                    wrong.append(f"{name}@{off}+{n}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not wrong, wrong[:10]
    # and every file whole, once more, from the cache
    for name, data in files.items():
        image, fname = name.split("/")
        got = (mnts[int(image)] / fname).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name
    assert d.proc is not None and d.proc.poll() is None, "the daemon died"
    events = memory_events(cgroup)
    peak = int((cgroup / "memory.peak").read_text())
    assert events.get("oom_kill", 0) == 0 and events.get("oom", 0) == 0, events
    assert peak <= CEILING
    for mnt in mnts:
        umount_tracked(mnt, mounts)
    assert d.stop() == 0
    stats = [e for e in d.read_events() if e.get("event") == "stats"][-1]
    assert stats["reads_failed"] == 0, stats
    print(
        f"flood: peak {peak >> 20} MiB of {CEILING >> 20} MiB; events {events}; "
        f"reads {stats['reads']}, pauses {stats.get('read_pauses')}, rss {stats['rss_mib']}"
    )

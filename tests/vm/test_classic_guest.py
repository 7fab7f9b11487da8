"""Classic mode on the real kernel: 9p with ``cache=fscache`` fills a small cache past
``bcull``; the daemon culls it back toward ``brun`` while a reader keeps reading correct
data; the object of a file held open is never culled; the graveyard ends empty.

How 9p fills its cache on 6.12: netfs marks the folios it read for copying to the cache
and writeback writes them (in bursts; hence the ``sync`` after each few files). The
kernel refuses a cache write when free blocks minus the blocks of writes still in flight
would fall below *stop*, so a burst larger than about half the free space is partly
dropped (``/proc/fs/fscache/stats``: ``NoSpace nwr``): not an error, the data is simply
not cached. Keeping bursts small lets the cache really fill.

What is in use: 9p holds a cookie for every regular-file inode in memory, and cachefiles
answers ``cull`` with EBUSY while the cookie lives (it is withdrawn about 10 s after the
inode is evicted: fscache's cookie LRU). Dropping the inode cache makes objects
cullable, except the one of the file held open.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefilesd_py.kernel.layout import object_file_name
from tests.vm.rig import Daemon, run, sha256_file

pytestmark = pytest.mark.guest

FILES = 28
SIZE = 2 << 20


def free_pct(path: Path) -> float:
    st = os.statvfs(path)
    return 100 * st.f_bavail / st.f_blocks


def at_or_above(path: Path, percent: int) -> bool:
    """The kernel's own test: it turns a percentage into ``f_blocks / 100 * percent``
    blocks at bind time (integer division), a hair below ``percent`` of the blocks."""
    st = os.statvfs(path)
    return st.f_bavail >= (st.f_blocks // 100) * percent


def cache_object_of(cache: Path, file: Path) -> Path | None:
    """The cache file of a 9p file: its cookie key is the little-endian qid.path, and a
    64-bit guest shows qid.path + 2 as the inode number (fs/9p/v9fs_vfs.h)."""
    name = object_file_name(struct.pack("<Q", os.stat(file).st_ino - 2))
    found = list((cache / "cache").glob(f"I9p,*/@*/{name}"))
    return found[0] if found else None


def test_classic_culls_a_9p_cache_back_toward_run(
    workdir: Path, loop_fs: Callable[..., Path], daemon: Callable[[str], Daemon]
) -> None:
    share, tag = Path(os.environ["CACHEFILESD_9P_DIR"]), os.environ["CACHEFILESD_9P_TAG"]
    digests = {}
    for i in range(FILES):
        data = os.urandom(SIZE)
        (share / f"f{i:02}.bin").write_bytes(data)
        digests[f"f{i:02}.bin"] = hashlib.sha256(data).hexdigest()
    run("umount", str(share))  # remounted below with the cache on
    cache = loop_fs(64)
    d = daemon(
        f"dir {cache}\ntag classic\nbrun 60%\nbcull 45%\nbstop 10%\nfrun 10%\nfcull 7%\nfstop 3%\n"
    )
    d.start()
    mnt = workdir / "p9"
    mnt.mkdir()
    run("mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,cache=fscache", tag, str(mnt))
    held_name = "f00.bin"
    try:
        # cache the held file's data and let its object be committed into the tree (a
        # new object is an unlinked tmpfile until its cookie is withdrawn), then hold
        # it open: from now on the kernel has that cache file in use
        assert sha256_file(mnt / held_name) == digests[held_name]
        run("sync")
        run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        held_obj = None
        deadline = time.monotonic() + 60
        while held_obj is None and time.monotonic() < deadline:
            time.sleep(0.5)
            held_obj = cache_object_of(cache, mnt / held_name)
        if held_obj is None:
            ino = os.stat(mnt / held_name).st_ino
            tree = run("sh", "-c", f"find {cache}/cache -type f | head -50").stdout
            want = object_file_name(struct.pack("<Q", ino - 2))
            pytest.fail(f"the held file's object {want} (ino {ino}) is not in\n{tree}")
        with open(mnt / held_name, "rb") as held:
            assert hashlib.sha256(held.read()).hexdigest() == digests[held_name]
            lowest = 100.0
            for n, (name, digest) in enumerate(sorted(digests.items())):
                assert sha256_file(mnt / name) == digest, name
                if n % 4 == 3:
                    run("sync")  # write back the folios marked for the cache
                    lowest = min(lowest, free_pct(cache))
                    run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")  # inodes too
                held.seek(0)
                assert hashlib.sha256(held.read()).hexdigest() == digests[held_name]
            deadline = time.monotonic() + 30
            while not at_or_above(cache, 60) and time.monotonic() < deadline:
                time.sleep(0.5)
            freed_to, back_to_run = free_pct(cache), at_or_above(cache, 60)
            assert held_obj.exists(), "the object of a file in use was culled"
            # and a second round still reads correct bytes (from cache or server)
            run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
            for name, digest in sorted(digests.items()):
                assert sha256_file(mnt / name) == digest, name
    finally:
        run("umount", str(mnt), check=False)
    deadline = time.monotonic() + 20
    while any((cache / "graveyard").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert d.stop() == 0
    stats = [e for e in d.read_events() if e.get("event") == "stats"][-1]
    fscache = run("cat", "/proc/fs/fscache/stats").stdout
    # The kernel's cull flag is the judge: set when free space fell below bcull (the
    # daemon culls within a poll interval, so samples taken between files may never
    # see it below), cleared only once free space is back at brun. Writes that land
    # after that (pending writeback) may lower it again without reaching bcull: the
    # hysteresis lets them, so the cache ends between bcull and brun, not at brun.
    names = [str(e.get("event")) for e in d.read_events()]
    assert "kernel.cull_requested" in names, (
        f"the cache never went below bcull (lowest seen {lowest:.1f}%)\n{fscache}"
    )
    assert int(stats["culled"]) > 0, stats  # type: ignore[call-overload]
    first = names.index("kernel.cull_requested")
    assert "kernel.cull_satisfied" in names[first:], "culling never got back to brun"
    assert back_to_run or freed_to >= 45, f"the cache ended below bcull: {freed_to:.2f}%"
    assert list((cache / "graveyard").iterdir()) == []

"""The pieces of one classic-mode cull, timed one by one on the real kernel.

Run by ``python -m bench.bench_classic --probe`` (in the guest). On a fresh copy of the
benchmark cache, bound by this process with limits that never ask for culls, each case
runs on its own slice of objects, taken in LRU order (oldest first, so spread over the
fan-out directories as a daemon's victims are), and reports microseconds per object:

- ``write to /dev/null``: the floor, a Python ``os.write`` of a cull command that the
  kernel does nothing with;
- ``read state line``: one ``read()`` of the device (the kernel runs ``statfs`` and
  formats the state line), what a daemon pays each time it asks whether to go on;
- ``cull, cwd already in the directory``: only the ``cull`` writes, the working
  directory set once per directory beforehand: the kernel's own round trip (look-up,
  unlink, ext4 freeing the blocks) plus the floor;
- ``fchdir(cached dir fd) + cull``: two syscalls per object, directory fds opened once;
- ``cull_one() (kernel/device.py)``: cachefilesd-py's path today: ``open(".")``,
  ``chdir(path)`` (a path walk from ``/``), the write, ``fchdir`` back, ``close``,
  under a lock;
- ``inotify event, applied by the index``: :class:`TreeIndex` watching the cache while
  ``cull_one`` culls a slice, then ``refresh()`` timed: the cost of the daemon's own
  culls coming back to it as events (and which events they are);
- ``stat`` of an object (a pass's per-object cost when it ranks the known objects), and
  a whole ``TreeIndex.scan(4096)``;
- ``structlog JSON line``: one ``log.info`` with four fields through the daemon's JSON
  logging configuration, to ``/dev/null``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import inotify_simple

from bench.classic_cache import BuiltCache, copy_image, fill_binding, mounted
from cachefilesd_py.kernel.device import CachefilesDevice, cull_one
from cachefilesd_py.space.tree_index import WATCH_MASK, TreeIndex


def lru_objects(root: Path) -> list[tuple[str, str]]:
    """(directory, name) of every object, oldest atime first."""
    found = []
    for vol in os.scandir(root / "cache"):
        for fan in os.scandir(vol.path):
            for e in os.scandir(fan.path):
                found.append((e.stat(follow_symlinks=False).st_atime_ns, fan.path, e.name))
    found.sort()
    return [(d, n) for _, d, n in found]


def per_object(seconds: float, n: int) -> float:
    return 1e6 * seconds / max(1, n)


@contextlib.contextmanager
def quiet_structlog() -> Iterator[None]:
    """The daemon's JSON logging, writing to /dev/null."""
    from cachefilesd_py.daemon.logging import configure_logging

    saved = sys.stderr
    with open(os.devnull, "w") as null:
        sys.stderr = null
        try:
            configure_logging(0, "json")
            yield
        finally:
            sys.stderr = saved


def probe(built: BuiltCache, work: Path, per_case: int | None = None) -> None:
    image, mnt = work / "probe.img", work / "probe"
    copy_image(built.image, image)
    rows: list[tuple[str, float, str]] = []
    try:
        with mounted(image, mnt) as root, fill_binding(root, "bench-probe") as fd:
            objs = lru_objects(root)
            n = per_case or max(16, min(1000, len(objs) // 10))
            slices = iter(objs[i : i + n] for i in range(0, len(objs), n))
            rows += measure(fd, root, slices, n)
            os.chdir("/")
    finally:
        image.unlink(missing_ok=True)
    print(f"\nprobe: one classic cull, piece by piece ({n} objects per case, µs per object)")
    print("| case | µs per object | note |")
    print("|---|---|---|")
    for name, us, note in rows:
        print(f"| {name} | {us:.1f} | {note} |")


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(
    fd: int, root: Path, slices: Iterator[list[tuple[str, str]]], n: int
) -> list[tuple[str, float, str]]:
    rows: list[tuple[str, float, str]] = []
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        batch = next(slices)
        cmds = [b"cull " + name.encode() for _, name in batch]
        rows.append(
            (
                "write to /dev/null",
                per_object(timed(lambda: [os.write(null, c) for c in cmds]), n),
                "floor",
            )
        )
    finally:
        os.close(null)
    rows.append(
        ("read state line", per_object(timed(lambda: [os.read(fd, 4096) for _ in range(n)]), n), "")
    )

    # the kernel's cull round trip: cwd set once per directory, only the writes timed
    batch = next(slices)
    by_dir: dict[str, list[str]] = {}
    for d, name in batch:
        by_dir.setdefault(d, []).append(name)
    spent, errors = 0.0, 0
    for d, names in by_dir.items():
        os.chdir(d)
        for name in names:
            t = time.perf_counter()
            try:
                os.write(fd, b"cull " + name.encode())
            except OSError:
                errors += 1
            spent += time.perf_counter() - t
    rows.append(("cull, cwd already in the directory", per_object(spent, n), f"{errors} errors"))

    batch = next(slices)
    dirfds = {d: os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d, _ in batch}
    try:

        def fchdir_cull() -> None:
            for d, name in batch:
                os.fchdir(dirfds[d])
                os.write(fd, b"cull " + name.encode())

        rows.append(("fchdir(cached dir fd) + cull", per_object(timed(fchdir_cull), n), ""))
    finally:
        for dfd in dirfds.values():
            os.close(dfd)
    os.chdir("/")

    device = CachefilesDevice(fd=os.dup(fd))
    try:
        batch = next(slices)
        outcomes: Counter[str] = Counter()
        secs = timed(lambda: [outcomes.update([cull_one(device, d, name)]) for d, name in batch])
        rows.append(("cull_one() (kernel/device.py)", per_object(secs, n), str(dict(outcomes))))

        t = time.perf_counter()
        index = TreeIndex(str(root / "cache"))
        built_s = time.perf_counter() - t
        spy = inotify_simple.INotify(nonblocking=True)
        batch = next(slices)
        for d in {d for d, _ in batch}:
            spy.add_watch(d, WATCH_MASK)
        for d, name in batch:
            cull_one(device, d, name)
        secs = timed(index.refresh)
        kinds = Counter(
            "|".join(str(f.name) for f in inotify_simple.flags.from_mask(ev.mask))
            for ev in spy.read(timeout=0)
        )
        spy.close()
        rows.append(
            (
                "inotify event, applied by the index",
                per_object(secs, n),
                f"{index.events} events for {n} culls: {dict(kinds)}; "
                f"index built in {built_s:.2f} s",
            )
        )
        batch = next(slices)
        secs = timed(lambda: [os.stat(os.path.join(d, name)) for d, name in batch])
        rows.append(("stat of an object", per_object(secs, n), ""))
        known = index.known_objects()
        secs = timed(lambda: index.scan(4096))
        rows.append(
            (
                "TreeIndex.scan(4096), per known object",
                per_object(secs, known),
                f"{known} objects, {secs:.2f} s",
            )
        )
        index.close()
    finally:
        device.close()

    with quiet_structlog():
        import structlog

        log = structlog.get_logger("probe")
        secs = timed(
            lambda: [
                log.info("cull.object", directory="@ab", name="S1,2", outcome="culled", n=i)
                for i in range(n)
            ]
        )
    rows.append(("structlog JSON line (to /dev/null)", per_object(secs, n), ""))
    return rows

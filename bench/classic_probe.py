"""The pieces of one classic-mode cull, timed one by one on the real kernel.

Run by ``python -m bench.bench_classic --probe`` (in the guest). On a fresh copy of the
benchmark cache (cold: nothing of it in the guest's caches yet), bound by this process
with limits that never ask for culls, each case gets its own objects, taken in LRU order
(oldest first, so spread over the fan-out directories as a daemon's victims are). The
cases run interleaved, a small chunk of each per round, so that a change in the host's
load hits them all alike; each reports microseconds per object:

- ``write to /dev/null``: the floor, a Python ``os.write`` of a cull command that the
  kernel does nothing with;
- ``read state line``: one ``read()`` of the device (the kernel runs ``statfs`` and
  formats the state line), what a daemon pays each time it asks whether to go on;
- ``cull, cwd already in its directory``: only the ``cull`` writes are timed, the
  working directory is set beforehand: the kernel's own round trip (look-up, unlink,
  ext4 freeing the inode and its blocks) plus the floor;
- ``fchdir(cached dir fd) + cull``: two syscalls per object, directory fds opened once;
- ``cull_one(), cwd "/"`` and ``cull_one(), cwd on the cache fs``: cachefilesd-py's path
  today (``kernel/device.py``): ``open(".")``, ``chdir(path)`` (a walk from ``/``), the
  write, ``fchdir`` back, ``close``, under a lock. The daemon runs with cwd ``/``, as a
  systemd service does; in the test guest ``/`` is the host's root over 9p, so there the
  ``open``/``close`` of ``.`` are 9p round trips;
- ``inotify event, applied by the index``: a :class:`TreeIndex` watches the cache the
  whole time; each round's culls come back to it as events, and its ``refresh()`` is
  timed per event (and the kinds of event are counted);
- ``stat of an object (cold)``: what a pass pays per object to rank it by atime;
- ``structlog JSON line``: one ``log.info`` with four fields through the daemon's JSON
  logging set-up, to ``/dev/null``: the price of one log event per cull.
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

Objects = list[tuple[str, str]]
#: a case: given its chunk of (directory, name), returns the seconds it spent
Case = Callable[[Objects], float]


def lru_objects(root: Path) -> Objects:
    """(directory, name) of every object, oldest atime first."""
    found = []
    for vol in os.scandir(root / "cache"):
        for fan in os.scandir(vol.path):
            for e in os.scandir(fan.path):
                found.append((e.stat(follow_symlinks=False).st_atime_ns, fan.path, e.name))
    found.sort()
    return [(d, n) for _, d, n in found]


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


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def probe(built: BuiltCache, work: Path, rounds: int = 10, per_round: int = 0) -> None:
    image, mnt = work / "probe.img", work / "probe"
    copy_image(built.image, image)
    back = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with mounted(image, mnt) as root, fill_binding(root, "bench-probe") as fd:
            try:
                rows = Probe(fd, root).run(rounds, per_round)
            finally:
                os.fchdir(back)  # the working directory must not hold the mount
    finally:
        os.close(back)
        image.unlink(missing_ok=True)
    print(f"\nprobe: one classic cull, piece by piece ({rows[0][2]}; µs per object)")
    print("| case | µs per object | note |")
    print("|---|---|---|")
    for name, us, note in rows[1:]:
        print(f"| {name} | {us:.1f} | {note} |")


class Probe:
    def __init__(self, fd: int, root: Path) -> None:
        self.fd = fd
        self.root = root
        self.device = CachefilesDevice(fd=os.dup(fd))
        self.null = os.open(os.devnull, os.O_WRONLY)
        self.dirfds: dict[str, int] = {}
        self.outcomes: Counter[str] = Counter()

    def close(self) -> None:
        for dfd in self.dirfds.values():
            os.close(dfd)
        os.close(self.null)
        self.device.close()

    # -- the cases --------------------------------------------------------------------

    def null_write(self, chunk: Objects) -> float:
        cmds = [b"cull " + name.encode() for _, name in chunk]
        return timed(lambda: [os.write(self.null, c) for c in cmds])

    def read_state(self, chunk: Objects) -> float:
        return timed(lambda: [os.read(self.fd, 4096) for _ in chunk])

    def cull_in_place(self, chunk: Objects) -> float:
        spent = 0.0
        for d, name in chunk:
            os.chdir(d)
            cmd = b"cull " + name.encode()
            t = time.perf_counter()
            try:
                os.write(self.fd, cmd)
                self.outcomes["in place: culled"] += 1
            except OSError as exc:
                self.outcomes[f"in place: {exc.strerror}"] += 1
            spent += time.perf_counter() - t
        return spent

    def fchdir_cull(self, chunk: Objects) -> float:
        for d, _ in chunk:
            if d not in self.dirfds:
                self.dirfds[d] = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

        def go() -> None:
            for d, name in chunk:
                os.fchdir(self.dirfds[d])
                os.write(self.fd, b"cull " + name.encode())

        return timed(go)

    def cull_one_from(self, cwd: str) -> Case:
        def case(chunk: Objects) -> float:
            os.chdir(cwd)

            def go() -> None:
                for d, name in chunk:
                    self.outcomes[f"cull_one: {cull_one(self.device, d, name)}"] += 1

            return timed(go)

        return case

    @staticmethod
    def stat_cold(chunk: Objects) -> float:
        return timed(lambda: [os.stat(os.path.join(d, n)) for d, n in chunk])

    @staticmethod
    def log_line(chunk: Objects) -> float:
        import structlog

        log = structlog.get_logger("probe")
        return timed(
            lambda: [
                log.info("cull.object", directory=d[-3:], name=n, outcome="culled", n=i)
                for i, (d, n) in enumerate(chunk)
            ]
        )

    # -- the run ----------------------------------------------------------------------

    def run(self, rounds: int, per_round: int) -> list[tuple[str, float, str]]:
        cases: dict[str, Case] = {
            "write to /dev/null (floor)": self.null_write,
            "read state line": self.read_state,
            "cull, cwd already in its directory": self.cull_in_place,
            "fchdir(cached dir fd) + cull": self.fchdir_cull,
            'cull_one(), cwd "/"': self.cull_one_from("/"),
            "cull_one(), cwd on the cache fs": self.cull_one_from(str(self.root)),
            "stat of an object (cold)": self.stat_cold,
            "structlog JSON line (to /dev/null)": self.log_line,
        }
        objs = lru_objects(self.root)
        per_round = per_round or max(2, min(100, len(objs) // (len(cases) * rounds)))
        t = time.perf_counter()
        index = TreeIndex(str(self.root / "cache"))
        index_s = time.perf_counter() - t
        spy = inotify_simple.INotify(nonblocking=True)
        for d in {d for d, _ in objs}:
            spy.add_watch(d, WATCH_MASK)
        spent: dict[str, float] = dict.fromkeys(cases, 0.0)
        events, refresh_s = 0, 0.0
        it = iter(objs)
        try:
            with quiet_structlog():
                for _ in range(rounds):
                    for name, case in cases.items():
                        chunk = [x for _, x in zip(range(per_round), it, strict=False)]
                        spent[name] += case(chunk)
                    before = index.events
                    refresh_s += timed(index.refresh)
                    events += index.events - before
            kinds = Counter(
                "|".join(str(f.name) for f in inotify_simple.flags.from_mask(ev.mask))
                for ev in spy.read(timeout=0)
            )
            known = index.known_objects()
            scan_s = timed(lambda: index.scan(4096))
        finally:
            spy.close()
            index.close()
            self.close()
        n = rounds * per_round
        rows = [("", 0.0, f"{rounds} rounds of {per_round} objects per case, interleaved")]
        rows += [(name, 1e6 * spent[name] / n, "") for name in cases]
        rows.append(
            (
                "inotify event, applied by the index",
                1e6 * refresh_s / max(1, events),
                f"{events} events for the culls above: {dict(kinds)}",
            )
        )
        rows.append(
            (
                "TreeIndex: build, per object",
                1e6 * index_s / max(1, known),
                f"{len(objs)} objects, {index_s:.2f} s",
            )
        )
        rows.append(
            (
                "TreeIndex.scan(4096) (warm), per known object",
                1e6 * scan_s / max(1, known),
                f"{known} objects, {scan_s:.2f} s",
            )
        )
        rows.append(("(outcomes)", 0.0, str(dict(self.outcomes))))
        return rows

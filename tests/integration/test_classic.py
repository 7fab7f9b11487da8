"""The classic culler on a real cache tree and the fake classic device."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cachefilesd_py.frontends.classic.driver import ClassicDriver
from cachefilesd_py.space.caps import Caps, CullRules
from cachefilesd_py.space.scan import scan
from cachefilesd_py.space.tree_index import TreeIndex
from cachefilesd_py.testing.fake_classic import FakeClassic


def make_tree(root: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        d = root / "cache" / "I9p,tag," / f"@{i % 16:02x}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"D{i}"
        p.write_bytes(b"x" * 100)
        os.utime(p, ns=(1_000_000_000 * (i + 1), 1_000_000_000 * (i + 1)))
        paths.append(p)
    return paths


def test_scan_keeps_the_oldest_in_bounded_memory(tmp_path: Path) -> None:
    make_tree(tmp_path, 200)
    (tmp_path / "cache" / "stray.txt").write_text("?")
    r = scan(str(tmp_path / "cache"), 10)
    assert r.objects == 200
    assert [c.name for c in r.oldest] == [f"D{i}" for i in range(10)]
    assert r.strays == [str(tmp_path / "cache" / "stray.txt")]


def test_culls_back_to_run_never_in_use_and_reaps(tmp_path: Path) -> None:
    paths = make_tree(tmp_path, 120)
    dev = FakeClassic(tmp_path, cull_above=100, run_at=60)
    dev.in_use = set(paths[:5])  # the oldest five are open: never culled
    drv = ClassicDriver(dev, str(tmp_path), nocull=False, table_size=4096)
    drv.bind([b"dir " + str(tmp_path).encode()])
    stop = threading.Event()
    t = threading.Thread(target=drv.serve, args=(stop, 0.05))
    t.start()
    deadline = time.monotonic() + 20
    while dev.objects() > 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dev.objects() <= 60
    while dev.culling and time.monotonic() < deadline:  # the daemon saw culling end
        time.sleep(0.01)
    assert not dev.culling
    # new objects appear (the kernel commits them): the index learns of them from
    # inotify, without walking the tree again, and the next pass culls among them
    fresh = []
    for i in range(100):
        p = tmp_path / "cache" / "I9p,tag," / f"@{i % 16:02x}" / f"Dnew{i}"
        p.write_bytes(b"y" * 100)
        os.utime(p, ns=(i, i))  # older than everything else: the first to go
        fresh.append(p)
    deadline = time.monotonic() + 20
    while dev.objects() > 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    stop.set()
    t.join()
    dev.close()
    assert dev.objects() <= 60
    assert any(not p.exists() for p in fresh), "objects the index learnt of were never culled"
    assert all(p.exists() for p in paths[:5]), "an object in use was culled"
    assert drv.stats.busy >= 5 and drv.stats.passes >= 2 and drv.stats.cull_requests == 2
    # no re-walks: the new objects came as events (the culls themselves send none)
    assert drv.stats.index_rebuilds == 1 and drv.stats.index_events > 0
    assert list((tmp_path / "graveyard").iterdir()) == []
    assert dev.commands[-1 - drv.stats.culled - drv.stats.busy - drv.stats.gone :][0] == b"bind"


def serve_rounds(dev: FakeClassic, drv: ClassicDriver, rounds: int = 10) -> None:
    """Run the driver's serve loop until it has read the kernel's state ``rounds``
    times; fails if it never gets there (a loop that did not run proves nothing)."""
    stop = threading.Event()
    t = threading.Thread(target=drv.serve, args=(stop, 0.05))
    t.start()
    served = dev.wait_reads(rounds)
    stop.set()
    t.join()
    dev.close()
    assert served, "the serve loop never read the kernel's state"


def test_nocull_never_culls(tmp_path: Path) -> None:
    make_tree(tmp_path, 50)
    dev = FakeClassic(tmp_path, cull_above=10, run_at=5)
    drv = ClassicDriver(dev, str(tmp_path), nocull=True)
    drv.bind([])
    serve_rounds(dev, drv)  # the kernel asks for culling all along
    assert drv.stats.cull_requests == 1, "the kernel's request was not seen"
    assert dev.objects() == 50 and drv.stats.culled == 0 and drv.stats.passes == 0


def test_caps_cull_oldest_of_the_volume_over_its_cap_only(tmp_path: Path) -> None:
    from cachefilesd_py.config.model import SizeRule

    def volume(name: str, n: int, t0: int) -> list[Path]:
        paths = []
        for i in range(n):
            d = tmp_path / "cache" / f"I{name}" / f"@{i % 4:02x}"
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"D{i}"
            p.write_bytes(b"x" * 8192)
            os.utime(p, ns=(10**9 * (t0 + i), 10**9 * (t0 + i)))
            paths.append(p)
        return paths

    # "nfs,big" holds the newest objects: a cache-wide scan would find only "9p,old"
    old = volume("9p,old", 20, t0=1)
    big = volume("nfs,big", 20, t0=1000)
    dev = FakeClassic(tmp_path, cull_above=10**6, run_at=0)  # the kernel never asks
    dev.in_use = {big[0]}
    per_object = os.stat(big[1]).st_blocks * 512
    caps = Caps(volume_rules=(SizeRule("nfs,*", 12 * per_object),))
    drv = ClassicDriver(dev, str(tmp_path), nocull=False, table_size=5, rules=CullRules(caps))
    drv.bind([])
    # 8 over the cap; the oldest is busy and stays; a table of 5 takes several rounds
    assert drv.cap_pass() == 8
    assert all(p.exists() for p in old)
    assert big[0].exists() and drv.stats.busy >= 1
    assert [p.exists() for p in big[1:9]] == [False] * 8
    assert all(p.exists() for p in big[9:])
    assert drv.cap_pass() == 0  # holds now

    # the cache-wide object cap takes the oldest of any volume
    drv.rules = CullRules(Caps(max_objects=25))
    assert drv.cap_pass() == 7
    assert [p.exists() for p in old[:7]] == [False] * 7 and old[7].exists()


@pytest.mark.parametrize("nocull", [True, False])
def test_caps_are_enforced_by_the_serve_loop_unless_nocull(tmp_path: Path, nocull: bool) -> None:
    make_tree(tmp_path, 30)
    dev = FakeClassic(tmp_path, cull_above=10**6, run_at=0)
    rules = CullRules(Caps(max_objects=5))
    drv = ClassicDriver(dev, str(tmp_path), nocull=nocull, rules=rules, caps_period=0.01)
    drv.bind([])
    serve_rounds(dev, drv)  # ten rounds, each one past a caps period
    if nocull:
        assert dev.objects() == 30 and drv.stats.cap_passes == 0
    else:
        assert dev.objects() == 5 and drv.stats.cap_passes >= 1 and drv.stats.culled == 25


def test_pinned_objects_are_never_culled(tmp_path: Path) -> None:
    paths = make_tree(tmp_path, 30)  # volume "9p,tag,", names D0..D29, oldest first
    dev = FakeClassic(tmp_path, cull_above=10**6, run_at=0)
    rules = CullRules(Caps(max_objects=20), pins=("9p,tag,/D[0-4]",))
    drv = ClassicDriver(dev, str(tmp_path), nocull=False, rules=rules)
    drv.bind([])
    assert drv.cap_pass() == 10
    assert all(p.exists() for p in paths[:5]), "a pinned object was culled"
    assert [p.exists() for p in paths[5:15]] == [False] * 10
    assert drv.stats.pinned >= 5


def test_a_pass_stops_at_run_and_its_culls_make_no_index_work(tmp_path: Path) -> None:
    """The kernel unlinks what it culls; those deletions are the daemon's own doing and
    must not come back to its index as events to apply (the old pass read 64 objects'
    worth of IN_DELETE per batch), and the pass stops where the kernel clears ``cull``,
    not up to a batch later."""
    make_tree(tmp_path, 120)
    dev = FakeClassic(tmp_path, cull_above=100, run_at=60)
    drv = ClassicDriver(dev, str(tmp_path), nocull=False, table_size=4096)
    drv.bind([])
    drv.open_index()
    assert drv.index is not None
    try:
        assert drv.read_state()
        assert drv.cull_pass() == 60
        assert dev.objects() == 60 and not dev.culling
        assert drv.index.refresh() == 0  # nothing to read back
        assert drv.index.known_objects() == 60
        # the next scan ranks only what is left, without re-walking
        assert drv.index.scan(4096).objects == 60 and drv.index.rebuilds == 1
    finally:
        drv.index.close()
        dev.close()


def test_an_object_removed_behind_the_index_is_forgotten_by_the_next_scan(
    tmp_path: Path,
) -> None:
    paths = make_tree(tmp_path, 20)
    index = TreeIndex(str(tmp_path / "cache"))
    try:
        paths[0].unlink()  # not the daemon: nobody tells the index
        assert index.scan(4096).objects == 19
        assert index.known_objects() == 19
    finally:
        index.close()


def test_stats_and_control_start_after_the_first_pass_when_the_kernel_asks_at_start(
    tmp_path: Path,
) -> None:
    """The stats line and the control server (seconds of imports in a slow guest) must
    not delay the pass the kernel is waiting for: ``report_stats`` comes after it."""
    from cachefilesd_py.config.model import Config
    from cachefilesd_py.frontends.classic.driver import run_classic

    make_tree(tmp_path, 120)
    dev = FakeClassic(tmp_path, cull_above=100, run_at=60)  # asks from the start
    dev.write_command(b"bind")
    stop = threading.Event()
    seen: list[int] = []

    def report(collect: object) -> None:
        seen.append(dev.objects())
        stop.set()

    config = Config(dir=str(tmp_path))
    run_classic(dev, config, stop, nocull=False, setup=None, report_stats=report)
    dev.close()
    assert seen == [60]  # the first pass had culled to run when stats started

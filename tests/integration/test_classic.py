"""The classic culler on a real cache tree and the fake classic device."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from cachefilesd_py.frontends.classic.driver import ClassicDriver
from cachefilesd_py.space.scan import scan
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
    time.sleep(0.3)
    stop.set()
    t.join()
    dev.close()
    assert dev.objects() <= 60
    assert all(p.exists() for p in paths[:5]), "an object in use was culled"
    assert drv.stats.busy >= 5
    assert list((tmp_path / "graveyard").iterdir()) == []
    assert dev.commands[-1 - drv.stats.culled - drv.stats.busy - drv.stats.gone :][0] == b"bind"


def test_nocull_never_culls(tmp_path: Path) -> None:
    make_tree(tmp_path, 50)
    dev = FakeClassic(tmp_path, cull_above=10, run_at=5)
    drv = ClassicDriver(dev, str(tmp_path), nocull=True)
    drv.bind([])
    stop = threading.Event()
    t = threading.Thread(target=drv.serve, args=(stop, 0.05))
    t.start()
    time.sleep(0.5)
    stop.set()
    t.join()
    dev.close()
    assert dev.objects() == 50 and drv.stats.culled == 0

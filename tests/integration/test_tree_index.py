"""The inotify tree index against the full walk it replaces, on real directories."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from cachefilesd_py.space.scan import ScanResult, scan
from cachefilesd_py.space.tree_index import TreeIndex


def view(r: ScanResult) -> tuple[object, ...]:
    return (
        [c.path for c in r.oldest],
        r.objects,
        r.blocks,
        sorted(r.strays),
        {k: v for k, v in r.volume_blocks.items() if v},
        sorted(r.empty_dirs),
    )


def obj(path: Path, atime: int, size: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, ns=(atime * 10**9, atime * 10**9))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    c = tmp_path / "cache"
    for i in range(40):
        obj(c / f"Iv{i % 3}" / f"@{i % 5:02x}" / f"D{i}", 1000 + i, 5000 * (i % 4))
    return c


def test_index_matches_the_walk_through_random_changes(cache: Path) -> None:
    idx = TreeIndex(str(cache))
    try:
        assert view(idx.scan(10)) == view(scan(str(cache), 10))
        for seed in range(6):
            rnd = random.Random(seed)
            for step in range(30):
                op = rnd.choice(["new", "new", "newvol", "rm", "bury", "stray", "rmfan"])
                existing = sorted(cache.rglob("D*"))
                if op == "new":
                    obj(
                        cache
                        / f"Iv{rnd.randrange(3)}"
                        / f"@{rnd.randrange(8):02x}"
                        / f"Dn{seed}_{step}",
                        rnd.randrange(500, 3000),
                        rnd.randrange(3) * 4096,
                    )
                elif op == "newvol":
                    obj(cache / f"Inew{seed}" / "@00" / f"Snew{step}", rnd.randrange(500, 3000))
                elif op == "rm" and existing:
                    rnd.choice(existing).unlink()
                elif op == "bury" and existing:  # the kernel buries by rename
                    victim = rnd.choice(existing)
                    victim.rename(cache.parent / f"grave{seed}_{step}")
                elif op == "stray":
                    (cache / f"Iv{rnd.randrange(3)}" / f"junk{step}").mkdir(
                        parents=True, exist_ok=True
                    )
                elif op == "rmfan":
                    fans = [d for d in cache.glob("I*/@*") if not any(d.iterdir())]
                    if fans:
                        rnd.choice(fans).rmdir()
            assert view(idx.scan(10)) == view(scan(str(cache), 10)), seed
            assert (
                idx.scan(10, under=str(cache / "Iv1")).objects
                == scan(str(cache / "Iv1"), 10).objects
            )
        assert idx.rebuilds == 1  # no full walk after the first
    finally:
        idx.close()


def test_queue_overflow_rebuilds(cache: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 50_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to overflow it here")
    idx = TreeIndex(str(cache))
    try:
        d = cache / "Iv0" / "@00"
        for i in range(limit + 100):  # more events than the kernel queues
            (d / f"Dflood{i}").touch()
        assert idx.scan(10).objects == 40 + limit + 100
        assert idx.rebuilds == 2
    finally:
        idx.close()

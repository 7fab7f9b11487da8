"""``kernel.device.CullCursor``: one ``fchdir`` per object to a kept directory fd, the
working directory given back, every fd closed once (against the fake classic device,
which resolves ``cull`` against the working directory as the kernel does)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from cachefilesd_py.kernel.device import CullCursor, cull_in
from cachefilesd_py.testing.fake_classic import FakeClassic


def tree(root: Path, dirs: int, per_dir: int) -> list[tuple[str, str]]:
    objs = []
    for d in range(dirs):
        fan = root / "cache" / "I9p,tag," / f"@{d:02x}"
        fan.mkdir(parents=True)
        for i in range(per_dir):
            (fan / f"D{d}_{i}").write_bytes(b"x")
            objs.append((str(fan), f"D{d}_{i}"))
    (root / "graveyard").mkdir()
    return objs


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_culls_from_each_directory_and_gives_the_cwd_back(tmp_path: Path) -> None:
    objs = tree(tmp_path, dirs=3, per_dir=4)
    dev = FakeClassic(tmp_path, cull_above=0, run_at=0)
    cwd, fds = os.getcwd(), open_fds()
    try:
        with CullCursor(dev) as cursor:
            answers = [cursor.cull(d, n) for d, n in objs[::2] + objs[::2]]
            assert cursor.open_dirs == 3  # one fd per directory, kept
        assert answers == [0] * 6 + [errno.ESTALE] * 6
        assert os.getcwd() == cwd
        assert open_fds() == fds  # every directory fd closed
        assert dev.objects() == 6
    finally:
        dev.close()


def test_keeps_at_most_max_dirs_open(tmp_path: Path) -> None:
    objs = tree(tmp_path, dirs=5, per_dir=2)
    dev = FakeClassic(tmp_path, cull_above=0, run_at=0)
    try:
        with CullCursor(dev, max_dirs=2) as cursor:
            for d, n in objs:
                assert cursor.cull(d, n) == 0
                assert cursor.open_dirs <= 2
        assert dev.objects() == 0
    finally:
        dev.close()


def test_refusals_are_errnos(tmp_path: Path) -> None:
    tree(tmp_path, dirs=1, per_dir=1)
    dev = FakeClassic(tmp_path, cull_above=0, run_at=0)
    try:
        with CullCursor(dev) as cursor:
            assert cursor.cull(str(tmp_path / "cache" / "nowhere"), "D1") == errno.ENOENT
            assert cursor.cull(str(tmp_path), "a/b") == errno.EINVAL
            fan = str(tmp_path / "cache" / "I9p,tag," / "@00")
            dev.in_use = {Path(fan) / "D0_0"}
            assert cursor.cull(fan, "D0_0") == errno.EBUSY
        # the same answers as the one-object path
        assert cull_in(dev, fan, "D0_0") == errno.EBUSY
    finally:
        dev.close()

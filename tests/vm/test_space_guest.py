"""On-demand space management on the real kernel: a cache filesystem too small for all
images; reading everything still succeeds with correct bytes, the daemon culls blobs
that are no longer mounted when the kernel signals pressure (POLLOUT), and the bitmaps
of what stays agree with the data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefilesd_py.kernel.layout import object_path
from tests.vm.rig import Daemon, mkfs_erofs, mount_erofs, run, tree_digests
from tests.vm.test_presence_guest import load_and_verify

pytestmark = pytest.mark.guest


def test_images_larger_than_the_cache_are_served_by_culling(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
) -> None:
    blobs = workdir / "blobs"
    blobs.mkdir()
    sources = {}
    for name in ("a", "b", "c", "d"):
        src = workdir / f"src-{name}"
        src.mkdir()
        for i in range(3):
            (src / f"f{i}.bin").write_bytes(os.urandom(5 << 20))
        mkfs_erofs(blobs / f"{name}.erofs", src, "-Enoinline_data")
        sources[name] = src
    cache = loop_fs(64)
    d = daemon(
        f"dir {cache}\ntag space\nondemand\nsource * file://{blobs}/{{cookie}}\n"
        "brun 40%\nbcull 30%\nbstop 5%\nreadahead 0\n"
    )
    d.start()
    for name, src in sources.items():
        mnt = workdir / f"mnt-{name}"
        mount_erofs(mnt, f"{name}.erofs")
        mounts.append(mnt)
        assert tree_digests(mnt) == tree_digests(src), name
        run("umount", str(mnt))
        mounts.remove(mnt)
    assert d.stop() == 0
    stats = [e for e in d.read_events() if e.get("event") == "stats"][-1]
    assert stats["reads_failed"] == 0, stats
    passes = [e for e in d.read_events() if e.get("event") == "cull.pass"]
    assert sum(int(e["culled"]) for e in passes) >= 1, passes  # type: ignore[call-overload]
    assert list((cache / "graveyard").iterdir()) == []
    kept = [
        n
        for n in sources
        if (p := object_path(cache, f"erofs,{n}.erofs".encode(), f"{n}.erofs".encode()))
        and p.exists()
    ]
    assert kept and len(kept) < len(sources), kept
    for name in kept:
        _presence, report = load_and_verify(cache, blobs / f"{name}.erofs", f"{name}.erofs")
        assert report.ok, (name, report)
    sidecars = list((cache / "cachefilesd-py" / "presence").glob("*.presence"))
    assert len(sidecars) == len(kept)

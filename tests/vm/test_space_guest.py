"""On-demand space management on the real kernel: a cache filesystem too small for all
images; reading everything still succeeds with correct bytes, the daemon culls blobs
that are no longer mounted when the kernel signals pressure (POLLOUT), and the bitmaps
of what stays agree with the data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefilesd_py.config.model import Config
from cachefilesd_py.kernel.layout import object_path
from tests.vm.rig import (
    Daemon,
    mkfs_erofs,
    mount_erofs,
    mount_tracked,
    run,
    tree_digests,
    umount_tracked,
)
from tests.vm.test_presence_guest import load_and_verify

#: the daemon's chunk size when the config names none (these tests name none)
DEFAULT_CHUNK = Config().chunk_size

pytestmark = [pytest.mark.guest, pytest.mark.ondemand]


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
    acted = sum(int(e["culled"]) + int(e["trimmed"]) for e in passes)  # type: ignore[call-overload]
    assert acted >= 1, passes
    assert list((cache / "graveyard").iterdir()) == []
    kept = [
        n
        for n in sources
        if (p := object_path(cache, f"erofs,{n}.erofs".encode(), f"{n}.erofs".encode()))
        and p.exists()
    ]
    assert kept, kept
    for name in kept:
        presence, report = load_and_verify(
            cache, blobs / f"{name}.erofs", f"{name}.erofs", DEFAULT_CHUNK
        )
        assert presence.trusted, name  # type: ignore[attr-defined]
        assert report.ok, (name, report)
        assert report.present > 0, (name, report)
    sidecars = list((cache / "cachefilesd-py" / "presence").glob("*.presence"))
    assert len(sidecars) == len(kept)


def test_an_idle_blob_is_trimmed_not_removed_and_served_again(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
) -> None:
    """One image fills most of the cache; while it is mounted nothing of it may go
    (the kernel has it open). Unmounted, it holds far more than the limits ask to free,
    so the daemon punches holes over its tail chunks instead of culling it. Mounted
    again, every file reads back correct: the trimmed chunks are fetched anew."""
    blobs, src = workdir / "blobs", workdir / "src"
    blobs.mkdir()
    src.mkdir()
    for i in range(9):
        (src / f"f{i}.bin").write_bytes(os.urandom(5 << 20))
    mkfs_erofs(blobs / "big.erofs", src, "-Enoinline_data")
    cache = loop_fs(64)
    d = daemon(
        f"dir {cache}\ntag trim\nondemand\nsource * file://{blobs}/{{cookie}}\n"
        "brun 40%\nbcull 30%\nbstop 5%\nreadahead 0\n"
    )
    d.start()
    mnt = workdir / "mnt"
    want = tree_digests(src)
    mount_tracked(mnt, "big.erofs", mounts)
    assert tree_digests(mnt) == want
    free = os.statvfs(cache)
    assert free.f_bavail < 0.30 * free.f_blocks, "the image did not push the cache below bcull"
    assert d.count("cull.trimmed") == 0  # in use: not a byte of it may go
    umount_tracked(mnt, mounts)
    assert d.wait_for("cull.trimmed", timeout=60), "no trim after the image was unmounted"
    path = object_path(cache, b"erofs,big.erofs", b"big.erofs")
    assert path.exists(), "the blob was culled whole"
    presence, report = load_and_verify(cache, blobs / "big.erofs", "big.erofs", DEFAULT_CHUNK)
    assert presence.trusted  # type: ignore[attr-defined]
    assert report.ok, report
    assert 0 < report.present < report.chunks, report

    mount_tracked(mnt, "big.erofs", mounts)
    run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
    assert tree_digests(mnt) == want
    umount_tracked(mnt, mounts)
    assert d.stop() == 0
    events = d.read_events()
    stats = [e for e in events if e.get("event") == "stats"][-1]
    assert stats["reads_failed"] == 0 and stats["trimmed"] >= 1, stats
    opens = [e for e in events if e.get("event") == "open"]
    assert opens[-1]["present"] == report.present, "the reopened blob did not see the trim"
    bound = [e for e in events if e.get("event") == "presence.bound"][-1]
    assert int(bound["present"]) > report.present, "the trimmed chunks were not fetched again"  # type: ignore[call-overload]

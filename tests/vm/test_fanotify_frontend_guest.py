"""The fanotify frontend end to end on the real 7.3 kernel: cachefilesd-py in
``fanotify`` mode makes a sparse cache file per blob on ext4, marks it, mounts it as
file-backed EROFS and fills what readers touch from nginx, ``file://`` or a faulty
loopback server. Every file is compared by sha256 with its source tree.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefilesd_py.testing.erofs_images import make_tree
from cachefilesd_py.testing.fault_server import FaultServer
from tests.vm.rig import HUGE_REGIONS, Daemon, Nginx, mkfs_erofs, tree_digests, write_huge_tree

pytestmark = [pytest.mark.guest, pytest.mark.fanotify]


def config(cache: Path, url: str, images: str, extra: str = "") -> str:
    return (
        f"dir {cache}\nfanotify\nsource imgs/* {url}\nchunk_size 64K\n"
        f"fetch_timeout 20\n{images}{extra}"
    )


def stats_of(d: Daemon) -> dict[str, object]:
    stats = [e for e in d.read_events() if e.get("event") == "stats" and e.get("final")]
    assert stats, "no final stats line"
    return stats[-1]


def build(workdir: Path, layout: str) -> tuple[Path, Path, str]:
    """Source tree, the folder of blobs (``imgs/``), and the ``fanotify_image`` args.
    ``many``: 3000 small files (inline tails, directory blocks over many chunks)."""
    src = make_tree(workdir / "src", small_files=3000 if layout == "many" else 120)
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    root = workdir / "origin"
    blobs = root / "imgs"
    blobs.mkdir(parents=True)
    if layout == "plain":
        mkfs_erofs(blobs / "app.erofs", src, "-E", "noinline_data")
        return src, root, "imgs/app.erofs"
    if layout == "many":
        mkfs_erofs(blobs / "app.erofs", src)
        return src, root, "imgs/app.erofs"
    mkfs_erofs(blobs / "app.erofs", src, "--chunksize=65536", f"--blobdev={blobs / 'data.blob'}")
    return src, root, "imgs/app.erofs"


@pytest.mark.timeout(900)  # two fresh daemon interpreters in a loaded TCG guest
@pytest.mark.parametrize(
    ("layout", "kind"),
    [
        ("plain", "http"),
        ("plain", "file"),
        ("blobdev", "http"),
        ("blobdev", "file"),
        ("many", "http"),
        ("many", "file"),
    ],
)
def test_serves_image_identical_and_restart_fetches_nothing(
    workdir: Path,
    loop_fs: Callable[..., Path],
    nginx: Callable[[Path], Nginx],
    daemon: Callable[[str], Daemon],
    layout: str,
    kind: str,
) -> None:
    """Every file of the mount equals its source; after a restart (clean stop: the
    daemon unmounts, binds the sidecars) the second daemon serves it all again with
    nothing fetched."""
    src, root, image = build(workdir, layout)
    url = (nginx(root).url if kind == "http" else f"file://{root}") + "/{volume}/{cookie}"
    cache = loop_fs(256)
    mnt = workdir / "mnt"
    blobs = " data.blob" if layout == "blobdev" else ""
    conf = config(cache, url, f"fanotify_image {image} {mnt}{blobs}\n")
    expected = tree_digests(src)

    d1 = daemon(conf)
    d1.start(timeout=300)
    assert os.path.ismount(mnt)
    assert tree_digests(mnt) == expected
    assert d1.stop() == 0
    assert not os.path.ismount(mnt), "the daemon leaves no mount it cannot serve"
    first = stats_of(d1)
    assert first["fills"] and first["bytes_fetched"], first
    assert first["fill_failed"] == 0 and first["responses_failed"] == 0, first
    assert d1.count("fanotify.denied") == 0

    d2 = daemon(conf)
    d2.start(timeout=300)
    assert tree_digests(mnt) == expected
    assert d2.stop() == 0
    second = stats_of(d2)
    assert second["bytes_fetched"] == 0 and second["fills"] == 0, second
    # every backing read was asked and answered from the bitmap, unless the blob was
    # complete and silenced by an ignore mark
    assert second["allowed_present"] or second["silenced"], second
    assert d2.count("presence.distrusted") == 0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(900)
def test_origin_failure_gives_eio_never_zeros(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
) -> None:
    """While the origin answers 500, a reader of a missing range gets EIO (the event is
    denied, not allowed over a hole); once the origin is back the same file reads
    correctly, so the failure left nothing wrong in the cache."""
    src, root, _image = build(workdir, "plain")
    data = (root / "imgs" / "app.erofs").read_bytes()
    cache = loop_fs(128)
    mnt = workdir / "mnt"
    with FaultServer({"app.erofs": data}) as srv:
        conf = config(
            cache,
            srv.url + "/{cookie}",
            f"fanotify_image imgs/app.erofs {mnt}\n",
            "fetch_retries 0\n",
        )
        d = daemon(conf)
        d.start(timeout=300)
        srv.fault("app.erofs", "500", times=100_000)
        with pytest.raises(OSError) as info:
            (mnt / "big.bin").read_bytes()
        assert info.value.errno == errno.EIO
        assert d.count("fanotify.denied") >= 1
        srv.clear_faults()
        assert _sha(mnt / "big.bin") == _sha(src / "big.bin")
        assert tree_digests(mnt) == tree_digests(src)
        assert d.stop() == 0
    assert not os.path.ismount(mnt)
    stats = stats_of(d)
    assert stats["fill_failed"] >= 1 and stats["responses_failed"] == 0, stats


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["file", "http"])
def test_blob_larger_than_1gib_fetches_only_what_is_read(
    workdir: Path,
    loop_fs: Callable[..., Path],
    nginx: Callable[[Path], Nginx],
    daemon: Callable[[str], Daemon],
    kind: str,
) -> None:
    """A 1.2 GiB image (sparse at the origin), from nginx and from ``file://``, on a
    256 MB cache: regions on both sides of the 1 GiB mark read back identical, only
    about what was read is fetched, and a restart reads them again with nothing
    fetched (bits above chunk 16384 of 64 KiB were saved and trusted)."""
    src = workdir / "src"
    huge = write_huge_tree(src)
    regions = HUGE_REGIONS
    root = workdir / "origin"
    (root / "imgs").mkdir(parents=True)
    image = mkfs_erofs(root / "imgs" / "huge.erofs", src, "-Enoinline_data")
    subprocess.run(["fallocate", "--dig-holes", str(image)], check=True)
    assert image.stat().st_size > 1 << 30
    cache = loop_fs(256)
    mnt = workdir / "mnt"
    url = (nginx(root).url if kind == "http" else f"file://{root}") + "/{volume}/{cookie}"
    conf = config(cache, url, f"fanotify_image imgs/huge.erofs {mnt}\n")

    def read_regions() -> None:
        with open(mnt / "huge.bin", "rb") as got, open(huge, "rb") as want:
            for off, n in regions:
                got.seek(off)
                want.seek(off)
                assert got.read(n) == want.read(n), f"region at {off}"

    d1 = daemon(conf)
    d1.start(timeout=300)
    read_regions()
    assert d1.stop() == 0
    first = stats_of(d1)
    assert 5 << 20 <= int(first["bytes_fetched"]) < 64 << 20, first  # type: ignore[call-overload]
    assert first["fill_failed"] == 0 and d1.count("fanotify.denied") == 0, first

    d2 = daemon(conf)
    d2.start(timeout=300)
    read_regions()
    assert d2.stop() == 0
    second = stats_of(d2)
    assert second["bytes_fetched"] == 0 and second["fills"] == 0, second
    assert d2.count("presence.distrusted") == 0


@pytest.mark.timeout(900)
def test_a_cache_over_its_cap_culls_idle_files_and_never_punches_a_mounted_one(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
) -> None:
    """``cache_max_bytes`` below the image's size: the stale cache file of an image no
    longer served is culled whole (file and sidecar); the mounted image's file is never
    trimmed (a punch could race a read already allowed: ``frontends/fanotify/space.py``)
    however far over the cap, and the daemon says so; after dropping the page caches
    everything reads right again without a fetch."""
    src, root, image = build(workdir, "plain")
    cache = loop_fs(256)
    stale = cache / "fanotify" / "imgs" / "old.erofs"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(os.urandom(2 << 20))
    os.utime(stale, (1, 1))
    mnt = workdir / "mnt"
    conf = config(
        cache,
        f"file://{root}/{{volume}}/{{cookie}}",
        f"fanotify_image {image} {mnt}\n",
        "cache_max_bytes 3M\n",
    )
    expected = tree_digests(src)
    image_size = (root / image).stat().st_size
    assert image_size > 5 << 20
    d = daemon(conf)
    d.start(timeout=300)
    assert tree_digests(mnt) == expected  # read while the space thread runs its passes
    served = [p for p in (cache / "fanotify").rglob("*") if p.is_file() and p != stale]
    assert len(served) == 1, served
    blocks = served[0].stat().st_blocks
    assert d.wait_for("fanotify.over_limit_mounted", 60)
    assert not stale.exists(), "the stale cache file was not culled"
    time.sleep(3)  # a few more passes, each over the cap
    assert served[0].stat().st_blocks == blocks  # not a block given back while mounted
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    assert tree_digests(mnt) == expected
    assert d.stop() == 0
    stats = stats_of(d)
    assert int(stats["bytes_fetched"]) >= image_size, stats  # type: ignore[call-overload]
    assert int(stats["cull_trimmed"]) == 0 and int(stats["cull_culled"]) >= 1, stats  # type: ignore[call-overload]
    assert stats["fill_failed"] == 0 and stats["responses_failed"] == 0, stats
    assert d.count("fanotify.denied") == 0
    assert d.count("fanotify.over_limit_mounted") == 1

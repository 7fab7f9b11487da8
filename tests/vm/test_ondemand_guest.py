"""End to end on the real kernel: EROFS over fscache served by cachefilesd-py.

Each test builds EROFS images with mkfs.erofs, serves the blobs from nginx (HTTP range
requests) or ``file://``, mounts them with ``-o fsid=...``, and compares every file by
sha256 with its source tree.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefilesd_py.kernel.layout import object_path
from tests.vm.rig import Daemon, Nginx, mkfs_erofs, mount_erofs, run, tree_digests

pytestmark = [pytest.mark.guest, pytest.mark.ondemand]


def make_tree(root: Path, *, files: int = 40, big: int = 3 << 20, seed: int = 1) -> Path:
    """A source tree: small files of many sizes (inline tails), a few MB file, a
    symlink and nested directories."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(files):
        d = root / f"d{i % 5}" / f"e{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, 1, 100, 4095, 4096, 4097, 10000, 65536 + 17, 300_000])
        (d / f"f{i}.bin").write_bytes(rng.randbytes(size))
    (root / "big.bin").write_bytes(rng.randbytes(big))
    (root / "link").symlink_to("big.bin")
    (root / "README").write_text("served by cachefilesd-py\n")
    return root


def config(cache: Path, source_url: str, extra: str = "") -> str:
    return f"dir {cache}\ntag cfpytest\nondemand\nsource * {source_url}\nchunk_size 256K\n{extra}"


def serve_url(kind: str, blobs: Path, nginx: Callable[[Path], Nginx]) -> str:
    if kind == "http":
        return nginx(blobs).url + "/{cookie}"
    return f"file://{blobs}/{{cookie}}"


@pytest.mark.parametrize("kind", ["http", "file"])
@pytest.mark.parametrize("layout", ["plain", "inline"])
def test_serves_image_identical(
    kind: str,
    layout: str,
    workdir: Path,
    loop_fs: Callable[..., Path],
    nginx: Callable[[Path], Nginx],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
) -> None:
    src = make_tree(workdir / "src")
    blobs = workdir / "blobs"
    blobs.mkdir()
    extra = ("-Enoinline_data",) if layout == "plain" else ()
    mkfs_erofs(blobs / "img.erofs", src, *extra)
    cache = loop_fs(256)
    d = daemon(config(cache, serve_url(kind, blobs, nginx)))
    d.start()
    mnt = workdir / "mnt"
    mount_erofs(mnt, "img.erofs")
    mounts.append(mnt)
    assert tree_digests(mnt) == tree_digests(src)
    assert os.readlink(mnt / "link") == "big.bin"
    run("umount", str(mnt))
    mounts.remove(mnt)
    assert d.stop() == 0
    assert d.count("read.failed") == 0
    assert d.count("open") == 1
    # the kernel recorded the object size of our copen reply in its coherency xattr
    # (big-endian u64 first), and checks it at the next mount
    committed = object_path(cache, b"erofs,img.erofs", b"img.erofs")
    assert committed is not None and committed.exists()
    aux = os.getxattr(committed, "user.CacheFiles.cache")
    assert int.from_bytes(aux[:8], "big") == (blobs / "img.erofs").stat().st_size


def test_missing_blob_fails_mount_cleanly(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
) -> None:
    blobs = workdir / "blobs"
    blobs.mkdir()
    cache = loop_fs(64)
    d = daemon(config(cache, f"file://{blobs}/{{cookie}}"))
    d.start()
    (workdir / "mnt-absent").mkdir()
    res = run(
        "mount",
        "-t",
        "erofs",
        "none",
        "-o",
        "fsid=absent.erofs",
        str(workdir / "mnt-absent"),
        check=False,
    )
    assert res.returncode != 0
    assert d.count("open.refused") == 1, res.stderr
    # the daemon is still serving: a second attempt is answered again
    res = run(
        "mount",
        "-t",
        "erofs",
        "none",
        "-o",
        "fsid=absent2.erofs",
        str(workdir / "mnt-absent"),
        check=False,
    )
    assert res.returncode != 0
    assert d.count("open.refused") == 2
    assert d.stop() == 0


def test_chunked_image_with_external_blob(
    workdir: Path,
    loop_fs: Callable[..., Path],
    nginx: Callable[[Path], Nginx],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
) -> None:
    """``--chunksize`` + ``--blobdev``: metadata in one blob, file data in another;
    the kernel opens two cookies in one volume."""
    src = make_tree(workdir / "src", big=5 << 20, seed=2)
    blobs = workdir / "blobs"
    blobs.mkdir()
    mkfs_erofs(blobs / "meta.erofs", src, "--chunksize=65536", f"--blobdev={blobs / 'data.blob'}")
    cache = loop_fs(256)
    d = daemon(config(cache, nginx(blobs).url + "/{cookie}"))
    d.start()
    mnt = workdir / "mnt"
    mount_erofs(mnt, "meta.erofs", devices=("data.blob",))
    mounts.append(mnt)
    assert tree_digests(mnt) == tree_digests(src)
    run("umount", str(mnt))
    mounts.remove(mnt)
    assert d.stop() == 0
    assert d.count("open") == 2


def test_shared_domain_two_mounts(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
) -> None:
    """Two images in one ``domain_id`` share a volume; both read back identical."""
    src_a = make_tree(workdir / "a", seed=3)
    src_b = make_tree(workdir / "b", seed=4)
    blobs = workdir / "blobs"
    blobs.mkdir()
    mkfs_erofs(blobs / "a.erofs", src_a)
    mkfs_erofs(blobs / "b.erofs", src_b)
    cache = loop_fs(256)
    d = daemon(config(cache, f"file://{blobs}/{{cookie}}"))
    d.start()
    ma, mb = workdir / "ma", workdir / "mb"
    mount_erofs(ma, "a.erofs", domain="dom1")
    mounts.append(ma)
    mount_erofs(mb, "b.erofs", domain="dom1")
    mounts.append(mb)
    assert tree_digests(ma) == tree_digests(src_a)
    assert tree_digests(mb) == tree_digests(src_b)
    for m in (ma, mb):
        run("umount", str(m))
        mounts.remove(m)
    assert d.stop() == 0
    assert list((cache / "cache").glob("Ierofs,dom1/@*/Da.erofs"))
    assert list((cache / "cache").glob("Ierofs,dom1/@*/Db.erofs"))


def test_restart_serves_from_cache_without_reads(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
) -> None:
    """Clean shutdown order (umount, then stop the daemon), then a second daemon and
    a second mount: everything comes from the cache file, no READ at all."""
    src = make_tree(workdir / "src", seed=5)
    blobs = workdir / "blobs"
    blobs.mkdir()
    mkfs_erofs(blobs / "img.erofs", src)
    cache = loop_fs(128)
    d1 = daemon(config(cache, f"file://{blobs}/{{cookie}}"))
    d1.start()
    mnt = workdir / "mnt"
    mount_erofs(mnt, "img.erofs")
    mounts.append(mnt)
    first = tree_digests(mnt)
    run("umount", str(mnt))
    mounts.remove(mnt)
    assert d1.stop() == 0
    assert first == tree_digests(src)
    assert d1.count("presence.bound") == 1

    d2 = daemon(config(cache, f"file://{blobs}/{{cookie}}"))
    d2.start()
    mount_erofs(mnt, "img.erofs")
    mounts.append(mnt)
    assert tree_digests(mnt) == first
    run("umount", str(mnt))
    mounts.remove(mnt)
    assert d2.stop() == 0
    stats = [e for e in d2.read_events() if e.get("event") == "stats"]
    assert stats and stats[-1]["reads"] == 0, stats


def test_cache_on_xfs(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
) -> None:
    """The same serving with the cache directory on xfs (user xattrs, O_DIRECT, tmpfiles
    and SEEK_DATA all exist there too)."""
    src = make_tree(workdir / "src", seed=8)
    blobs = workdir / "blobs"
    blobs.mkdir()
    mkfs_erofs(blobs / "img.erofs", src)
    cache = loop_fs(320, "xfs")
    d = daemon(config(cache, f"file://{blobs}/{{cookie}}"))
    d.start()
    mnt = workdir / "mnt"
    mount_erofs(mnt, "img.erofs")
    mounts.append(mnt)
    assert tree_digests(mnt) == tree_digests(src)
    run("umount", str(mnt))
    mounts.remove(mnt)
    assert d.stop() == 0
    assert d.count("presence.bound") == 1

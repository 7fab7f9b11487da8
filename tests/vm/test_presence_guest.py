"""Presence sidecars on the real kernel: bound after a clean umount, trusted after a
restart, distrusted (and never served wrong) when the binding xattr is removed or the
sidecar is corrupt, and a blob larger than 1 GiB."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefilesd_py.blobkey import BlobKey
from cachefilesd_py.daemon.app import STATE_DIR_NAME
from cachefilesd_py.kernel.layout import object_path
from cachefilesd_py.presence.store import PresenceStore
from cachefilesd_py.presence.verify import verify
from cachefilesd_py.sources.file import FileSource
from cachefilesd_py.sources.policy import Deadline
from tests.vm.rig import (
    HUGE_REGIONS,
    Daemon,
    mkfs_erofs,
    mount_erofs,
    run,
    tree_digests,
    write_huge_tree,
)
from tests.vm.test_ondemand_guest import config, make_tree

pytestmark = [pytest.mark.guest, pytest.mark.ondemand]

BINDING_XATTR = "user.cachefilesd_py.presence"
CHUNK = 256 * 1024


def serve_once(d: Daemon, mnt: Path, fsid: str, mounts: list[Path]) -> dict[str, str]:
    d.start()
    mount_erofs(mnt, fsid)
    mounts.append(mnt)
    digests = tree_digests(mnt)
    run("umount", str(mnt))
    mounts.remove(mnt)
    assert d.stop() == 0
    return digests


def stats(d: Daemon) -> dict[str, object]:
    found = [e for e in d.read_events() if e.get("event") == "stats"]
    assert found, "daemon logged no stats at exit"
    return found[-1]


def load_and_verify(
    cache: Path, blob: Path, fsid: str, chunk: int = CHUNK
) -> tuple[object, object]:
    """Load the blob's sidecar as the daemon would (``chunk`` must be the daemon's
    chunk size, or the sidecar is rightly distrusted and loads empty) and verify it."""
    key = BlobKey.named(fsid, fsid)
    path = key.cache_path(cache)
    store = PresenceStore(cache / STATE_DIR_NAME / "presence")
    source = FileSource(str(blob))
    identity = source.identity(Deadline.after(10))
    presence = store.load(key, path, identity.size, identity.token(), chunk_size=chunk)

    def read_source(off: int, n: int) -> bytes:
        with open(blob, "rb") as f:
            f.seek(off)
            return f.read(n)

    return presence, verify(presence, path, read_source)


@pytest.fixture
def served(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
) -> tuple[Path, Path, Path, dict[str, str], Callable[[], Daemon]]:
    src = make_tree(workdir / "src", seed=11)
    blobs = workdir / "blobs"
    blobs.mkdir()
    mkfs_erofs(blobs / "p.erofs", src)
    cache = loop_fs(128)
    text = config(cache, f"file://{blobs}/{{cookie}}")
    first = serve_once(daemon(text), workdir / "mnt", "p.erofs", mounts)
    assert first == tree_digests(src)
    return cache, blobs / "p.erofs", src, first, lambda: daemon(text)


def test_sidecar_bound_and_verified_after_restart(served, workdir, mounts) -> None:  # type: ignore[no-untyped-def]
    cache, blob, _src, first, new_daemon = served
    presence, report = load_and_verify(cache, blob, "p.erofs")
    assert presence.trusted, "sidecar of a cleanly unmounted blob must be trusted"
    assert presence.bitmap.count() > 0
    assert report.ok, report
    d2 = new_daemon()
    assert serve_once(d2, workdir / "mnt", "p.erofs", mounts) == first
    assert stats(d2)["reads"] == 0
    assert d2.count("open.unvouched_file_discarded") == 0


def test_removed_binding_xattr_is_distrusted(served, workdir, mounts) -> None:  # type: ignore[no-untyped-def]
    cache, blob, _src, first, new_daemon = served
    path = object_path(cache, b"erofs,p.erofs", b"p.erofs")
    os.removexattr(path, BINDING_XATTR)
    presence, _ = load_and_verify(cache, blob, "p.erofs")
    assert not presence.trusted
    d2 = new_daemon()
    assert serve_once(d2, workdir / "mnt", "p.erofs", mounts) == first
    assert d2.count("open.unvouched_file_discarded") == 1
    assert stats(d2)["reads"] > 0  # the discarded file was filled again
    presence, report = load_and_verify(cache, blob, "p.erofs")
    assert presence.trusted and report.ok


def test_corrupt_sidecar_is_distrusted(served, workdir, mounts) -> None:  # type: ignore[no-untyped-def]
    cache, blob, _src, first, new_daemon = served
    sidecars = [p for p in (cache / STATE_DIR_NAME / "presence").rglob("*") if p.is_file()]
    assert len(sidecars) == 1
    data = bytearray(sidecars[0].read_bytes())
    for off in range(0, len(data), 97):
        data[off] ^= 0x5A
    sidecars[0].write_bytes(bytes(data))
    d2 = new_daemon()
    assert serve_once(d2, workdir / "mnt", "p.erofs", mounts) == first
    assert d2.count("presence.distrusted") >= 1
    presence, report = load_and_verify(cache, blob, "p.erofs")
    assert presence.trusted and report.ok


def test_blob_larger_than_1gib(
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
) -> None:
    """A 1.2 GiB blob (sparse on disk): read regions on both sides of the 1 GiB mark,
    then the bitmap bits above chunk 4096 must be persisted, bound and verified."""
    src = workdir / "src"
    huge = write_huge_tree(src)
    regions = HUGE_REGIONS
    blobs = workdir / "blobs"
    blobs.mkdir()
    image = mkfs_erofs(blobs / "huge.erofs", src, "-Enoinline_data")
    subprocess.run(["fallocate", "--dig-holes", str(image)], check=True)
    assert image.stat().st_size > 1 << 30
    cache = loop_fs(256)
    d = daemon(config(cache, f"file://{blobs}/{{cookie}}"))
    d.start()
    mnt = workdir / "mnt"
    mount_erofs(mnt, "huge.erofs")
    mounts.append(mnt)
    with open(mnt / "huge.bin", "rb") as got, open(huge, "rb") as want:
        for off, n in regions:
            got.seek(off)
            want.seek(off)
            assert got.read(n) == want.read(n), f"region at {off}"
    run("umount", str(mnt))
    mounts.remove(mnt)
    assert d.stop() == 0
    presence, report = load_and_verify(cache, image, "huge.erofs")
    assert presence.trusted
    high = [i for i in range(4096, presence.geometry.nchunks) if presence.is_present(i)]
    assert high, "no chunk above 1 GiB recorded"
    assert report.ok, report

"""Broken HTTP sources on the real kernel: every fault ends in correct data after a
retry or in a clean EIO; the daemon stays up; no wrong byte reaches a reader."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefilesd_py.testing.fault_server import FaultServer
from tests.vm.rig import (
    Daemon,
    mkfs_erofs,
    mount_tracked,
    run,
    sha256_file,
    tree_digests,
    umount_tracked,
)
from tests.vm.test_ondemand_guest import make_tree

pytestmark = [pytest.mark.guest, pytest.mark.ondemand]


def read_all(mnt: Path, want: dict[str, str]) -> tuple[int, int]:
    """Read every file; each must be correct or fail with EIO. (ok, eio) counts."""
    ok = eio = 0
    for rel, digest in want.items():
        try:
            got = sha256_file(mnt / rel)
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
            eio += 1
            continue
        assert got == digest, f"wrong bytes served for {rel}"
        ok += 1
    return ok, eio


@pytest.fixture
def served(workdir: Path, loop_fs: Callable[..., Path], daemon: Callable[[str], Daemon]):  # type: ignore[no-untyped-def]
    src = make_tree(workdir / "src", files=30, big=2 << 20, seed=21)
    image = mkfs_erofs(workdir / "img.erofs", src)
    srv = FaultServer({"img.erofs": image.read_bytes()}, stall_seconds=8).__enter__()
    cache = loop_fs(128)
    d = daemon(
        f"dir {cache}\nondemand\nsource * {srv.url}/{{cookie}}\nchunk_size 64K\n"
        "readahead 0\nfetch_retries 3\nfetch_timeout 3\n"
    )
    d.start()
    yield src, srv, d
    srv.__exit__(None, None, None)


def test_transient_faults_recover(served, workdir: Path, mounts: list[Path]) -> None:  # type: ignore[no-untyped-def]
    src, srv, d = served
    mnt = workdir / "mnt"
    mount_tracked(mnt, "img.erofs", mounts)
    want = tree_digests(src)
    kinds = ("500", "reset", "truncate", "bad-range", "long", "503")
    run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
    for i, (rel, digest) in enumerate(sorted(want.items())):
        if not srv.pending("img.erofs"):  # at most one fault outstanding at a time
            srv.fault("img.erofs", kinds[i % len(kinds)])
        assert sha256_file(mnt / rel) == digest, rel
    umount_tracked(mnt, mounts)
    assert d.stop() == 0
    stats = [e for e in d.read_events() if e.get("event") == "stats"][-1]
    assert stats["reads_failed"] == 0
    assert d.count("http.retry") >= 6


def test_persistent_faults_give_eio_then_recover(
    served,
    workdir: Path,  # type: ignore[no-untyped-def]
    mounts: list[Path],
) -> None:
    src, srv, d = served
    mnt = workdir / "mnt"
    mount_tracked(mnt, "img.erofs", mounts)
    srv.fault("img.erofs", "500", times=100_000)

    want = tree_digests(src)
    _ok, eio = read_all(mnt, want)
    assert eio > 0, "every file was already cached: the test proves nothing"
    assert d.proc is not None and d.proc.poll() is None, "daemon died"
    srv.clear_faults()
    run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
    assert read_all(mnt, want) == (len(want), 0)
    umount_tracked(mnt, mounts)
    assert d.stop() == 0


def test_stall_ends_in_eio_not_a_hang(served, workdir: Path, mounts: list[Path]) -> None:  # type: ignore[no-untyped-def]
    src, srv, d = served
    mnt = workdir / "mnt"
    mount_tracked(mnt, "img.erofs", mounts)
    srv.fault("img.erofs", "stall", times=100)
    start = time.monotonic()
    with pytest.raises(OSError) as e, open(mnt / "big.bin", "rb") as f:
        f.read()
    assert e.value.errno == errno.EIO
    assert time.monotonic() - start < 60, "a stalled source hung the reader"
    srv.clear_faults()
    assert d.proc is not None and d.proc.poll() is None
    with open(mnt / "big.bin", "rb") as f, open(src / "big.bin", "rb") as g:
        assert f.read() == g.read()
    umount_tracked(mnt, mounts)
    assert d.stop() == 0


def test_blob_changed_upstream_is_refused(served, workdir: Path, mounts: list[Path]) -> None:  # type: ignore[no-untyped-def]
    src, srv, d = served
    mnt = workdir / "mnt"
    mount_tracked(mnt, "img.erofs", mounts)
    data = srv.blobs["img.erofs"]
    srv.replace("img.erofs", data[:4096] + os.urandom(len(data) - 4096), '"v2"')
    want = tree_digests(src)
    _ok, eio = read_all(mnt, want)
    assert eio > 0
    assert d.count("read.failed") > 0
    umount_tracked(mnt, mounts)
    assert d.stop() == 0

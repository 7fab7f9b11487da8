"""Read-ahead on the real kernel's READ pattern: a sequential reader is served with few
READs (the stream is recognised from the kernel's READ offsets), scattered random reads
fetch their chunks and nothing ahead of them."""

from __future__ import annotations

import os
import random
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vm.rig import Daemon, mkfs_erofs, mount_tracked, sha256_file, umount_tracked
from tests.vm.test_presence_guest import stats as last_stats

pytestmark = [pytest.mark.guest, pytest.mark.ondemand]

MiB = 1 << 20
CHUNK = 256 * 1024
FILE_SIZE = 64 * MiB


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """One image for both tests (the guest's /tmp is RAM), removed afterwards."""
    work = tmp_path_factory.mktemp("ra-image")
    src, blobs = work / "src", work / "blobs"
    src.mkdir()
    blobs.mkdir()
    with open(src / "data.bin", "wb") as f:
        for _ in range(FILE_SIZE // MiB):
            f.write(os.urandom(MiB))
    mkfs_erofs(blobs / "ra.erofs", src, "-Enoinline_data")
    yield src, blobs
    shutil.rmtree(work)


def final_stats(d: Daemon) -> dict[str, object]:
    assert d.stop() == 0
    return last_stats(d)


@pytest.fixture
def served(
    image: tuple[Path, Path],
    workdir: Path,
    loop_fs: Callable[..., Path],
    daemon: Callable[[str], Daemon],
    mounts: list[Path],
) -> tuple[Path, Path, Daemon]:
    """The image mounted through a running daemon: (source tree, mount point, daemon)."""
    src, blobs = image
    d = daemon(
        f"dir {loop_fs(160)}\ntag ra\nondemand\nsource * file://{blobs}/{{cookie}}\n"
        f"chunk_size {CHUNK // 1024}K\nreadahead 4M\n"
    )
    d.start()
    mnt = workdir / "mnt"
    mount_tracked(mnt, "ra.erofs", mounts)
    return src, mnt, d


def test_sequential_reader_needs_few_reads(
    served: tuple[Path, Path, Daemon], mounts: list[Path]
) -> None:
    src, mnt, d = served
    assert sha256_file(mnt / "data.bin") == sha256_file(src / "data.bin")
    # a running daemon logs its stats on SIGUSR1 (not only at exit)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGUSR1)
    assert d.wait_for("stats", timeout=20), "no stats line after SIGUSR1"
    [live] = [e for e in d.read_events() if e.get("event") == "stats"]
    assert live["final"] is False and int(live["reads"]) > 0, live  # type: ignore[call-overload]
    umount_tracked(mnt, mounts)
    stats = final_stats(d)
    assert stats["final"] is True
    reads = int(stats["reads"])  # type: ignore[call-overload]
    # without read-ahead every kernel READ (its own read-ahead size at most) is a round
    # trip: hundreds of them for 64 MiB; with windows up to 4 MiB, about one per window
    assert reads <= FILE_SIZE // (4 * MiB) + 24, stats


def test_scattered_random_reads_fetch_nothing_ahead(
    served: tuple[Path, Path, Daemon], mounts: list[Path]
) -> None:
    src, mnt, d = served
    rng = random.Random(5)
    # 40 reads, each in its own 1.5 MiB stretch, in random order: no two are adjacent
    stretch = 3 * MiB // 2
    offsets = [k * stretch + rng.randrange(0, MiB // 2 // 4096) * 4096 for k in range(40)]
    rng.shuffle(offsets)
    with open(src / "data.bin", "rb") as want, open(mnt / "data.bin", "rb") as got:
        for off in offsets:
            want.seek(off)
            got.seek(off)
            assert got.read(4096) == want.read(4096), off
    umount_tracked(mnt, mounts)
    stats = final_stats(d)
    fetched = int(stats["bytes_fetched"])  # type: ignore[call-overload]
    # each read may cost a chunk or two (the kernel's own read-ahead can cross a chunk
    # boundary) plus the image's metadata; read-ahead after every READ would fetch
    # 4 MiB per read, i.e. the whole 64 MiB file
    assert fetched <= 40 * 2 * CHUNK + 4 * MiB, stats

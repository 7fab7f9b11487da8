"""The EROFS layout reader against the real kernel: a sparse copy of an image holding
only the ranges the reader names is mounted from a loop device (``mount -t erofs -o
ro``, the extra blob as a second loop device with ``device=``), and:

- with ``needs(PATH)``: the file reads back with the source's sha256 (the ranges are
  complete: superblock, the path's directories and inodes, the file's data), while a
  file outside them fails to read or reads wrong bytes;
- with ``metadata()``: ``ls -lR``-style walking (``stat`` of everything, every
  directory listed, every symlink read) works and matches the source tree, while the
  files' contents do not come back.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cachefilesd_py.erofs.layout import ErofsImage
from cachefilesd_py.erofs.ranges import RangeSet
from cachefilesd_py.testing.erofs_images import (
    VARIANTS,
    Variant,
    build,
    file_reader,
    make_tree,
    sparse_copy,
)
from tests.vm.rig import run

pytestmark = pytest.mark.guest

FLAT_VARIANTS = [v for v in VARIANTS if not v.compressed]
TARGETS = ["/big", "/b4097", "/d1/d2/d3/d4/leaf", "/many/file-0042-xx"]  # file-0042 has 42 % 40 x


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("erofs-src") / "src", small_files=60)


@contextmanager
def mounted(image: Path, blob: Path | None, mnt: Path) -> Iterator[Path]:
    loops = [run("losetup", "-f", "--show", "-r", str(image)).stdout.strip()]
    try:
        opts = "ro"
        if blob is not None:
            loops.append(run("losetup", "-f", "--show", "-r", str(blob)).stdout.strip())
            opts += f",device={loops[1]}"
        mnt.mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "erofs", "-o", opts, loops[0], str(mnt))
        try:
            yield mnt
        finally:
            run("umount", str(mnt), check=False)
    finally:
        for loop in loops:
            run("losetup", "-d", loop, check=False)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reads_wrong(path: Path, want: str) -> bool:
    try:
        return sha(path) != want
    except OSError:
        return True


def sparse(
    image: Path, blob: Path | None, ranges: dict[int, RangeSet], out: Path
) -> tuple[Path, Path | None]:
    out.mkdir(parents=True, exist_ok=True)
    s_image = sparse_copy(image, out / "s.erofs", ranges.get(0, RangeSet()))
    s_blob = sparse_copy(blob, out / "s.blob", ranges.get(1, RangeSet())) if blob else None
    return s_image, s_blob


def open_image(image: Path) -> ErofsImage:
    read, size = file_reader(image)
    return ErofsImage(read, size)


@pytest.mark.parametrize("variant", FLAT_VARIANTS, ids=lambda v: v.name)
def test_a_paths_ranges_are_enough_for_the_kernel(
    tree: Path, tmp_path: Path, variant: Variant
) -> None:
    image, blob = build(variant, tree, tmp_path)
    img = open_image(image)
    for target in TARGETS:
        needs = img.needs(target)
        assert not needs.whole
        s_image, s_blob = sparse(image, blob, needs.ranges, tmp_path / target.strip("/"))
        with mounted(s_image, s_blob, tmp_path / "mnt") as mnt:
            assert sha(mnt / target[1:]) == sha(tree / target[1:]), target
            # files whose ranges were left out do not read right
            for other in (t for t in TARGETS if t != target):
                assert reads_wrong(mnt / other[1:], sha(tree / other[1:])), other


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_the_metadata_ranges_are_enough_for_ls_and_stat(
    tree: Path, tmp_path: Path, variant: Variant
) -> None:
    image, blob = build(variant, tree, tmp_path)
    meta = open_image(image).metadata()
    assert not meta.whole
    s_image, s_blob = sparse(image, blob, meta.ranges, tmp_path / "meta")
    with mounted(s_image, s_blob, tmp_path / "mnt") as mnt:
        seen = 0
        for dirpath, dirs, files in os.walk(tree):
            rel = Path(dirpath).relative_to(tree)
            assert sorted(os.listdir(mnt / rel)) == sorted(dirs + files), rel
            for name in dirs + files:
                want = os.lstat(Path(dirpath, name))
                got = os.lstat(mnt / rel / name)
                assert stat.S_IFMT(got.st_mode) == stat.S_IFMT(want.st_mode)
                assert got.st_nlink == want.st_nlink
                if stat.S_ISLNK(want.st_mode):
                    assert os.readlink(mnt / rel / name) == os.readlink(Path(dirpath, name))
                elif stat.S_ISREG(want.st_mode):
                    assert got.st_size == want.st_size
                seen += 1
        assert seen > 60
        if not variant.compressed:
            assert reads_wrong(mnt / "big", sha(tree / "big"))
            assert reads_wrong(mnt / "b4097", sha(tree / "b4097"))

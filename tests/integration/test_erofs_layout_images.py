"""The EROFS layout reader against real images from ``mkfs.erofs`` (erofs-utils 1.5),
in every layout it makes, checked against three independent truths:

1. the source tree: every path, type and size is found, and every regular file's
   bytes, read back through the extents the reader names, equal the source file's;
2. ``dump.erofs -e`` (erofs-utils' own reader): the same extents, device included;
3. ``fsck.erofs --extract`` (erofs-utils' own reader again) on a *sparse copy* that
   holds only the ranges the reader names: the metadata ranges alone must let it
   extract the whole tree (every directory, symlink and size right), a file's bytes
   come out right only when that file's ranges are added, and files left out come
   out wrong (zeros): so the ranges are complete, and no more than needed.

The real kernel's view of the same sparse copies is checked in the guest tier
(``tests/vm/test_erofs_layout_guest.py``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from cachefilesd_py.erofs.format import ErofsCorrupt
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

pytestmark = pytest.mark.skipif(
    shutil.which("mkfs.erofs") is None, reason="needs erofs-utils (scripts/setup)"
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("erofs-src") / "src")


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v.name)
def built(
    request: pytest.FixtureRequest, tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Variant, Path, Path | None]:
    variant: Variant = request.param
    image, blob = build(variant, tree, tmp_path_factory.mktemp(variant.name))
    return variant, image, blob


def open_image(image: Path, blob: Path | None) -> ErofsImage:
    read, size = file_reader(image)
    sizes = {1: blob.stat().st_size} if blob is not None else None
    return ErofsImage(read, size, device_sizes=sizes)


def source_paths(tree: Path) -> dict[str, os.stat_result]:
    out = {"/": tree.lstat()}
    for dirpath, dirs, files in os.walk(tree):
        for name in dirs + files:
            p = Path(dirpath, name)
            out["/" + str(p.relative_to(tree))] = p.lstat()
    return out


def test_walk_finds_every_path_with_its_type_and_size(
    tree: Path, built: tuple[Variant, Path, Path | None]
) -> None:
    _v, image, blob = built
    img = open_image(image, blob)
    found = dict(img.walk("/"))
    want = source_paths(tree)
    assert set(found) == set(want)
    for path, st in want.items():
        ino = found[path]
        assert stat.S_IFMT(ino.mode) == stat.S_IFMT(st.st_mode), path
        if not stat.S_ISDIR(st.st_mode):
            assert ino.size == st.st_size, path
    # hard links: one inode
    assert found["/mid"].nid == found["/d1/mid-hardlink"].nid


def read_through_extents(img: ErofsImage, path: str, blobs: dict[int, bytes]) -> bytes:
    ino = img.lookup(path)[-1]
    out = bytearray(ino.size)
    for ext in img.extents(ino):
        if ext.hole:
            continue
        n = min(ext.length, ino.size - ext.logical)
        out[ext.logical : ext.logical + n] = blobs[ext.device][ext.offset : ext.offset + n]
    return bytes(out)


def test_extents_hold_the_files_bytes(
    tree: Path, built: tuple[Variant, Path, Path | None]
) -> None:
    _variant, image, blob = built
    img = open_image(image, blob)
    blobs = {0: image.read_bytes()}
    if blob is not None:
        blobs[1] = blob.read_bytes()
    checked = 0
    for path, st in source_paths(tree).items():
        src = tree / path.lstrip("/")
        if img.lookup(path)[-1].compressed:
            continue  # not mapped here: the whole blob is named instead
        if stat.S_ISREG(st.st_mode):
            assert read_through_extents(img, path, blobs) == src.read_bytes(), path
            checked += 1
        elif stat.S_ISLNK(st.st_mode):
            assert read_through_extents(img, path, blobs) == os.readlink(src).encode(), path
    assert checked > 30


DUMP_EXTENT = re.compile(
    r"^\s*\d+:\s+(\d+)\.\.\s*(\d+)\s*\|\s*(\d+)\s*:"
    r"\s*(\d+)\.\.\s*(\d+)\s*\|\s*(\d+)(\s+# device (\d+))?"
)


def dump_extents(image: Path, blob: Path | None, path: str) -> list[tuple[int, int, int, int]]:
    argv = ["dump.erofs", "-e", f"--path={path}"]
    if blob is not None:
        argv.append(f"--device={blob}")
    out = subprocess.run([*argv, str(image)], check=True, capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        m = DUMP_EXTENT.match(line)
        if m:
            found.append((int(m.group(1)), int(m.group(8) or 0), int(m.group(4)), int(m.group(6))))
    return found


@pytest.mark.parametrize("path", ["/big", "/mid", "/b4097", "/b4096", "/one", "/d1/d2/d3/d4/leaf"])
def test_extents_agree_with_dump_erofs(built: tuple[Variant, Path, Path | None], path: str) -> None:
    variant, image, blob = built
    if variant.compressed:
        pytest.skip("compressed extents are not mapped")
    img = open_image(image, blob)
    ours = [
        (e.logical, e.device, e.offset, e.length)
        for e in img.extents(img.lookup(path)[-1])
        if not e.hole
    ]
    assert ours == dump_extents(image, blob, path)


def fsck_extract(image: Path, blob: Path | None, dest: Path) -> subprocess.CompletedProcess[str]:
    argv = ["fsck.erofs", f"--extract={dest}", "--no-preserve"]
    if blob is not None:
        argv.append(f"--device={blob}")
    return subprocess.run([*argv, str(image)], capture_output=True, text=True, check=False)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def sparse_pair(
    img: ErofsImage, image: Path, blob: Path | None, ranges: dict[int, RangeSet], out: Path
) -> tuple[Path, Path | None]:
    s_image = sparse_copy(image, out / "sparse.erofs", ranges.get(0, RangeSet()))
    s_blob = None
    if blob is not None:
        s_blob = sparse_copy(blob, out / "sparse.blob", ranges.get(1, RangeSet()))
    return s_image, s_blob


@pytest.mark.parametrize("target", ["/big", "/mid", "/b4097", "/many/file-0123-" + "x" * 3])
def test_metadata_plus_one_files_ranges_extract_that_file_only(
    tree: Path, built: tuple[Variant, Path, Path | None], tmp_path: Path, target: str
) -> None:
    variant, image, blob = built
    img = open_image(image, blob)
    meta = img.metadata()
    file_needs = img.needs(target)
    ranges = {d: RangeSet(list(rs)) for d, rs in meta.ranges.items()}
    if file_needs.whole:
        assert variant.compressed and 0 in file_needs.whole
        ranges[0] = RangeSet([(0, image.stat().st_size)])
    elif variant.compressed:
        # stored uncompressed (lz4 did not shrink it); fsck would extract every other
        # file too, and those need their compressed data: check the bytes directly
        blobs = {0: sparse_copy(image, tmp_path / "s.erofs", file_needs.for_device(0)).read_bytes()}
        assert read_through_extents(img, target, blobs) == (tree / target[1:]).read_bytes()
        return
    for d, rs in file_needs.ranges.items():
        ranges.setdefault(d, RangeSet()).update(rs)
    s_image, s_blob = sparse_pair(img, image, blob, ranges, tmp_path)
    dest = tmp_path / "out"
    res = fsck_extract(s_image, s_blob, dest)
    assert res.returncode == 0, res.stderr
    assert sha(dest / target.lstrip("/")) == sha(tree / target.lstrip("/"))
    if variant.compressed:
        return
    # a file whose ranges were left out comes out wrong
    for other in ("/d1/d2/d3/d4/leaf", "/b4095"):
        if other != target:
            assert sha(dest / other.lstrip("/")) != sha(tree / other.lstrip("/")), other


def test_metadata_alone_gives_the_whole_tree_but_no_file_data(
    tree: Path, built: tuple[Variant, Path, Path | None], tmp_path: Path
) -> None:
    variant, image, blob = built
    img = open_image(image, blob)
    meta = img.metadata()
    assert not meta.whole
    s_image, s_blob = sparse_pair(img, image, blob, meta.ranges, tmp_path)
    dest = tmp_path / "out"
    res = fsck_extract(s_image, s_blob, dest)
    if variant.compressed:
        # without the compressed data fsck cannot decompress: it must say so
        assert res.returncode != 0
        return
    assert res.returncode == 0, res.stderr
    want = source_paths(tree)
    got = source_paths(dest)
    assert set(got) == set(want)
    wrong = 0
    for path, st in want.items():
        assert stat.S_IFMT(got[path].st_mode) == stat.S_IFMT(st.st_mode), path
        src, out = tree / path.lstrip("/"), dest / path.lstrip("/")
        if stat.S_ISLNK(st.st_mode):
            assert os.readlink(out) == os.readlink(src), path
        elif stat.S_ISREG(st.st_mode):
            assert got[path].st_size == st.st_size, path
            if st.st_size and sha(out) != sha(src):
                wrong += 1
    nonempty = sum(1 for p, st in want.items() if stat.S_ISREG(st.st_mode) and st.st_size)
    # metadata holds no file data (tail-packed bytes included): every non-empty file
    # comes out wrong, except pattern files that happen to begin with zeros and are short
    assert wrong >= nonempty - 3


def test_metadata_is_a_small_part_of_the_image(built: tuple[Variant, Path, Path | None]) -> None:
    _v, image, blob = built
    img = open_image(image, blob)
    meta = img.metadata()
    assert set(meta.ranges) == {0}  # metadata lives in the primary blob only
    everything = image.stat().st_size + (blob.stat().st_size if blob else 0)
    assert 0 < meta.total() < everything // 4


def test_a_missing_path_is_not_found(built: tuple[Variant, Path, Path | None]) -> None:
    _v, image, blob = built
    img = open_image(image, blob)
    with pytest.raises(FileNotFoundError):
        img.needs("/d1/nope")
    with pytest.raises(FileNotFoundError):
        img.needs("/big/under-a-file")


def test_a_truncated_image_is_corrupt(built: tuple[Variant, Path, Path | None]) -> None:
    _v, image, _blob = built
    data = image.read_bytes()[:8192]
    with pytest.raises(ErofsCorrupt):
        ErofsImage(lambda o, n: data[o : o + n], len(data)).metadata()

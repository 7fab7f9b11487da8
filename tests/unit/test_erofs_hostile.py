"""Hostile EROFS images: the layout reader gives a clear error (``ErofsCorrupt``), never
a hang, a huge allocation or another exception. Targeted corruptions of the seed
images (built by ``mkfs.erofs`` 1.5, kept in ``fuzz/corpus/erofs_layout/``), then
hypothesis mutating bytes anywhere through the fuzz harness."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefilesd_py.erofs.format import DIRENT_SIZE, ErofsCorrupt, ErofsUnsupported
from cachefilesd_py.erofs.layout import ErofsImage
from fuzz.fuzz_erofs_layout import TestOneInput

SEEDS = Path(__file__).resolve().parents[2] / "fuzz" / "corpus" / "erofs_layout"
SEED_BYTES = {p.stem: p.read_bytes() for p in sorted(SEEDS.glob("*.img"))}


def image(data: bytes | bytearray) -> ErofsImage:
    blob = bytes(data)
    return ErofsImage(lambda o, n: blob[o : o + n], len(blob))


def test_the_seeds_are_whole_images() -> None:
    assert len(SEED_BYTES) >= 7
    for name, data in SEED_BYTES.items():
        img = image(data)
        paths = {p for p, _ in img.walk("/")}
        assert {"/d/a", "/d/e/b", "/d/e/hard", "/l", "/empty"} <= paths, name
        assert img.metadata().total() > 0


def dirent_offset(data: bytes, dir_path: str, name: bytes) -> int:
    """Byte offset of ``name``'s dirent in directory ``dir_path``."""
    img = image(data)
    ino = img.lookup(dir_path)[-1]
    (ext,) = [e for e in img.extents(ino)]
    for i, ent in enumerate(img.listdir(ino)):
        if ent.name == name:
            return ext.offset + i * DIRENT_SIZE
    raise AssertionError(name)


def patched(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def test_a_directory_that_contains_itself() -> None:
    data = SEED_BYTES["inline"]
    d_nid = image(data).lookup("/d")[-1].nid
    loop = patched(data, dirent_offset(data, "/d", b"e"), "<Q", d_nid)
    with pytest.raises(ErofsCorrupt, match="directory loop"):
        image(loop).metadata()


def test_a_dirent_pointing_past_the_image() -> None:
    data = SEED_BYTES["inline"]
    far = patched(data, dirent_offset(data, "/d", b"a"), "<Q", 1 << 40)
    with pytest.raises(ErofsCorrupt, match="past the image"):
        image(far).needs("/d/a")


def test_a_bogus_first_nameoff() -> None:
    data = SEED_BYTES["plain"]
    first = dirent_offset(data, "/d", b".")
    for nameoff in (0, 5, 4096, 60000):
        with pytest.raises(ErofsCorrupt, match="nameoff"):
            image(patched(data, first + 8, "<H", nameoff)).metadata()


def test_a_huge_chunked_file_is_refused_before_any_allocation() -> None:
    data = SEED_BYTES["chunk-indexes"]
    ino = image(data).lookup("/d/e/b")[-1]
    assert not ino.extended
    huge = patched(data, ino.offset + 8, "<I", 0xFFFFFFFF)  # i_size: 4 GiB of 8 KiB chunks
    with pytest.raises(ErofsCorrupt, match="chunk entries do not fit"):
        image(huge).needs("/d/e/b")
    # the metadata walk names chunk tables without mapping the chunks: it checks too
    # (it once named a table running past the image's end; found by mutation fuzzing)
    with pytest.raises(ErofsCorrupt, match="chunk entries do not fit"):
        image(huge).metadata()


def test_a_chunk_on_a_device_that_does_not_exist() -> None:
    # the blobdev seed has one extra device; claim two, so that device ids are masked
    # with 3, then point a chunk at device 3
    data = patched(SEED_BYTES["blobdev-primary"], 1024 + 86, "<H", 2)
    img = image(data)
    assert len(img.devices) == 2
    ino = img.lookup("/d/e/b")[-1]
    assert [e.device for e in img.extents(ino)] == [1]
    table = -(-ino.end // 8) * 8
    bad = patched(data, table + 2, "<H", 3)
    with pytest.raises(ErofsCorrupt, match="no slot"):
        list(image(bad).extents(ino))
    # without a device table the kernel ignores the id (its mask is 0): so does the reader
    plain = SEED_BYTES["chunk-indexes"]
    ino = image(plain).lookup("/d/e/b")[-1]
    odd = patched(plain, -(-ino.end // 8) * 8 + 2, "<H", 7)
    assert [e.device for e in image(odd).extents(ino)] == [0]


def test_flat_data_past_the_image() -> None:
    data = SEED_BYTES["plain"]
    ino = image(data).lookup("/d/e/b")[-1]
    bad = patched(data, ino.offset + 16, "<I", 0xFFFFFF)  # raw_blkaddr
    with pytest.raises(ErofsCorrupt, match="past the image"):
        image(bad).needs("/d/e/b")


def test_inline_data_across_a_block() -> None:
    data = SEED_BYTES["inline"]
    ino = image(data).lookup("/d/a")[-1]
    bad = patched(data, ino.offset + 8, "<I", 4096 + 4000)  # a 4000-byte tail cannot fit
    with pytest.raises(ErofsCorrupt):
        image(bad).needs("/d/a")


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "error"),
    [
        (1024, "<I", 0x12345678, ErofsCorrupt),  # magic
        (1024 + 12, "<B", 20, ErofsUnsupported),  # blkszbits
        (1024 + 80, "<I", 0x80, ErofsUnsupported),  # an unknown incompat feature
        (1024 + 13, "<B", 250, ErofsCorrupt),  # sb_extslots
    ],
)
def test_superblock_rules(offset: int, fmt: str, value: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        image(patched(SEED_BYTES["inline"], offset, fmt, value))


@pytest.mark.parametrize("seed", sorted(SEED_BYTES))
def test_truncated_images(seed: str) -> None:
    data = SEED_BYTES[seed]
    for cut in range(0, len(data), 512):
        TestOneInput(data[:cut])
    for cut in (0, 100, 1100):  # no whole superblock
        with pytest.raises(ErofsCorrupt):
            image(data[:cut])


mutations = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=24)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SEED_BYTES)), mutations, st.booleans())
def test_mutated_seeds_never_raise_anything_else(
    seed: str, changes: list[tuple[int, int]], in_metadata: bool
) -> None:
    data = bytearray(SEED_BYTES[seed])
    # half the time aim at the first 8 KiB, where the superblock, inodes and dirents are
    span = min(len(data), 8192) if in_metadata else len(data)
    for pos, value in changes:
        data[pos % span] = value
    TestOneInput(bytes(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_after_a_valid_superblock(tail: bytes) -> None:
    data = bytearray(SEED_BYTES["inline"])
    data[1024 + 128 : 1024 + 128 + len(tail)] = tail[: len(data) - 1152]
    TestOneInput(bytes(data))

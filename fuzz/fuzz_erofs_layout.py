"""EROFS image bytes → the layout reader's answers, or ``ErofsError`` /
``FileNotFoundError``; never another exception, a hang, or a range outside the image.

``data`` is the primary blob. The harness reads the superblock and device table,
lists the metadata of the whole image, walks the tree, and asks what each of the
first paths needs. Every range it is given must lie inside the image (device 0) and
be sorted and disjoint; every count the reader loops over is bounded by the image's
size, so an input of ``MAX_LEN`` bytes finishes in well under a second.

Seeds in ``fuzz/corpus/erofs_layout/`` are small images from ``mkfs.erofs`` 1.5 (a
few files, a hard link, a symlink, an xattr) in each layout: flat inline, flat plain,
extended inodes, chunk-based with a block map and with indexes, the primary blob of
an image whose chunks are in an extra blob (``--blobdev``), and lz4hc-compressed.
"""

from __future__ import annotations

from itertools import islice

from cachefilesd_py.erofs.format import MAGIC, ErofsError
from cachefilesd_py.erofs.layout import ErofsImage
from cachefilesd_py.erofs.ranges import Needs

MAX_LEN = 65536
TOKENS = (MAGIC.to_bytes(4, "little"), b"\xff\xff\xff\xff", b"\x00\x00\x00\x00")
PATHS = 32


def _check(needs: Needs, size: int) -> None:
    for device, ranges in needs.ranges.items():
        last_end = -1
        for start, end in ranges:
            assert last_end < start < end, (device, start, end)
            last_end = end
            if device == 0:
                assert end <= size, (start, end, size)


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the libFuzzer entry point's name
    def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    try:
        img = ErofsImage(read, len(data))
        _check(img.metadata(), len(data))
        for path, _ino in islice(img.walk("/"), PATHS):
            _check(img.needs(path), len(data))
    except (ErofsError, FileNotFoundError):
        return

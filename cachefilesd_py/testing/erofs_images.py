"""EROFS images built with the real ``mkfs.erofs`` (erofs-utils 1.5) from a source tree
with the shapes that matter to a layout reader, and sparse copies of them.

``make_tree(root)`` writes: nested directories (four levels), a directory of 300
small files (several directory blocks), files of 0, 1, 4095, 4096, 4097 bytes and a
few hundred KiB, a 3 MiB file with a run of zeros (a chunk-sized hole), hard links,
symlinks (short and 300-byte targets), and ``user.`` xattrs (inline ones, and one
shared by many files, which ``mkfs.erofs`` puts in the shared xattr area).

``VARIANTS`` names the layouts the reader must handle: flat plain (``-E
noinline_data``), flat inline (the default: tail packing), extended inodes, chunk-based
with a block map and with chunk indexes, chunk-based with the data in an extra blob
(``--blobdev``), and compressed (``-zlz4hc``, recognised, not parsed).

``sparse_copy`` writes a file of the same size holding only the given ranges, zeros
(holes) elsewhere: what a cache holds after fetching only those ranges.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    name: str
    args: tuple[str, ...]
    blobdev: bool = False
    compressed: bool = False


VARIANTS = (
    Variant("plain", ("-E", "noinline_data")),
    Variant("inline", ()),
    Variant("extended", ("-E", "force-inode-extended")),
    Variant("chunk-blockmap", ("--chunksize=65536", "-E", "force-inode-blockmap")),
    Variant("chunk-indexes", ("--chunksize=65536", "-E", "force-chunk-indexes")),
    Variant("chunk-blobdev", ("--chunksize=65536",), blobdev=True),
    Variant("lz4hc", ("-zlz4hc",), compressed=True),
)


def content(seed: int, size: int) -> bytes:
    """Deterministic bytes that differ per seed (fast: the guest runs this under TCG)."""
    return random.Random(seed).randbytes(size)


def make_tree(root: Path, *, small_files: int = 300) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    deep = root / "d1" / "d2" / "d3" / "d4"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(content(11, 5000))
    many = root / "many"
    many.mkdir()
    for i in range(small_files):
        (many / f"file-{i:04d}-{'x' * (i % 40)}").write_bytes(content(1000 + i, i % 200))
    sizes = {"empty": 0, "one": 1, "b4095": 4095, "b4096": 4096, "b4097": 4097,
             "mid": 300_000}
    for name, size in sizes.items():
        (root / name).write_bytes(content(sum(name.encode()), size))
    big = bytearray(content(99, 3 << 20))
    big[1 << 20 : (1 << 20) + (128 << 10)] = bytes(128 << 10)  # zeros over two chunks
    (root / "big").write_bytes(big)
    os.link(root / "mid", root / "d1" / "mid-hardlink")
    os.link(deep / "leaf", many / "leaf-hardlink")
    (root / "link-short").symlink_to("d1/d2")
    (root / "link-long").symlink_to("/" + "long/" * 59 + "target")
    (root / "d1" / "dangling").symlink_to("nowhere")
    try:
        os.setxattr(root / "one", "user.inline", b"value-1")
        for i in range(0, small_files, 7):
            os.setxattr(many / f"file-{i:04d}-{'x' * (i % 40)}", "user.shared", b"s" * 40)
    except OSError:  # a filesystem without user xattrs: the tree is still useful
        pass
    return root


def build(variant: Variant, src: Path, out: Path) -> tuple[Path, Path | None]:
    """The image (and its extra blob) of ``src`` in ``variant``'s layout."""
    image = out / f"{variant.name}.erofs"
    blob = out / f"{variant.name}.blob" if variant.blobdev else None
    argv = ["mkfs.erofs", "--quiet", "-T", "0", *variant.args]
    if blob is not None:
        argv.append(f"--blobdev={blob}")
    subprocess.run([*argv, str(image), str(src)], check=True, capture_output=True)
    return image, blob


def sparse_copy(src: Path, dest: Path, ranges: Iterable[tuple[int, int]]) -> Path:
    size = src.stat().st_size
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        fout.truncate(size)
        for start, end in ranges:
            end = min(end, size)
            fin.seek(start)
            fout.seek(start)
            fout.write(fin.read(end - start))
    return dest


def file_reader(path: Path) -> tuple[Callable[[int, int], bytes], int]:
    """``read(offset, length)`` over a file, and its size, for ``ErofsImage``."""
    data = path.read_bytes()

    def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return read, len(data)

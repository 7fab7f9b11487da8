"""The EROFS on-disk structures this project reads, parsed from bytes (sans-IO).

Everything is little-endian. What follows is what the Linux kernel (6.12,
``fs/erofs/``) and erofs-utils 1.5 agree on, in this project's words:

- The **superblock** is 128 bytes (plus ``sb_extslots`` × 16) at byte 1024 of the
  primary blob. ``blkszbits`` gives the block size (4 KiB from erofs-utils 1.5; the
  kernel accepts 512 B up to the page size). When ``feature_compat`` has
  ``SB_CHKSUM``, a crc32c covers the superblock's block from byte 1024 on, so the
  kernel reads all of it.
- **Inodes** live in the metadata area starting at block ``meta_blkaddr``; an inode
  number (``nid``) is its offset there in 32-byte slots. An inode is *compact*
  (32 bytes, 32-bit size) or *extended* (64 bytes, 64-bit size; it may straddle a
  block boundary), chosen by bit 0 of ``i_format``; bits 1–3 are the data layout.
  Inline xattrs follow it: ``12 + 4 × (i_xattr_icount − 1)`` bytes when the count is
  not 0, listing shared xattr ids (4-byte units from block ``xattr_blkaddr``).
- **Data layouts**: 0 *flat plain* (``ceil(size / block)`` blocks from
  ``raw_blkaddr``), 2 *flat inline* (the same, except the last partial block: its
  bytes follow the inode and its xattrs in the inode's own block, "tail packing"),
  4 *chunk-based* (an array right after the inode and xattrs, aligned to its entry
  size, with one entry per ``block << (format & 31)`` bytes of file: a 4-byte block
  address, or with ``format & 0x20`` an 8-byte index of ``advise``, ``device_id``
  and block address; ``0xffffffff`` is a hole), 1 and 3 *compressed* (lcluster
  indexes: recognised here, not parsed).
- **Directories** are data like files' (flat plain or inline in practice), made of
  blocks of 12-byte dirents (``nid``, ``nameoff``, ``file_type``) followed by the
  names; the first dirent's ``nameoff`` / 12 is the number of dirents in the block,
  each name runs to the next one's ``nameoff``, the last one to the end of the block
  (or of the directory) or to a NUL.
- **Devices**: with ``INCOMPAT_DEVICE_TABLE``, ``extra_devices`` slots of 128 bytes
  start at byte ``devt_slotoff × 128``: a 64-byte tag (in on-demand mode, the blob's
  name), its size in blocks, and ``mapped_blkaddr``. A chunk index's ``device_id``
  (masked by the next power of two above ``extra_devices``, minus one) picks slot
  ``device_id − 1``; ``device_id`` 0 is the primary blob, except that an address
  inside a slot's ``[mapped_blkaddr, +blocks)`` window belongs to that slot.

Any structure that breaks these rules raises :class:`ErofsCorrupt`; features this
reader does not know raise :class:`ErofsUnsupported`.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

from cachefilesd_py.errors import CachefilesdError

MAGIC = 0xE0F5E1E2
SUPER_OFFSET = 1024
SUPER_SIZE = 128
EXTSLOT_SIZE = 16
DEVICE_SLOT_SIZE = 128
INODE_SLOT_BITS = 5  # nids count 32-byte slots
COMPACT_SIZE = 32
EXTENDED_SIZE = 64
XATTR_IBODY_HEADER = 12
DIRENT_SIZE = 12
NAME_MAX = 255
NULL_ADDR = 0xFFFFFFFF

COMPAT_SB_CHKSUM = 0x1

INCOMPAT_ZERO_PADDING = 0x1
INCOMPAT_COMPR_CFGS = 0x2
INCOMPAT_CHUNKED_FILE = 0x4
INCOMPAT_DEVICE_TABLE = 0x8
INCOMPAT_ZTAILPACKING = 0x10
INCOMPAT_FRAGMENTS = 0x20
INCOMPAT_XATTR_PREFIXES = 0x40
INCOMPAT_KNOWN = 0x7F

FLAT_PLAIN = 0
COMPRESSED_FULL = 1
FLAT_INLINE = 2
COMPRESSED_COMPACT = 3
CHUNK_BASED = 4
LAYOUT_NAMES = {
    FLAT_PLAIN: "flat-plain",
    COMPRESSED_FULL: "compressed-full",
    FLAT_INLINE: "flat-inline",
    COMPRESSED_COMPACT: "compressed-compact",
    CHUNK_BASED: "chunk-based",
}

CHUNK_BLKBITS_MASK = 0x1F
CHUNK_INDEXES = 0x20
CHUNK_FORMAT_ALL = CHUNK_BLKBITS_MASK | CHUNK_INDEXES

_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23s")
_COMPACT = struct.Struct("<HHHHIIIIHHI")
_EXTENDED = struct.Struct("<HHHHQIIIIQII16s")
_DEVSLOT = struct.Struct("<64sII56s")
_DIRENT = struct.Struct("<QHBB")
_CHUNK_INDEX = struct.Struct("<HHI")
_XATTR_ENTRY = struct.Struct("<BBH")

assert _SUPER.size == SUPER_SIZE
assert _COMPACT.size == COMPACT_SIZE and _EXTENDED.size == EXTENDED_SIZE
assert _DEVSLOT.size == DEVICE_SLOT_SIZE and _DIRENT.size == DIRENT_SIZE


class ErofsError(CachefilesdError):
    """An EROFS image could not be read as such."""


class ErofsCorrupt(ErofsError):
    """The image breaks a rule of the on-disk format (or a read came back short)."""


class ErofsUnsupported(ErofsError):
    """The image uses a feature this reader does not know."""


@dataclass(frozen=True)
class Superblock:
    block_bits: int
    feature_compat: int
    feature_incompat: int
    sb_size: int
    root_nid: int
    inos: int
    blocks: int
    meta_blkaddr: int
    xattr_blkaddr: int
    extra_devices: int
    devt_slotoff: int
    xattr_prefix_count: int
    xattr_prefix_start: int
    packed_nid: int

    @property
    def block_size(self) -> int:
        return 1 << self.block_bits

    def superblock_range(self) -> tuple[int, int]:
        """The bytes the kernel reads to mount: the superblock, and with a checksum
        the rest of its block from byte 1024 (what the crc32c covers)."""
        bs = self.block_size
        covered = bs - SUPER_OFFSET if bs > SUPER_OFFSET else bs
        return SUPER_OFFSET, SUPER_OFFSET + max(self.sb_size, covered)

    def device_table_range(self) -> tuple[int, int] | None:
        if not self.extra_devices:
            return None
        start = self.devt_slotoff * DEVICE_SLOT_SIZE
        return start, start + self.extra_devices * DEVICE_SLOT_SIZE

    def device_id_mask(self) -> int:
        n = self.extra_devices + 1
        return (1 << (n - 1).bit_length()) - 1

    def inode_offset(self, nid: int) -> int:
        return (self.meta_blkaddr << self.block_bits) + (nid << INODE_SLOT_BITS)


def parse_superblock(raw: bytes) -> Superblock:
    """``raw``: at least 128 bytes read at byte 1024."""
    if len(raw) < SUPER_SIZE:
        raise ErofsCorrupt("image too small for a superblock")
    (
        magic, _checksum, compat, blkszbits, extslots, root_nid, inos, _build_time,
        _build_nsec, blocks, meta_blkaddr, xattr_blkaddr, _uuid, _volume, incompat,
        _algs, extra_devices, devt_slotoff, dirblkbits, xattr_prefix_count,
        xattr_prefix_start, packed_nid, _filter, _reserved,
    ) = _SUPER.unpack_from(raw)
    if magic != MAGIC:
        raise ErofsCorrupt(f"bad magic {magic:#x}: not an EROFS image")
    if not 9 <= blkszbits <= 12:
        raise ErofsUnsupported(f"block size 2^{blkszbits} (this reader takes 512 B to 4 KiB)")
    if dirblkbits:
        raise ErofsUnsupported(f"dirblkbits {dirblkbits}")
    if incompat & ~INCOMPAT_KNOWN:
        raise ErofsUnsupported(f"incompatible features {incompat & ~INCOMPAT_KNOWN:#x}")
    sb_size = SUPER_SIZE + extslots * EXTSLOT_SIZE
    if sb_size > 4096 - SUPER_OFFSET:
        raise ErofsCorrupt(f"sb_extslots {extslots} make the superblock larger than a block")
    if not incompat & INCOMPAT_DEVICE_TABLE:
        extra_devices = 0
    return Superblock(
        block_bits=blkszbits,
        feature_compat=compat,
        feature_incompat=incompat,
        sb_size=sb_size,
        root_nid=root_nid,
        inos=inos,
        blocks=blocks,
        meta_blkaddr=meta_blkaddr,
        xattr_blkaddr=xattr_blkaddr,
        extra_devices=extra_devices,
        devt_slotoff=devt_slotoff,
        xattr_prefix_count=xattr_prefix_count if incompat & INCOMPAT_XATTR_PREFIXES else 0,
        xattr_prefix_start=xattr_prefix_start,
        packed_nid=packed_nid,
    )


@dataclass(frozen=True)
class DeviceSlot:
    """An extra blob: ``index`` is its device id (1 for the first slot)."""

    index: int
    tag: str
    blocks: int
    mapped_blkaddr: int


def parse_device_slot(index: int, raw: bytes) -> DeviceSlot:
    tag, blocks, mapped, _ = _DEVSLOT.unpack_from(raw)
    name = tag.split(b"\0", 1)[0].decode("ascii", "backslashreplace")
    return DeviceSlot(index, name, blocks, mapped)


@dataclass(frozen=True)
class Inode:
    nid: int
    offset: int  # byte offset of the inode in the primary blob
    extended: bool
    layout: int
    mode: int
    nlink: int
    size: int
    i_u: int  # raw_blkaddr / chunk format / rdev / compressed blocks
    xattr_icount: int

    @property
    def inode_size(self) -> int:
        return EXTENDED_SIZE if self.extended else COMPACT_SIZE

    @property
    def xattr_size(self) -> int:
        return 0 if not self.xattr_icount else XATTR_IBODY_HEADER + 4 * (self.xattr_icount - 1)

    @property
    def end(self) -> int:
        """End of the inode and its inline xattrs: inline data and chunk tables follow."""
        return self.offset + self.inode_size + self.xattr_size

    @property
    def compressed(self) -> bool:
        return self.layout in (COMPRESSED_FULL, COMPRESSED_COMPACT)

    @property
    def has_data(self) -> bool:
        return stat.S_ISREG(self.mode) or stat.S_ISDIR(self.mode) or stat.S_ISLNK(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def inode_is_extended(first_two_bytes: bytes) -> bool:
    (fmt,) = struct.unpack_from("<H", first_two_bytes)
    return bool(fmt & 1)


def parse_inode(nid: int, offset: int, raw: bytes) -> Inode:
    """``raw``: the 32 or 64 bytes of the inode (see :func:`inode_is_extended`)."""
    (fmt,) = struct.unpack_from("<H", raw)
    if fmt & ~0xF:
        raise ErofsUnsupported(f"nid {nid}: i_format {fmt:#x}")
    layout = (fmt >> 1) & 0x7
    if layout not in LAYOUT_NAMES:
        raise ErofsUnsupported(f"nid {nid}: data layout {layout}")
    if fmt & 1:
        (_f, icount, mode, _r, size, i_u, _ino, _uid, _gid, _mtime, _ns, nlink, _r2) = (
            _EXTENDED.unpack_from(raw)
        )
        if size >= 1 << 63:
            raise ErofsCorrupt(f"nid {nid}: negative i_size")
    else:
        (_f, icount, mode, nlink, size, _r, i_u, _ino, _uid, _gid, _r2) = _COMPACT.unpack_from(
            raw
        )
    kind = stat.S_IFMT(mode)
    if kind not in (
        stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
        stat.S_IFIFO, stat.S_IFSOCK,
    ):
        raise ErofsCorrupt(f"nid {nid}: bogus i_mode {mode:o}")
    if layout == CHUNK_BASED and (i_u & 0xFFFF) & ~CHUNK_FORMAT_ALL:
        raise ErofsUnsupported(f"nid {nid}: chunk format {i_u & 0xFFFF:#x}")
    return Inode(nid, offset, bool(fmt & 1), layout, mode, nlink, size, i_u, icount)


@dataclass(frozen=True)
class Dirent:
    name: bytes
    nid: int
    file_type: int


def parse_dir_block(raw: bytes, block_size: int, where: str) -> list[Dirent]:
    """The dirents of one directory block; ``raw`` holds the block's bytes up to the
    end of the directory (``min(block, size - start)``)."""
    maxsize = len(raw)
    if maxsize < DIRENT_SIZE:
        raise ErofsCorrupt(f"{where}: directory block of {maxsize} bytes")
    nameoff0 = _DIRENT.unpack_from(raw)[1]
    if not nameoff0 or nameoff0 >= block_size or nameoff0 % DIRENT_SIZE or nameoff0 > maxsize:
        raise ErofsCorrupt(f"{where}: bad first nameoff {nameoff0}")
    count = nameoff0 // DIRENT_SIZE
    out = []
    for i in range(count):
        nid, nameoff, ftype, _ = _DIRENT.unpack_from(raw, i * DIRENT_SIZE)
        if i + 1 < count:
            end = _DIRENT.unpack_from(raw, (i + 1) * DIRENT_SIZE)[1]
        else:
            if nameoff >= maxsize:
                raise ErofsCorrupt(f"{where}: last name at {nameoff} past the block")
            nul = raw.find(b"\0", nameoff, maxsize)
            end = maxsize if nul < 0 else nul
        length = end - nameoff
        if not 1 <= length <= NAME_MAX or nameoff < nameoff0 or end > maxsize:
            raise ErofsCorrupt(f"{where}: bogus dirent {i} (name {nameoff}..{end})")
        out.append(Dirent(bytes(raw[nameoff:end]), nid, ftype))
    return out


def parse_chunk_entry(raw: bytes, pos: int, indexes: bool) -> tuple[int, int]:
    """(device_id, block address) of one chunk entry (block address NULL_ADDR: a hole)."""
    if indexes:
        _advise, device_id, blkaddr = _CHUNK_INDEX.unpack_from(raw, pos)
        return device_id, blkaddr
    (blkaddr,) = struct.unpack_from("<I", raw, pos)
    return 0, blkaddr


def parse_shared_xattr_ids(raw: bytes) -> list[int]:
    """The shared xattr ids listed in an inode's xattr body header (``raw``: the whole
    inline xattr area)."""
    if len(raw) < XATTR_IBODY_HEADER:
        return []
    count = raw[4]
    ids_end = XATTR_IBODY_HEADER + 4 * count
    if ids_end > len(raw):
        raise ErofsCorrupt(f"{count} shared xattrs do not fit the xattr body")
    return list(struct.unpack_from(f"<{count}I", raw, XATTR_IBODY_HEADER))


def xattr_entry_size(raw: bytes) -> int:
    """Size of one xattr entry (header, name, value, padded to 4) from its 4-byte header."""
    name_len, _index, value_size = _XATTR_ENTRY.unpack_from(raw)
    return (4 + int(name_len) + int(value_size) + 3) & ~3

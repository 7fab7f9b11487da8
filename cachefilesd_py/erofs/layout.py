"""Which bytes of which blob an EROFS path needs: a sans-IO reader of the layout.

``ErofsImage(read, size)`` reads the primary blob through ``read(offset, length) ->
bytes`` (a file, a cache file, a fetch from the source: the caller decides) and
answers, without reading any file data:

- ``needs(path)``: the byte ranges, per blob, that reading ``path`` needs — the
  superblock and device table, every inode and directory block on the way from the
  root, the inode itself with its xattrs, and its data: block ranges in the primary
  blob (flat layouts), the tail packed after the inode (inline layout), or chunk
  ranges in the primary or an extra blob (chunk-based layout, by device slot). A
  directory brings everything below it. A compressed file's extents are not parsed:
  it marks the whole primary blob as needed instead.
- ``metadata()``: what ``ls -lR`` and ``stat`` of the whole image need — the
  superblock, the device table, every inode with its xattrs (and the shared xattrs
  they use), every directory's blocks, symlink targets and chunk tables. This is
  what a pin fetches first.

Data ranges are whole blocks, as the kernel reads them (the last block of a file
included; a chunk's range stops at the block that holds the file's last byte, as the
kernel maps it); metadata ranges are exact bytes. ``RangeSet.aligned`` rounds to the
cache's chunk size.

Hostile images are expected: every count (inodes walked, dirents, chunk entries) is
bounded by the image's size before anything is read or allocated, directories are
walked iteratively with a visited set (a directory that contains itself ends the
walk of that branch, not the process), and every read is checked against the blob's
size. A broken image raises :class:`~cachefilesd_py.erofs.format.ErofsCorrupt`.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from cachefilesd_py.erofs.format import (
    CHUNK_BASED,
    CHUNK_BLKBITS_MASK,
    CHUNK_INDEXES,
    COMPACT_SIZE,
    DEVICE_SLOT_SIZE,
    EXTENDED_SIZE,
    FLAT_INLINE,
    FLAT_PLAIN,
    NULL_ADDR,
    SUPER_OFFSET,
    SUPER_SIZE,
    DeviceSlot,
    Dirent,
    ErofsCorrupt,
    Inode,
    Superblock,
    inode_is_extended,
    parse_chunk_entry,
    parse_device_slot,
    parse_dir_block,
    parse_inode,
    parse_shared_xattr_ids,
    parse_superblock,
    xattr_entry_size,
)
from cachefilesd_py.erofs.ranges import Needs

Read = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Extent:
    """Where a run of a file's bytes lives: ``length`` bytes at ``offset`` of blob
    ``device`` (0: primary); ``logical`` is the file offset. ``hole``: reads as zeros,
    nothing stored."""

    logical: int
    device: int
    offset: int
    length: int
    hole: bool = False


class ErofsImage:
    def __init__(
        self,
        read: Read,
        size: int,
        *,
        device_sizes: Mapping[int, int] | None = None,
        cache_blocks: int = 256,
    ) -> None:
        """``size``: the primary blob's size (every count and read is bounded by it);
        ``device_sizes``: the extra blobs' sizes when known, by device id."""
        self._read = read
        self.size = size
        self.device_sizes = dict(device_sizes or {})
        self._cache: dict[int, bytes] = {}
        self._cache_blocks = cache_blocks
        self._block_size = 4096  # until the superblock says
        self.superblock: Superblock = parse_superblock(self.read(SUPER_OFFSET, SUPER_SIZE))
        self._block_size = self.superblock.block_size
        self.devices: tuple[DeviceSlot, ...] = self._read_devices()
        self._max_inodes = max(1, size // COMPACT_SIZE)

    # -- reading ---------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the primary blob, through a small block cache."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ErofsCorrupt(f"read {offset}+{length} past the image's end ({self.size})")
        bs = self._block_size
        out = bytearray()
        pos = offset
        end = offset + length
        while pos < end:
            block = pos // bs
            data = self._cache.get(block)
            if data is None:
                start = block * bs
                want = min(bs, self.size - start)
                data = bytes(self._read(start, want))
                if len(data) != want:
                    raise ErofsCorrupt(f"short read at {start}: {len(data)} of {want} bytes")
                if len(self._cache) >= self._cache_blocks:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[block] = data
            lo = pos - block * bs
            take = min(end - pos, len(data) - lo)
            out += data[lo : lo + take]
            pos += take
        return bytes(out)

    def _read_devices(self) -> tuple[DeviceSlot, ...]:
        table = self.superblock.device_table_range()
        if table is None:
            return ()
        raw = self.read(table[0], table[1] - table[0])
        return tuple(
            parse_device_slot(i + 1, raw[i * DEVICE_SLOT_SIZE : (i + 1) * DEVICE_SLOT_SIZE])
            for i in range(self.superblock.extra_devices)
        )

    def inode(self, nid: int) -> Inode:
        offset = self.superblock.inode_offset(nid)
        first = self.read(offset, 2)
        raw = self.read(offset, EXTENDED_SIZE if inode_is_extended(first) else COMPACT_SIZE)
        ino = parse_inode(nid, offset, raw)
        if ino.end > self.size:
            raise ErofsCorrupt(f"nid {nid}: inode and xattrs past the image's end")
        return ino

    # -- mapping -----------------------------------------------------------------------------

    def extents(self, ino: Inode) -> Iterator[Extent]:
        """Where ``ino``'s bytes live, in file order (not for compressed layouts)."""
        if not ino.has_data or ino.size == 0:
            return
        bs = self._block_size
        if ino.layout in (FLAT_PLAIN, FLAT_INLINE):
            yield from self._flat_extents(ino, bs)
        elif ino.layout == CHUNK_BASED:
            yield from self._chunk_extents(ino, bs)
        else:
            raise ErofsCorrupt(f"nid {ino.nid}: compressed data cannot be mapped here")

    def _flat_extents(self, ino: Inode, bs: int) -> Iterator[Extent]:
        blocks = -(-ino.size // bs)
        tail = ino.layout == FLAT_INLINE
        plain_blocks = blocks - 1 if tail else blocks
        if plain_blocks:
            start = ino.i_u * bs
            length = plain_blocks * bs
            if start + length > self.size:
                raise ErofsCorrupt(f"nid {ino.nid}: data blocks past the image's end")
            yield Extent(0, 0, start, length)
        if tail:
            logical = plain_blocks * bs
            length = ino.size - logical
            if ino.end % bs + length > bs:
                # the tail sits right after the inode and its xattrs, in one block
                raise ErofsCorrupt(f"nid {ino.nid}: inline data across blocks")
            if ino.end + length > self.size:
                raise ErofsCorrupt(f"nid {ino.nid}: inline data past the image's end")
            yield Extent(logical, 0, ino.end, length)

    def chunk_table(self, ino: Inode) -> tuple[int, int, int, int]:
        """(offset, entry size, entries, chunk bits) of a chunk-based inode's table,
        checked to lie inside the image before anything is read or allocated."""
        fmt = ino.i_u & 0xFFFF
        chunk_bits = self.superblock.block_bits + (fmt & CHUNK_BLKBITS_MASK)
        unit = 8 if fmt & CHUNK_INDEXES else 4
        count = -(-ino.size // (1 << chunk_bits))
        table = -(-ino.end // unit) * unit
        if count > self.size // unit or table + count * unit > self.size:
            raise ErofsCorrupt(f"nid {ino.nid}: {count} chunk entries do not fit the image")
        return table, unit, count, chunk_bits

    def _chunk_extents(self, ino: Inode, bs: int) -> Iterator[Extent]:
        fmt = ino.i_u & 0xFFFF
        table, unit, count, chunk_bits = self.chunk_table(ino)
        chunk = 1 << chunk_bits
        raw = self.read(table, count * unit)
        mask = self.superblock.device_id_mask()
        for i in range(count):
            device_id, blkaddr = parse_chunk_entry(raw, i * unit, bool(fmt & CHUNK_INDEXES))
            logical = i << chunk_bits
            length = min(chunk, -(-(ino.size - logical) // bs) * bs)
            if blkaddr == NULL_ADDR:
                yield Extent(logical, 0, 0, length, hole=True)
                continue
            device, offset = self._map_device(ino.nid, device_id & mask, blkaddr * bs)
            self._check_in_device(ino.nid, device, offset, length)
            yield Extent(logical, device, offset, length)

    def _map_device(self, nid: int, device_id: int, pa: int) -> tuple[int, int]:
        """The blob and offset behind a device id and physical address, as the kernel
        maps them when every blob is a device of its own (on-demand mode)."""
        if device_id:
            if device_id > len(self.devices):
                raise ErofsCorrupt(f"nid {nid}: device id {device_id} has no slot")
            return device_id, pa
        bs = self._block_size
        for dev in self.devices:
            if dev.mapped_blkaddr:
                start = dev.mapped_blkaddr * bs
                if start <= pa < start + dev.blocks * bs:
                    return dev.index, pa - start
        return 0, pa

    def _check_in_device(self, nid: int, device: int, offset: int, length: int) -> None:
        limit = self.size if device == 0 else self.device_sizes.get(device)
        if limit is None and device:
            slot = self.devices[device - 1]
            limit = slot.blocks * self._block_size if slot.blocks else None
        if limit is not None and offset + length > limit:
            raise ErofsCorrupt(f"nid {nid}: data at {offset}+{length} past blob {device}'s end")

    # -- directories ---------------------------------------------------------------------------

    def listdir(self, ino: Inode) -> list[Dirent]:
        """The entries of directory ``ino`` (``.`` and ``..`` included)."""
        if not ino.is_dir:
            raise ErofsCorrupt(f"nid {ino.nid} is not a directory")
        if ino.size > self.size:
            raise ErofsCorrupt(f"nid {ino.nid}: directory larger than the image")
        if ino.compressed:
            raise ErofsCorrupt(f"nid {ino.nid}: compressed directory")
        bs = self._block_size
        out: list[Dirent] = []
        for ext in self.extents(ino):
            if ext.hole or ext.device:
                raise ErofsCorrupt(f"nid {ino.nid}: directory data outside the image")
            for block_start in range(0, ext.length, bs):
                logical = ext.logical + block_start
                if logical >= ino.size:
                    break
                maxsize = min(bs, ino.size - logical, ext.length - block_start)
                raw = self.read(ext.offset + block_start, maxsize)
                out += parse_dir_block(raw, bs, f"nid {ino.nid} block {logical // bs}")
        return out

    def lookup(self, path: str) -> list[Inode]:
        """The inodes from the root down to ``path`` (``/`` gives ``[root]``)."""
        chain = [self.inode(self.superblock.root_nid)]
        for part in (p for p in path.split("/") if p and p != "."):
            if part == "..":
                if len(chain) > 1:
                    chain.pop()
                continue
            if not chain[-1].is_dir:
                raise FileNotFoundError(f"{path}: {part!r} is under a non-directory")
            name = part.encode("utf-8", "surrogateescape")
            for ent in self.listdir(chain[-1]):
                if ent.name == name:
                    chain.append(self.inode(ent.nid))
                    break
            else:
                raise FileNotFoundError(f"{path}: no {part!r}")
            if len(chain) > self._max_inodes:
                raise ErofsCorrupt("path deeper than the image has inodes")
        return chain

    # -- what is needed ------------------------------------------------------------------------

    def _base(self) -> Needs:
        sb = self.superblock
        needs = Needs(tags={d.index: d.tag for d in self.devices})
        start, end = sb.superblock_range()
        needs.add(0, start, min(end, self.size))
        table = sb.device_table_range()
        if table is not None:
            needs.add(0, *table)
        return needs

    def _inode_meta(self, ino: Inode, needs: Needs) -> None:
        """The inode, its inline xattrs and the shared xattrs it lists."""
        needs.add(0, ino.offset, ino.end)
        if not ino.xattr_size:
            return
        xattrs = self.read(ino.offset + ino.inode_size, ino.xattr_size)
        base = self.superblock.xattr_blkaddr * self._block_size
        for xid in parse_shared_xattr_ids(xattrs):
            pos = base + 4 * xid
            size = xattr_entry_size(self.read(pos, 4))
            if pos + size > self.size:
                raise ErofsCorrupt(f"nid {ino.nid}: shared xattr {xid} past the image's end")
            needs.add(0, pos, pos + size)

    def _data(self, ino: Inode, needs: Needs, *, meta_only: bool) -> None:
        """``ino``'s data ranges: all of them, or (``meta_only``) those that are
        metadata — directories, symlink targets, chunk tables."""
        if not ino.has_data or ino.size == 0:
            return
        if ino.compressed:
            if not meta_only:
                needs.need_whole(0, f"nid {ino.nid} is compressed")
            return
        if ino.layout == CHUNK_BASED:
            table, unit, count, _bits = self.chunk_table(ino)
            needs.add(0, table, table + unit * count)
        if meta_only and not ino.is_dir and not _is_symlink(ino):
            return
        for ext in self.extents(ino):
            if not ext.hole:
                needs.add(ext.device, ext.offset, ext.offset + ext.length)

    def needs(self, path: str = "/") -> Needs:
        """Everything reading ``path`` needs (a directory: everything below it too)."""
        chain = self.lookup(path)
        needs = self._base()
        for ino in chain[:-1]:
            self._inode_meta(ino, needs)
            self._data(ino, needs, meta_only=True)
        self._walk(chain[-1], needs, meta_only=False)
        return needs

    def metadata(self) -> Needs:
        """What mounting and ``ls -lR``/``stat`` of every file need."""
        needs = self._base()
        self._walk(self.inode(self.superblock.root_nid), needs, meta_only=True)
        return needs

    def walk(self, top: str = "/") -> Iterator[tuple[str, Inode]]:
        """Every path under ``top`` with its inode (hard links once per name)."""
        chain = self.lookup(top)
        yield from self._paths(top.rstrip("/") or "/", chain[-1])

    def _paths(self, top: str, root: Inode) -> Iterator[tuple[str, Inode]]:
        stack = [(top, root)]
        seen_dirs = {root.nid}
        budget = self._max_inodes
        while stack:
            path, ino = stack.pop()
            yield path, ino
            if not ino.is_dir:
                continue
            for ent in self.listdir(ino):
                if ent.name in (b".", b".."):
                    continue
                budget -= 1
                if budget < 0:
                    raise ErofsCorrupt("more directory entries than the image has inodes")
                child = self.inode(ent.nid)
                name = ent.name.decode("utf-8", "surrogateescape")
                child_path = f"{path.rstrip('/')}/{name}"
                if child.is_dir:
                    if child.nid in seen_dirs:
                        raise ErofsCorrupt(f"{child_path}: directory loop (nid {child.nid})")
                    seen_dirs.add(child.nid)
                stack.append((child_path, child))

    def _walk(self, top: Inode, needs: Needs, *, meta_only: bool) -> None:
        done: set[int] = set()
        for _path, ino in self._paths("/", top):
            if ino.nid in done:  # a hard link: its inode and data are in already
                continue
            done.add(ino.nid)
            self._inode_meta(ino, needs)
            self._data(ino, needs, meta_only=meta_only)


def _is_symlink(ino: Inode) -> bool:
    return stat.S_ISLNK(ino.mode)

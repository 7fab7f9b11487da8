"""The sidecar file's byte layout (pure encode/decode).

A sidecar describes one blob's cache file: which chunks the daemon wrote and made
durable. Layout (little-endian)::

    offset  size  field
    0       8     MAGIC  b"CFPYPRS1"
    8       4     format version (1)
    12      4     chunk size
    16      8     blob size
    24      8     number of chunks
    32      16    binding id: random; the cache file's xattr must name it
    48      32    sha256 of the blob key (volume key NUL cookie key)
    80      2     length L of the source identity token (UTF-8)
    82      L     source identity token ("size:etag")
    82+L    4     crc32 of bytes [0, 82+L)
    86+L    N     bitmap, N = ceil(chunks / 8) bytes (bit i = byte i//8, bit i%8)
    86+L+N  4     crc32 of the bitmap

Any mismatch (magic, version, lengths, either crc) is :class:`PresenceCorrupt`: the
caller treats the blob as absent. A sidecar is rewritten whole and atomically, so a
torn write leaves the previous version, never a mix.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

from cachefilesd_py.errors import PresenceCorrupt

MAGIC = b"CFPYPRS1"
VERSION = 1
HEAD = struct.Struct("<8sIIQQ16s32sH")
assert HEAD.size == 82
CRC = struct.Struct("<I")
assert CRC.size == 4


def key_digest(key: tuple[bytes, bytes]) -> bytes:
    return hashlib.sha256(key[0] + b"\0" + key[1]).digest()


@dataclass(frozen=True)
class Sidecar:
    chunk_size: int
    blob_size: int
    nchunks: int
    binding_id: bytes
    key_hash: bytes
    token: str
    bitmap: bytes


def encode(sc: Sidecar) -> bytes:
    token = sc.token.encode()
    if len(token) > 0xFFFF or len(sc.binding_id) != 16 or len(sc.key_hash) != 32:
        raise ValueError("sidecar field out of range")
    head = (
        HEAD.pack(
            MAGIC,
            VERSION,
            sc.chunk_size,
            sc.blob_size,
            sc.nchunks,
            sc.binding_id,
            sc.key_hash,
            len(token),
        )
        + token
    )
    return head + CRC.pack(zlib.crc32(head)) + sc.bitmap + CRC.pack(zlib.crc32(sc.bitmap))


def decode(data: bytes) -> Sidecar:
    if len(data) < HEAD.size + 8:
        raise PresenceCorrupt("sidecar too short")
    magic, version, chunk, size, nchunks, binding, key_hash, tlen = HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise PresenceCorrupt("not a sidecar of this format")
    hend = HEAD.size + tlen
    if len(data) < hend + 8:
        raise PresenceCorrupt("sidecar truncated in its header")
    (hcrc,) = CRC.unpack_from(data, hend)
    if zlib.crc32(data[:hend]) != hcrc:
        raise PresenceCorrupt("sidecar header checksum mismatch")
    nbytes = (nchunks + 7) // 8
    if len(data) != hend + 4 + nbytes + 4:
        raise PresenceCorrupt("sidecar length does not match its chunk count")
    bitmap = data[hend + 4 : hend + 4 + nbytes]
    (bcrc,) = CRC.unpack_from(data, hend + 4 + nbytes)
    if zlib.crc32(bitmap) != bcrc:
        raise PresenceCorrupt("sidecar bitmap checksum mismatch")
    try:
        token = data[HEAD.size : hend].decode()
    except UnicodeDecodeError as exc:
        raise PresenceCorrupt("sidecar token is not UTF-8") from exc
    return Sidecar(chunk, size, nchunks, binding, key_hash, token, bytes(bitmap))

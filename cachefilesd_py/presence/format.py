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

Rules (:func:`encode` refuses to write what breaks them, :func:`decode` raises
:class:`PresenceCorrupt` for it, so the caller treats the blob as absent):

- magic and version; both crcs; the total length is exactly what the header implies;
- the chunk size is a power of two and ``number of chunks == ceil(blob size / chunk
  size)`` (what :class:`~cachefilesd_py.presence.bitmap.ChunkGeometry` computes);
- the bits of the last bitmap byte past the last chunk are clear;
- the token is UTF-8.

The checksums only catch accidents (torn writes, bit rot): anyone who can write the
file can also recompute them, so every field is checked for what the reader does with
it, and a decoded sidecar always builds a valid geometry and bitmap. Nothing else but a
:class:`Sidecar` or :class:`PresenceCorrupt` comes out of :func:`decode`, whatever the
bytes (``tests/unit/test_presence_format.py`` and ``fuzz/fuzz_sidecar.py`` check it).

A reader does not slurp the file: :func:`claimed_length` tells, from the fixed-size head
alone, how long the sidecar says it is, so the reader can refuse a claim larger than the
blob it expects before reading the bitmap. A sidecar is rewritten whole and atomically,
so a torn write leaves the previous version, never a mix.
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
#: the token's length is a u16
MAX_TOKEN = 0xFFFF
#: the most chunks a sidecar may describe: 2**32 (16 TiB in 4 KiB chunks, a 512 MiB
#: bitmap); a reader with no expected geometry bounds its read by this
MAX_CHUNKS = 1 << 32


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


def _geometry_problem(chunk_size: int, blob_size: int, nchunks: int) -> str | None:
    if nchunks > MAX_CHUNKS:
        return f"chunk count {nchunks} is above the format's {MAX_CHUNKS}"
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        return f"chunk size {chunk_size} is not a power of two"
    if nchunks != -(-blob_size // chunk_size):
        return f"chunk count {nchunks} does not fit {blob_size} bytes in chunks of {chunk_size}"
    return None


def _tail_bits_set(bitmap: bytes, nchunks: int) -> bool:
    return bool(nchunks % 8 and bitmap and bitmap[-1] >> (nchunks % 8))


def bitmap_length(nchunks: int) -> int:
    return (nchunks + 7) // 8


def encoded_length(nchunks: int, token_length: int) -> int:
    """The size in bytes of a sidecar of ``nchunks`` chunks whose token encodes to
    ``token_length`` bytes."""
    return HEAD.size + token_length + CRC.size + bitmap_length(nchunks) + CRC.size


def largest_length(nchunks: int) -> int:
    """The largest sidecar a blob of ``nchunks`` chunks can have (longest token)."""
    return encoded_length(nchunks, MAX_TOKEN)


def claimed_length(head: bytes) -> int:
    """The total length a sidecar's header claims, from its first ``HEAD.size`` bytes
    (before any checksum can be verified: a bound to check, never a fact)."""
    if len(head) < HEAD.size:
        raise PresenceCorrupt("sidecar too short")
    magic, version, _chunk, _size, nchunks, _binding, _key_hash, tlen = HEAD.unpack_from(head)
    if magic != MAGIC or version != VERSION:
        raise PresenceCorrupt("not a sidecar of this format")
    return encoded_length(nchunks, tlen)


def encode(sc: Sidecar) -> bytes:
    """The bytes of ``sc``; ValueError for a sidecar :func:`decode` would refuse."""
    token = sc.token.encode()  # UnicodeEncodeError (a ValueError) for lone surrogates
    if len(token) > MAX_TOKEN or len(sc.binding_id) != 16 or len(sc.key_hash) != 32:
        raise ValueError("sidecar field out of range")
    problem = _geometry_problem(sc.chunk_size, sc.blob_size, sc.nchunks)
    if problem is not None:
        raise ValueError(problem)
    if len(sc.bitmap) != bitmap_length(sc.nchunks) or _tail_bits_set(sc.bitmap, sc.nchunks):
        raise ValueError(f"bitmap of {len(sc.bitmap)} bytes does not fit {sc.nchunks} chunks")
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
    """The sidecar in ``data``, or :class:`PresenceCorrupt` (and nothing else)."""
    if len(data) < HEAD.size + 2 * CRC.size:
        raise PresenceCorrupt("sidecar too short")
    magic, version, chunk, size, nchunks, binding, key_hash, tlen = HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise PresenceCorrupt("not a sidecar of this format")
    hend = HEAD.size + tlen
    if len(data) < hend + 2 * CRC.size:
        raise PresenceCorrupt("sidecar truncated in its header")
    (hcrc,) = CRC.unpack_from(data, hend)
    if zlib.crc32(data[:hend]) != hcrc:
        raise PresenceCorrupt("sidecar header checksum mismatch")
    if len(data) != encoded_length(nchunks, tlen):
        raise PresenceCorrupt("sidecar length does not match its chunk count")
    nbytes = bitmap_length(nchunks)
    bitmap = data[hend + CRC.size : hend + CRC.size + nbytes]
    (bcrc,) = CRC.unpack_from(data, hend + CRC.size + nbytes)
    if zlib.crc32(bitmap) != bcrc:
        raise PresenceCorrupt("sidecar bitmap checksum mismatch")
    problem = _geometry_problem(chunk, size, nchunks)
    if problem is not None:
        raise PresenceCorrupt(f"sidecar geometry: {problem}")
    if _tail_bits_set(bitmap, nchunks):
        raise PresenceCorrupt("sidecar has bits set past the last chunk")
    try:
        token = data[HEAD.size : hend].decode()
    except UnicodeDecodeError as exc:
        raise PresenceCorrupt("sidecar token is not UTF-8") from exc
    return Sidecar(chunk, size, nchunks, binding, key_hash, token, bytes(bitmap))

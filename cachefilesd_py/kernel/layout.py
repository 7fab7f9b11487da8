"""Where cachefiles puts a cache object on disk (Linux ≥ 5.17 layout).

    <dir>/cache/I<volume key>/@<xx>/<object name>

- the volume directory is ``I`` + the volume key (for EROFS ``erofs,<fsid>`` or
  ``erofs,<domain_id>``); the key becomes a directory name, so it cannot hold ``/``;
- ``xx`` is the low byte of the cookie's hash, in two lowercase hex digits (256
  fan-out directories ``@00``..``@ff`` per volume);
- the object name is ``D`` + the cookie key when every byte of the key is printable
  (``!``..``~``) and not ``/``. Other keys get ``S``/``T``/``E`` encodings, which this
  module does not compute: :func:`object_path` returns None for them, and the daemon
  then simply does not bind presence sidecars for such blobs (it still serves them).

The hash is fscache's (fs/netfs/fscache_main.c, restated from
shared/reference/ondemand-protocol.md §3.5): words of the key are mixed two ways
(``x ^= w; y ^= x; x = rol(x, 7); x += y; y = rol(y, 20); y *= 9``, all modulo 2**32) and
folded as ``h(y ^ h(x))`` with ``h(v) = v * 0x61C88647``. The volume hash hashes, from a
zero salt, the volume key prefixed with its length byte and zero-padded to a 4-byte
multiple with at least one NUL; the cookie hash hashes the cookie key, zero-padded to a
4-byte multiple, salted with the volume hash.
"""

from __future__ import annotations

import struct
from pathlib import Path

_MASK = 0xFFFFFFFF
GOLDEN_RATIO_32 = 0x61C88647


def _rol32(v: int, n: int) -> int:
    return ((v << n) | (v >> (32 - n))) & _MASK


def _h32(v: int) -> int:
    return (v * GOLDEN_RATIO_32) & _MASK


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def fscache_hash(salt: int, data: bytes) -> int:
    """fscache's hash of ``data`` (a multiple of 4 bytes) with ``salt``."""
    if len(data) % 4:
        raise ValueError("fscache_hash needs whole 32-bit words")
    x, y = 0, salt & _MASK
    for (word,) in struct.iter_unpack("<I", data):
        x ^= word
        y ^= x
        x = _rol32(x, 7)
        x = (x + y) & _MASK
        y = _rol32(y, 20)
        y = (y * 9) & _MASK
    return _h32(y ^ _h32(x))


def volume_hash(volume_key: bytes) -> int:
    key = volume_key.rstrip(b"\0")
    if len(key) > 255:
        raise ValueError("volume key longer than 255 bytes")
    buf = bytes([len(key)]) + key + b"\0"
    return fscache_hash(0, _pad4(buf))


def cookie_hash(volume_key: bytes, cookie_key: bytes) -> int:
    return fscache_hash(volume_hash(volume_key), _pad4(cookie_key))


def _printable(key: bytes) -> bool:
    return bool(key) and all(0x21 <= b <= 0x7E and b != 0x2F for b in key)


def object_file_name(cookie_key: bytes) -> str | None:
    """``D<key>`` for printable keys, None for keys that need another encoding."""
    return "D" + cookie_key.decode("ascii") if _printable(cookie_key) else None


def volume_dir_name(volume_key: bytes) -> str | None:
    key = volume_key.rstrip(b"\0")
    if not key or b"/" in key or b"\0" in key:
        return None
    return "I" + key.decode("utf-8", "surrogateescape")


def object_path(cache_dir: Path, volume_key: bytes, cookie_key: bytes) -> Path | None:
    """The path the kernel gives the object's file, or None if not computable here."""
    vol = volume_dir_name(volume_key)
    name = object_file_name(cookie_key)
    if vol is None or name is None:
        return None
    fan = f"@{cookie_hash(volume_key, cookie_key) & 0xFF:02x}"
    return Path(cache_dir) / "cache" / vol / fan / name

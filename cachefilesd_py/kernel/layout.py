"""Where cachefiles puts a cache object on disk (the Linux >= 5.17 layout). Pure.

::

    <dir>/cache/I<volume key>/@<xx>/<object name>

Restated from ``docs/protocol-ondemand.md`` §5 (the cache tree) and the kernel's
``fs/cachefiles/volume.c``, ``key.c`` and ``fs/netfs/fscache_{main,volume,cookie}.c``
(read, not copied):

**Volume directory.** ``I`` followed by the volume key's bytes as they are: no escaping.
For EROFS the key is ``erofs,<fsid>`` or ``erofs,<domain_id>``. A key holding ``/`` or
NUL, or one so long that ``I`` + key exceeds NAME_MAX, cannot become a directory.

**Fan-out directory.** ``@`` and the low byte of the cookie's hash as two lowercase hex
digits; every volume has all 256 (``@00``..``@ff``).

**The hash** (``fscache_hash``) reads its input as little-endian 32-bit words (the
input is always a whole number of words) and keeps two 32-bit accumulators, ``x = 0``
and ``y = salt``. For each word ``w``: ``x ^= w``, ``y ^= x``, ``x`` is rotated left
by 7, ``x += y``, ``y`` is rotated left by 20, ``y *= 9`` (all modulo 2**32). The result
folds the two with the 32-bit golden-ratio multiply ``h(v) = v * 0x61C88647``:
``h(y ^ h(x))``.

- The *volume hash* hashes, with salt 0, the volume key laid out as one length byte,
  the key bytes, then zero bytes up to a multiple of 4 with at least one of them.
- The *cookie hash* hashes the cookie key padded with zero bytes to a multiple of 4,
  salted with the volume hash.

**Object name** (``cachefiles_cook_key``), from the cookie key ``k``:

- ``D`` + ``k`` if every byte is "printable" for a file name: 0x21..0x2E or 0x30..0x7F
  (space, controls and ``/`` excluded; note that 0x7F *is* accepted);
- otherwise the key, zero-padded to whole 32-bit words, is considered as a list of
  words, once read big-endian and once little-endian. Each word costs one separator
  plus its count of hex digits without leading zeros (a zero word costs only the
  separator). The base64-like form costs ``2 + 4 * ceil(len(k) / 3)`` characters. If
  either word form is shorter than that, the cheaper one wins (big-endian on a tie):
  ``S`` (big-endian) or ``T`` (little-endian), then the words in lowercase hex without
  leading zeros, separated by commas, a zero word written as nothing (``S,1`` is the
  words 0 and 1);
- otherwise ``E``, the digit ``'0' + pad`` (pad = bytes missing from the last 3-byte
  group), then four characters per 3-byte group: the group read little-endian as a
  24-bit number, its 6-bit pieces from the lowest up, each mapped through
  ``0-9 a-z A-Z _ -``.

**Back from a name** (:func:`cookie_key_of_name`, for the culler, which finds files and
must know whose they are). ``D`` and ``E`` names give the key back exactly (``E``
records how many bytes its last group lacks). ``S``/``T`` names do not record the key's
length: the key was zero-padded to whole words, so keys that differ only in up to three
trailing NUL bytes share one name (and one cache file: the kernel itself cannot tell
them apart). The inverse returns the shortest such key whose own name is the name
given; for a key that does not end in NUL (every EROFS cookie: tags and ``device=``
names are C strings) that is the key itself.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Final

_MASK: Final = 0xFFFFFFFF
GOLDEN_RATIO_32: Final = 0x61C88647
NAME_MAX: Final = 255
#: the 64 characters of the ``E`` encoding, by 6-bit value
B64_ALPHABET: Final = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-"
assert len(B64_ALPHABET) == 64


def _rol32(v: int, n: int) -> int:
    return ((v << n) | (v >> (32 - n))) & _MASK


def _golden(v: int) -> int:
    return (v * GOLDEN_RATIO_32) & _MASK


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def fscache_hash(salt: int, data: bytes) -> int:
    """fscache's hash of ``data`` (a whole number of 32-bit words) with ``salt``."""
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
    return _golden(y ^ _golden(x))


def _volume_key(volume_key: bytes) -> bytes:
    """The key without its C terminator (one trailing NUL is tolerated)."""
    key = volume_key[:-1] if volume_key.endswith(b"\0") else volume_key
    if b"\0" in key:
        raise ValueError(f"volume key {volume_key!r} holds a NUL")
    if len(key) > 255:
        raise ValueError(f"volume key of {len(key)} bytes: fscache allows at most 255")
    return key


def volume_hash(volume_key: bytes) -> int:
    key = _volume_key(volume_key)
    return fscache_hash(0, _pad4(bytes([len(key)]) + key + b"\0"))


def cookie_hash(volume_key: bytes, cookie_key: bytes) -> int:
    return fscache_hash(volume_hash(volume_key), _pad4(cookie_key))


def fanout_dir_name(volume_key: bytes, cookie_key: bytes) -> str:
    return f"@{cookie_hash(volume_key, cookie_key) & 0xFF:02x}"


def _printable(byte: int) -> bool:
    return 0x21 <= byte <= 0x7F and byte != 0x2F


def _hex_digits(word: int) -> int:
    return (word.bit_length() + 3) // 4


def object_file_name(cookie_key: bytes) -> str:
    """The kernel's file name for a cookie key: ``D``, ``S``, ``T`` or ``E`` form.

    Returned as ``str`` for :class:`pathlib.Path` (bytes >= 0x80 never reach a name;
    0x7F is decoded as itself)."""
    if not cookie_key:
        raise ValueError("empty cookie key")
    if all(_printable(b) for b in cookie_key):
        return "D" + cookie_key.decode("ascii")
    padded = _pad4(cookie_key)
    be = [w for (w,) in struct.iter_unpack(">I", padded)]
    le = [w for (w,) in struct.iter_unpack("<I", padded)]
    cost_be = sum(1 + _hex_digits(w) for w in be)
    cost_le = sum(1 + _hex_digits(w) for w in le)
    groups = -(-len(cookie_key) // 3)
    cost_b64 = 2 + 4 * groups
    if cost_be < cost_b64 or cost_le < cost_b64:
        words, mark = (be, "S") if cost_be <= cost_le else (le, "T")
        return mark + ",".join(f"{w:x}" if w else "" for w in words)
    pad = groups * 3 - len(cookie_key)
    out = ["E", str(pad)]
    for i in range(0, len(cookie_key), 3):
        acc = int.from_bytes(cookie_key[i : i + 3], "little")
        out.extend(B64_ALPHABET[(acc >> shift) & 63] for shift in (0, 6, 12, 18))
    return "".join(out)


_B64_VALUE: Final = {c: i for i, c in enumerate(B64_ALPHABET)}


def _words_key(words: list[int], big_endian: bool) -> bytes:
    return b"".join(w.to_bytes(4, "big" if big_endian else "little") for w in words)


def cookie_key_of_name(name: str) -> bytes | None:
    """The cookie key a cache file name stands for (see "Back from a name" above), or
    None if ``name`` is not a name :func:`object_file_name` can produce."""
    if not name:
        return None
    mark, body = name[0], name[1:]
    key: bytes | None
    if mark == "D":
        key = _d_key(body)
    elif mark in "ST":
        key = _words_name_key(body, big_endian=mark == "S")
    elif mark == "E":
        key = _e_key(body)
    else:
        return None
    if key is None or object_file_name(key) != name:
        return None
    return key


def _d_key(body: str) -> bytes | None:
    try:
        raw = body.encode("ascii")
    except UnicodeEncodeError:
        return None
    return raw if raw and all(_printable(b) for b in raw) else None


def _words_name_key(body: str, *, big_endian: bool) -> bytes | None:
    words = []
    for field in body.split(","):
        if field == "":
            words.append(0)
            continue
        if len(field) > 8 or field[0] == "0" or not all(c in "0123456789abcdef" for c in field):
            return None
        words.append(int(field, 16))
    padded = _words_key(words, big_endian)
    mark = "S" if big_endian else "T"
    # the key was padded with up to three NULs: the shortest key naming this file
    for cut in range(3, -1, -1):
        if cut and padded[len(padded) - cut :] != bytes(cut):
            continue
        key = padded[: len(padded) - cut]
        if key and object_file_name(key) == mark + body:
            return key
    return None


def _e_key(body: str) -> bytes | None:
    if not body or body[0] not in "012" or (len(body) - 1) % 4 or len(body) < 5:
        return None
    pad = int(body[0])
    out = bytearray()
    for i in range(1, len(body), 4):
        acc = 0
        for shift, ch in zip((0, 6, 12, 18), body[i : i + 4], strict=True):
            value = _B64_VALUE.get(ch)
            if value is None:
                return None
            acc |= value << shift
        out += acc.to_bytes(3, "little")
    if pad:
        if out[-pad:] != bytes(pad):
            return None
        del out[-pad:]
    return bytes(out) or None


def volume_key_of_dir_name(dir_name: str) -> bytes | None:
    """The volume key of a volume directory ``I<key>``, or None for another name."""
    if not dir_name.startswith("I") or len(dir_name) < 2:
        return None
    key = os.fsencode(dir_name[1:])
    return key if b"\0" not in key else None


def volume_dir_name(volume_key: bytes) -> str:
    """``I`` + the volume key, as a ``str`` path component (undecodable bytes are kept
    through the filesystem encoding's surrogate escapes). ValueError if the kernel
    could not make such a directory."""
    key = _volume_key(volume_key)
    if b"/" in key:
        raise ValueError(f"volume key {volume_key!r} holds a '/'")
    if 1 + len(key) > NAME_MAX:
        raise ValueError(f"volume key of {len(key)} bytes makes a name over NAME_MAX")
    return "I" + os.fsdecode(key)


def object_path(cache_dir: Path | str, volume_key: bytes, cookie_key: bytes) -> Path:
    """``<cache_dir>/cache/I<volume>/@xx/<name>``: where the kernel keeps (commits) the
    object's file. ValueError for keys the kernel cannot store."""
    name = object_file_name(cookie_key)
    if len(os.fsencode(name)) > NAME_MAX:
        raise ValueError(f"object name of {len(name)} characters exceeds NAME_MAX")
    return (
        Path(cache_dir)
        / "cache"
        / volume_dir_name(volume_key)
        / fanout_dir_name(volume_key, cookie_key)
        / name
    )

"""Pattern bytes: byte N of a blob is computable from (seed, N) alone, so a shifted or
misplaced write shows up at once (rclone's pattern reader idea)."""

from __future__ import annotations

_PERIOD = 65521  # prime: the pattern does not repeat at any power-of-two stride


def _table(seed: int) -> bytes:
    return bytes(((i * 131 + (i >> 7) * 17 + seed * 29) ^ (i >> 3)) & 0xFF for i in range(_PERIOD))


_cache: dict[int, bytes] = {}


def pattern_bytes(seed: int, offset: int, length: int) -> bytes:
    table = _cache.get(seed)
    if table is None:
        table = _cache[seed] = _table(seed) * 2
    out = bytearray()
    while len(out) < length:
        start = (offset + len(out)) % _PERIOD
        out += table[start : start + min(_PERIOD, length - len(out))]
    return bytes(out)

"""Hostile presence sidecars, for tests and the sidecar fuzzer.

The crc32s of a sidecar only catch accidents: whoever can write the file can
recompute them. :func:`reseal` does that for a mutated sidecar, so that a test or a
fuzzer reaches the checks behind the checksums (geometry, bitmap, token).
"""

from __future__ import annotations

import zlib

from cachefilesd_py.presence import format as fmt


def reseal(raw: bytes | bytearray) -> bytes:
    """``raw`` with both checksums recomputed where its header says they are (``raw``
    unchanged when it is too short to hold them)."""
    if len(raw) < fmt.HEAD.size:
        return bytes(raw)
    hend = fmt.HEAD.size + fmt.HEAD.unpack_from(raw)[-1]
    if len(raw) < hend + 2 * fmt.CRC.size:
        return bytes(raw)
    out = bytearray(raw)
    out[hend : hend + fmt.CRC.size] = fmt.CRC.pack(zlib.crc32(out[:hend]))
    out[-fmt.CRC.size :] = fmt.CRC.pack(zlib.crc32(out[hend + fmt.CRC.size : -fmt.CRC.size]))
    return bytes(out)

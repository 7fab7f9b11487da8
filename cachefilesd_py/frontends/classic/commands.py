"""Classic mode's text protocol (pure).

``read()`` on a classically bound ``/dev/cachefiles`` returns one state line::

    cull=0 frun=237 fcull=195 fstop=51 brun=1e3c bcull=1428 bstop=a14 freleased=0 breleased=0

numbers in lowercase hex without ``0x``; older kernels omit the ``*released`` fields.
A malformed token is warned about and skipped, never fatal; a value is taken only in
the kernel's form (``int(x, 16)`` alone would also take ``-1``, ``0x``, ``_``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class CacheState:
    cull: bool
    values: dict[str, int] = field(default_factory=dict)
    malformed: tuple[str, ...] = ()

    def get(self, name: str, default: int = 0) -> int:
        return self.values.get(name, default)


def parse_state(line: bytes) -> CacheState:
    values: dict[str, int] = {}
    bad: list[str] = []
    for token in line.decode("ascii", "replace").split():
        key, eq, value = token.partition("=")
        if not eq or not key or not _HEX.fullmatch(value):
            bad.append(token)
            continue
        values[key] = int(value, 16)
    return CacheState(values.get("cull", 0) != 0, values, tuple(bad))

"""Classic mode's text protocol (pure).

``read()`` on a classically bound ``/dev/cachefiles`` returns one state line::

    cull=0 frun=237 fcull=195 fstop=51 brun=1e3c bcull=1428 bstop=a14 freleased=0 breleased=0

numbers in lowercase hex without ``0x``; older kernels omit the ``*released`` fields.
A malformed token is warned about and skipped, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
        if not eq or not key:
            bad.append(token)
            continue
        try:
            values[key] = int(value, 16)
        except ValueError:
            bad.append(token)
    return CacheState(values.get("cull", 0) != 0, values, tuple(bad))

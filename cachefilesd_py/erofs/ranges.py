"""Byte ranges per blob: what a path (or the whole image's metadata) needs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


class RangeSet:
    """Half-open byte ranges ``[start, end)``, merged when they touch or overlap."""

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self._pending: list[tuple[int, int]] = []
        self._merged: list[tuple[int, int]] = []
        for start, end in ranges or ():
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if start < 0 or end < start:
            raise ValueError(f"bad range {start}..{end}")
        if end > start:
            self._pending.append((start, end))

    def update(self, other: RangeSet) -> None:
        self._pending.extend(other)

    def _merge(self) -> list[tuple[int, int]]:
        if self._pending:
            spans = sorted(self._merged + self._pending)
            self._pending = []
            out: list[tuple[int, int]] = []
            for start, end in spans:
                if out and start <= out[-1][1]:
                    if end > out[-1][1]:
                        out[-1] = (out[-1][0], end)
                else:
                    out.append((start, end))
            self._merged = out
        return self._merged

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self._merge()))

    def __len__(self) -> int:
        return len(self._merge())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    def total(self) -> int:
        return sum(end - start for start, end in self._merge())

    def covers(self, start: int, end: int) -> bool:
        return any(s <= start and end <= e for s, e in self._merge())

    def aligned(self, unit: int) -> RangeSet:
        """The ranges rounded out to multiples of ``unit`` (a block, a cache chunk)."""
        return RangeSet([(s // unit * unit, -(-e // unit) * unit) for s, e in self._merge()])


@dataclass
class Needs:
    """What some part of an image needs, per blob: device 0 is the primary blob (the
    image itself), 1.. the extra blobs of its device table (``tags`` names them).
    ``whole`` lists blobs needed entirely because a part of them could not be mapped
    (compressed files: their lcluster indexes are not parsed here)."""

    ranges: dict[int, RangeSet] = field(default_factory=dict)
    whole: dict[int, str] = field(default_factory=dict)  # device → why
    tags: dict[int, str] = field(default_factory=dict)

    def add(self, device: int, start: int, end: int) -> None:
        self.ranges.setdefault(device, RangeSet()).add(start, end)

    def need_whole(self, device: int, why: str) -> None:
        self.whole.setdefault(device, why)

    def update(self, other: Needs) -> None:
        for device, rs in other.ranges.items():
            self.ranges.setdefault(device, RangeSet()).update(rs)
        for device, why in other.whole.items():
            self.need_whole(device, why)
        self.tags.update(other.tags)

    def for_device(self, device: int) -> RangeSet:
        return self.ranges.get(device, RangeSet())

    def total(self) -> int:
        return sum(rs.total() for rs in self.ranges.values())

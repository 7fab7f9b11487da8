"""Pure chunk algebra: a blob's chunk geometry and the bitmap of present chunks.

Bit ``i`` is bit ``i % 8`` (least significant first) of byte ``i // 8``. A 1 TiB blob
in 1 MiB chunks (the default) has 1 Mi chunks: a 128 KiB bitmap; in 64 KiB chunks,
a 2 MiB one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkGeometry:
    blob_size: int
    chunk_size: int

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"chunk size {self.chunk_size} is not a power of two")
        if self.blob_size < 0:
            raise ValueError("negative blob size")

    @property
    def nchunks(self) -> int:
        return -(-self.blob_size // self.chunk_size)

    def chunks_for(self, offset: int, length: int) -> tuple[int, int]:
        """The chunks ``[first, last)`` covering ``[offset, offset+length)``, clipped."""
        end = min(self.blob_size, offset + length)
        if length <= 0 or offset >= end:
            return (0, 0)
        return offset // self.chunk_size, -(-end // self.chunk_size)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``index``; the last one may be short."""
        start = index * self.chunk_size
        if not 0 <= index < self.nchunks:
            raise IndexError(f"chunk {index} outside 0..{self.nchunks - 1}")
        return start, min(self.chunk_size, self.blob_size - start)


class ChunkBitmap:
    """A fixed-size bit set with run queries."""

    __slots__ = ("_bits", "nchunks")

    def __init__(self, nchunks: int, data: bytes | None = None) -> None:
        self.nchunks = nchunks
        size = (nchunks + 7) // 8
        if data is None:
            self._bits = bytearray(size)
        else:
            if len(data) != size:
                raise ValueError(f"bitmap of {len(data)} bytes for {nchunks} chunks")
            self._bits = bytearray(data)
            if nchunks % 8 and self._bits[-1] >> (nchunks % 8):
                raise ValueError("bits set past the last chunk")

    def _check(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.nchunks:
            raise IndexError(f"chunks {first}+{count} outside 0..{self.nchunks}")

    def test(self, i: int) -> bool:
        self._check(i, 1)
        return bool(self._bits[i >> 3] >> (i & 7) & 1)

    def set_range(self, first: int, count: int) -> None:
        self._check(first, count)
        for i in range(first, first + count):
            self._bits[i >> 3] |= 1 << (i & 7)

    def clear_range(self, first: int, count: int) -> None:
        self._check(first, count)
        for i in range(first, first + count):
            self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def count(self) -> int:
        return int.from_bytes(self._bits, "little").bit_count()

    def _runs(self, first: int, last: int, want: bool) -> list[tuple[int, int]]:
        last = min(last, self.nchunks)
        runs: list[tuple[int, int]] = []
        start = -1
        i = max(0, first)
        bits = self._bits
        while i < last:
            byte = bits[i >> 3]
            if (i & 7) == 0 and last - i >= 8 and byte in (0, 0xFF):
                uniform = byte == 0xFF
                if uniform == want:
                    if start < 0:
                        start = i
                elif start >= 0:
                    runs.append((start, i - start))
                    start = -1
                i += 8
                continue
            if bool(byte >> (i & 7) & 1) == want:
                if start < 0:
                    start = i
            elif start >= 0:
                runs.append((start, i - start))
                start = -1
            i += 1
        if start >= 0:
            runs.append((start, last - start))
        return runs

    def missing_runs(self, first: int, last: int) -> list[tuple[int, int]]:
        """``(start, count)`` of each run of absent chunks in ``[first, last)``."""
        return self._runs(first, last, want=False)

    def present_runs(self, first: int, last: int) -> list[tuple[int, int]]:
        return self._runs(first, last, want=True)

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def copy(self) -> ChunkBitmap:
        return ChunkBitmap(self.nchunks, bytes(self._bits))

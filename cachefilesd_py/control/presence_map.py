"""A blob's presence map, folded to a fixed number of cells and drawn (pure).

A blob may have millions of chunks; a terminal has ~80 columns. The daemon folds the
presence bitmap into ``width`` cells (:func:`fold`): cell *i* covers chunks
``[i*n//width, (i+1)*n//width)`` and holds how many of them are present, so a cell is
either full, empty or partly filled — never rounded to "full" when one chunk is
missing. The client draws the cells (:func:`draw`) with a legend.
"""

from __future__ import annotations

from collections.abc import Sequence

#: cell glyphs: empty, partly present (< half, >= half), full
EMPTY, LOW, HIGH, FULL = "·", "░", "▒", "█"
LEGEND = f"{FULL} all chunks present  {HIGH} half or more  {LOW} some  {EMPTY} none"


def fold(bits: bytes, nchunks: int, width: int) -> list[tuple[int, int]]:
    """``(present, chunks)`` per cell, ``min(width, nchunks)`` cells, for a bitmap of
    ``nchunks`` bits (bit *i* is bit ``i % 8`` of byte ``i // 8``)."""
    if nchunks <= 0:
        return []
    if len(bits) * 8 < nchunks:
        raise ValueError(f"bitmap of {len(bits)} bytes for {nchunks} chunks")
    width = max(1, min(width, nchunks))
    cells = []
    for i in range(width):
        lo, hi = i * nchunks // width, (i + 1) * nchunks // width
        # only the bytes of this cell: linear in the bitmap's size over all cells
        value = int.from_bytes(bits[lo >> 3 : (hi + 7) >> 3], "little") >> (lo & 7)
        span = value & ((1 << (hi - lo)) - 1)
        cells.append((span.bit_count(), hi - lo))
    return cells


def glyph(present: int, chunks: int) -> str:
    if present <= 0:
        return EMPTY
    if present >= chunks:
        return FULL
    return HIGH if 2 * present >= chunks else LOW


def draw(cells: Sequence[Sequence[int]], columns: int = 64) -> list[str]:
    """The cells as lines of at most ``columns`` glyphs, then the legend."""
    text = "".join(glyph(int(p), int(n)) for p, n in cells)
    lines = [text[i : i + columns] for i in range(0, len(text), columns)] or [""]
    return [*lines, LEGEND]

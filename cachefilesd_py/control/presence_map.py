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


#: PNG colours: no chunk present (grey), every chunk present (green); between, mixed
_NONE_RGB = (0xD0, 0xD0, 0xD0)
_FULL_RGB = (0x1B, 0x9E, 0x3E)


def _colour(present: int, chunks: int) -> tuple[int, int, int]:
    f = present / chunks if chunks else 0.0
    if 0 < present < chunks:  # partly present never looks full or empty
        f = 0.15 + 0.7 * f
    return tuple(round(a + (b - a) * f) for a, b in zip(_NONE_RGB, _FULL_RGB, strict=True))  # type: ignore[return-value]


def png(cells: Sequence[Sequence[int]], columns: int = 64, cell_px: int = 10) -> bytes:
    """The cells as a PNG image: ``columns`` cells a row, ``cell_px`` pixels a side,
    a 1-pixel white grid between cells. An 8-bit RGB PNG is a signature and three
    chunks (IHDR, IDAT holding the zlib-compressed rows, each led by filter byte 0,
    IEND), each chunk ``length, type, data, CRC-32``; nothing more is needed."""
    import struct
    import zlib

    n = max(1, len(cells))
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    width, height = cols * cell_px, rows * cell_px
    white = b"\xff\xff\xff"
    raw = bytearray()
    for r in range(rows):
        line = bytearray()
        for c in range(cols):
            i = r * cols + c
            rgb = bytes(_colour(int(cells[i][0]), int(cells[i][1]))) if i < len(cells) else white
            line += rgb * (cell_px - 1) + white
        for y in range(cell_px):
            raw += b"\x00" + (line if y < cell_px - 1 else white * width)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(raw), 9))
        + chunk(b"IEND", b"")
    )

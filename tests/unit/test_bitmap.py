"""Chunk geometry and the bitmap, against a plain set of chunk indexes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cachefilesd_py.presence.bitmap import ChunkBitmap, ChunkGeometry


def runs_of(indexes: set[int], first: int, last: int, want: bool) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in range(first, last):
        if (i in indexes) == want:
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
    return runs


class BitmapModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.bm: ChunkBitmap | None = None
        self.model: set[int] = set()

    @precondition(lambda self: self.bm is None)
    @rule(n=st.integers(1, 300))
    def create(self, n: int) -> None:
        self.n, self.bm = n, ChunkBitmap(n)

    @precondition(lambda self: self.bm is not None)
    @rule(data=st.data())
    def set_range(self, data: st.DataObject) -> None:
        first = data.draw(st.integers(0, self.n - 1))
        count = data.draw(st.integers(0, self.n - first))
        assert self.bm is not None
        self.bm.set_range(first, count)
        self.model |= set(range(first, first + count))

    @precondition(lambda self: self.bm is not None)
    @rule(data=st.data())
    def clear_range(self, data: st.DataObject) -> None:
        first = data.draw(st.integers(0, self.n - 1))
        count = data.draw(st.integers(0, self.n - first))
        assert self.bm is not None
        self.bm.clear_range(first, count)
        self.model -= set(range(first, first + count))

    @precondition(lambda self: self.bm is not None)
    @rule(data=st.data())
    def runs(self, data: st.DataObject) -> None:
        first = data.draw(st.integers(0, self.n))
        last = data.draw(st.integers(first, self.n))
        assert self.bm is not None
        assert self.bm.missing_runs(first, last) == runs_of(self.model, first, last, False)
        assert self.bm.present_runs(first, last) == runs_of(self.model, first, last, True)

    @invariant()
    def agrees(self) -> None:
        if self.bm is not None:
            assert self.bm.count() == len(self.model)
            assert {i for i in range(self.n) if self.bm.test(i)} == self.model
            assert ChunkBitmap(self.n, self.bm.to_bytes()).count() == len(self.model)


TestBitmapModel = BitmapModel.TestCase
TestBitmapModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@given(
    st.integers(0, 10**13),
    st.sampled_from([4096, 65536, 262144, 1 << 20]),
    st.integers(0, 10**13),
    st.integers(1, 1 << 24),
)
def test_geometry_covers_exactly(size: int, chunk: int, off: int, length: int) -> None:
    g = ChunkGeometry(size, chunk)
    first, last = g.chunks_for(off, length)
    if off >= size:
        assert (first, last) == (0, 0)
        return
    start, _ = g.chunk_range(first)
    end_off, end_len = g.chunk_range(last - 1)
    assert start <= off < start + chunk
    assert end_off + end_len >= min(size, off + length)
    assert end_off + end_len <= size


def test_one_tebibyte_geometry_is_cheap() -> None:
    g = ChunkGeometry(1 << 40, 256 << 10)
    assert g.nchunks == 4 << 20
    bm = ChunkBitmap(g.nchunks)
    bm.set_range(g.nchunks - 3, 3)
    assert len(bm.to_bytes()) == 512 << 10
    assert bm.missing_runs(g.nchunks - 10, g.nchunks) == [(g.nchunks - 10, 7)]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        ChunkGeometry(10, 3000)
    with pytest.raises(ValueError):
        ChunkBitmap(9, b"\x00\x02")  # bit 9 set past the last chunk
    with pytest.raises(IndexError):
        ChunkBitmap(8).set_range(5, 4)

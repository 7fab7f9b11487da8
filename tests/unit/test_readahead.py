"""Stream read-ahead: sequential READs grow a window, random READs get none."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.engine.readahead import Prefetch, StreamReadahead

K = 1024
M = 1024 * K
CHUNK = 256 * K
SIZE = 200 * M


def policy(max_window: int = 4 * M, streams: int = 8) -> StreamReadahead:
    return StreamReadahead(max_window, first_window=1 * M, slack=CHUNK, streams=streams)


def serve_sequential(ra: StreamReadahead, size: int, step: int) -> tuple[int, int]:
    """A reader going through the blob ``step`` bytes at a time; like the kernel, it
    sends a READ only for a range with a missing chunk, starting at the first missing
    one. Fills are whole chunks and prefetches complete at once. Returns (READs, bytes
    prefetched)."""
    present: set[int] = set()
    reads = prefetched = 0
    for pos in range(0, size, step):
        wanted = range(pos // CHUNK, (min(pos + step, size) - 1) // CHUNK + 1)
        missing = [c for c in wanted if c not in present]
        if not missing:
            continue
        reads += 1
        start = missing[0] * CHUNK
        end = min(pos + step, size)
        present.update(range(start // CHUNK, (end - 1) // CHUNK + 1))
        ahead = ra.on_read(start, end - start, size)
        if ahead is not None:
            prefetched += ahead.length
            present.update(range(ahead.offset // CHUNK, (ahead.end() - 1) // CHUNK + 1))
    return reads, prefetched


def test_a_read_at_offset_zero_starts_a_sequential_stream() -> None:
    assert policy().on_read(0, 4096, SIZE) == Prefetch(4096, 1 * M)


def test_a_read_elsewhere_gets_no_readahead_until_it_continues() -> None:
    ra = policy()
    assert ra.on_read(50 * M, 4096, SIZE) is None
    # the next hole after the filled chunk: continues the stream, first window
    assert ra.on_read(50 * M + CHUNK, 128 * K, SIZE) == Prefetch(50 * M + CHUNK + 128 * K, M)


@pytest.mark.parametrize(
    ("reads", "windows"),
    [
        # each READ starts where the previous prefetch ended: 1M, 2M, 4M, 4M
        ([(0, 4 * K), (M + 4 * K, 4 * K), (3 * M + 8 * K, 4 * K), (7 * M, 4 * K)], [4 * M]),
        # a READ inside the span in flight continues it too
        ([(0, 4 * K), (CHUNK, 4 * K)], [2 * M]),
        # a gap of more than one chunk past the end is a new stream
        ([(0, 4 * K), (M + 4 * K + 2 * CHUNK, 4 * K)], [M, 0]),
        # backwards is not a continuation
        ([(10 * M, 4 * K), (9 * M, 4 * K)], [0, 0]),
    ],
)
def test_window_growth(reads: list[tuple[int, int]], windows: list[int]) -> None:
    ra = policy()
    for offset, length in reads:
        ra.on_read(offset, length, SIZE)
    assert ra.windows == windows


def test_a_sequential_reader_needs_few_reads_and_windows_stop_at_the_maximum() -> None:
    ra = policy()
    reads, prefetched = serve_sequential(ra, SIZE, 128 * K)
    # the window ramps 1, 2, 4 MiB, then each READ buys 4 MiB ahead
    assert reads <= SIZE // (4 * M) + 4
    assert prefetched <= SIZE
    assert ra.windows == [4 * M]


def test_random_reads_fetch_nothing_ahead() -> None:
    ra = policy()
    rng = random.Random(3)
    aheads = [ra.on_read(rng.randrange(1, SIZE // 4096) * 4096, 4096, SIZE) for _ in range(1000)]
    # ~1 % land by chance within a chunk past one of the 8 remembered reads' ends
    # (8 x 260 KiB of 200 MiB) and get a first window; none keeps growing
    assert sum(a is not None for a in aheads) <= 30
    assert max(ra.windows) <= 2 * M


def test_interleaved_streams_are_told_apart() -> None:
    ra = policy()
    bases = [i * 20 * M for i in range(1, 9)]  # eight files read at once
    for step in range(4):
        for base in bases:
            ra.on_read(base + step * CHUNK, CHUNK, SIZE)
    assert ra.windows == [4 * M] * 8


def test_the_least_recent_stream_is_forgotten() -> None:
    ra = policy(streams=2)
    ra.on_read(10 * M, 4 * K, SIZE)
    ra.on_read(30 * M, 4 * K, SIZE)
    ra.on_read(50 * M, 4 * K, SIZE)  # forgets the stream at 10M
    assert ra.on_read(10 * M + CHUNK, 4 * K, SIZE) is None
    assert ra.on_read(50 * M + CHUNK, 4 * K, SIZE) is not None


def test_no_window_means_no_readahead_even_at_zero() -> None:
    ra = StreamReadahead(0, first_window=M, slack=CHUNK)
    assert ra.on_read(0, 4096, SIZE) is None
    assert ra.on_read(CHUNK, 4096, SIZE) is None


def test_nothing_ahead_at_the_end_of_the_blob() -> None:
    ra = policy()
    assert ra.on_read(0, 1000, 1000) is None
    assert ra.on_read(0, 100, 1000) == Prefetch(100, 900)


@given(
    st.lists(st.tuples(st.integers(0, 64 * M), st.integers(0, 4 * M)), min_size=1, max_size=200),
    st.integers(1, 64 * M),
    st.sampled_from([0, 64 * K, M, 4 * M]),
)
def test_prefetches_start_at_the_read_end_and_stay_inside_the_blob(
    reads: list[tuple[int, int]], size: int, max_window: int
) -> None:
    ra = StreamReadahead(max_window, first_window=M, slack=CHUNK, streams=4)
    for offset, length in reads:
        offset = min(offset, size - 1)
        ahead = ra.on_read(offset, length, size)
        if ahead is None:
            continue
        assert ahead.offset == min(offset + length, size)
        assert 0 < ahead.length <= max_window
        assert ahead.end() <= size
        assert len(ra.windows) <= 4

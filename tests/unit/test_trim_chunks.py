"""Which chunks an idle blob gives back, and the leases that keep trims off used files."""

from __future__ import annotations

import threading

from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.engine.leases import BlobLeases
from cachefilesd_py.presence.bitmap import ChunkBitmap
from cachefilesd_py.space.chunks import chunks_to_trim, keep_head_chunks, should_trim

C = 64 * 1024


def bitmap_of(bits: list[bool]) -> ChunkBitmap:
    bm = ChunkBitmap(len(bits))
    for i, b in enumerate(bits):
        if b:
            bm.set_range(i, 1)
    return bm


def test_table() -> None:
    present = [(0, 10)]
    size = 10 * C
    # from the tail, whole chunks, enough to cover the need
    assert chunks_to_trim(present, size, C, 1, keep_head=1) == [(9, 1)]
    assert chunks_to_trim(present, size, C, C + 1, keep_head=1) == [(8, 2)]
    # never into the head; everything trimmable when the need is larger
    assert chunks_to_trim(present, size, C, 100 * C, keep_head=3) == [(3, 7)]
    # holes are skipped, runs come tail first
    assert chunks_to_trim([(0, 2), (5, 2), (8, 1)], size, C, 3 * C, keep_head=1) == [(8, 1), (5, 2)]
    assert chunks_to_trim([(0, 2), (5, 2), (8, 1)], size, C, 2 * C, keep_head=1) == [(8, 1), (6, 1)]
    # a short last chunk counts for its real length
    assert chunks_to_trim([(0, 3)], 2 * C + 100, C, 101, keep_head=1) == [(1, 2)]
    assert chunks_to_trim(present, size, C, 0, keep_head=1) == []
    assert keep_head_chunks(C) == 16 and keep_head_chunks(4 << 20) == 1


def test_should_trim_only_much_larger_blobs() -> None:
    assert should_trim(100, 10) and not should_trim(100, 60) and not should_trim(100, 0)


@given(
    st.lists(st.booleans(), min_size=1, max_size=300),
    st.integers(0, 64),
    st.integers(0, 400 * 1024),
    st.integers(1, 4096),
)
def test_trim_takes_only_present_tail_chunks(
    bits: list[bool], keep: int, need: int, short: int
) -> None:
    chunk = 1024
    size = (len(bits) - 1) * chunk + short
    bm = bitmap_of(bits)
    runs = chunks_to_trim(bm.present_runs(0, len(bits)), size, chunk, need, keep)
    chosen = [i for first, count in runs for i in range(first, first + count)]
    assert len(chosen) == len(set(chosen))
    assert all(bits[i] and i >= keep for i in chosen)

    def length(i: int) -> int:
        return min(chunk, size - i * chunk)

    got = sum(length(i) for i in chosen)
    trimmable = [i for i, b in enumerate(bits) if b and i >= keep]
    if got < need:  # not enough: then everything trimmable was taken
        assert sorted(chosen) == trimmable
    elif chosen:  # enough: minimal, and nothing above a kept chunk was skipped
        assert got - length(min(chosen)) < need
        assert all(i in chosen for i in trimmable if i > min(chosen))


def test_trim_lease_excludes_users_and_new_users_wait() -> None:
    leases = BlobLeases()
    key = (b"erofs,v", b"blob")
    assert leases.acquire_use(key)
    with leases.trim(key) as granted:
        assert not granted  # in use: hands off
    leases.release_use(key)
    entered = threading.Event()
    with leases.trim(key) as granted:
        assert granted
        t = threading.Thread(target=lambda: (leases.acquire_use(key), entered.set()))
        t.start()
        assert not entered.wait(0.2)  # an OPEN waits for the trim
        assert not leases.acquire_use(key, timeout=0.01)
        with leases.trim(key) as again:
            assert not again  # one trim at a time
    t.join(5)
    assert entered.is_set() and leases.in_use() == {key}

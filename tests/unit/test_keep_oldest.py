"""``keep_oldest``: the ``limit`` oldest candidates by atime, whatever the order they
come in and however often the buffer is cut back, with every candidate counted."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.space.scan import Candidate, ScanResult, keep_oldest

atimes = st.lists(st.integers(min_value=0, max_value=50), max_size=300)


@given(atimes, st.integers(min_value=0, max_value=40))
def test_the_limit_oldest_are_kept_in_atime_order_ties_in_walk_order(
    times: list[int], limit: int
) -> None:
    cands = [Candidate(t, i % 7, "/c/@00", f"D{i}") for i, t in enumerate(times)]
    result = ScanResult(oldest=[])
    keep_oldest(iter(cands), limit, result)
    assert result.oldest == sorted(cands, key=lambda c: c.atime_ns)[:limit]
    assert result.objects == len(cands)
    assert result.blocks == sum(c.blocks for c in cands)


def test_counts_add_up_over_calls() -> None:
    result = ScanResult(oldest=[])
    keep_oldest(iter([Candidate(5, 2, "/d", "D1")]), 4, result)
    keep_oldest(iter([Candidate(1, 3, "/d", "D2")]), 4, result)
    assert (result.objects, result.blocks) == (2, 5)
    assert [c.name for c in result.oldest] == ["D2"]

"""The supervisor's health rules (daemon/health.py): a table of situations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.daemon.health import Beat, CrashBudget, Limits, verdict

L = Limits(start=30, heartbeat=10, loop=10, read=120)

CASES = [
    # (now, told, serving_since, beat, healthy, reason fragment)
    (5.0, 0.0, None, None, True, "starting"),
    (31.0, 0.0, None, None, False, "not serving 31 s"),
    (12.0, 0.0, 2.0, None, True, ""),
    (13.0, 0.0, 2.0, None, False, "no heartbeat for 11 s"),
    (20.0, 0.0, 2.0, Beat(19.5, 0.2, None), True, ""),
    (20.0, 0.0, 2.0, Beat(19.5, 9.0, None), True, ""),
    (20.0, 0.0, 2.0, Beat(19.5, 10.0, None), False, "request loop stalled for 10 s"),
    (20.0, 0.0, 2.0, Beat(10.5, 0.1, None), True, ""),
    (20.0, 0.0, 2.0, Beat(10.0, 0.1, None), False, "request loop stalled for 10 s"),
    (20.0, 0.0, 2.0, Beat(9.0, 0.1, None), False, "no heartbeat for 11 s"),
    (20.0, 0.0, 2.0, Beat(19.0, 0.1, 119.0), True, ""),
    (20.0, 0.0, 2.0, Beat(19.0, 0.1, 121.0), False, "a READ in service for 122 s"),
    (20.0, 0.0, 2.0, Beat(19.0, None, None), True, ""),  # classic: no loop age
]


@pytest.mark.parametrize(("now", "told", "since", "beat", "healthy", "why"), CASES)
def test_verdicts(
    now: float, told: float, since: float | None, beat: Beat | None, healthy: bool, why: str
) -> None:
    v = verdict(L, now, told_to_serve_at=told, serving_since=since, beat=beat)
    assert v.healthy is healthy
    assert why in v.reason


def test_read_limit_follows_the_fetch_deadline() -> None:
    assert Limits.for_fetch_timeout(30).read == 120
    assert Limits.for_fetch_timeout(3).read == 39


@given(
    st.floats(0, 1e6),
    st.floats(0, 100),
    st.one_of(st.none(), st.floats(0, 1000)),
    st.one_of(st.none(), st.floats(0, 1000)),
)
def test_a_fresh_heartbeat_with_small_ages_is_healthy(
    now: float, age: float, loop: float | None, read: float | None
) -> None:
    beat = Beat(now, None if loop is None else min(loop, 9.9),
                None if read is None else min(read, 119.9))
    assert verdict(L, now, told_to_serve_at=0, serving_since=0, beat=beat).healthy
    stale = Beat(now - 10.5 - age)
    assert not verdict(L, now, told_to_serve_at=0, serving_since=0, beat=stale).healthy


def test_crash_budget_counts_deaths_in_a_sliding_window() -> None:
    b = CrashBudget(deaths=3, window=10)
    assert all(b.spend(t) for t in (0, 1, 2))
    assert not b.spend(3)  # a 4th within 10 s
    b = CrashBudget(deaths=3, window=10)
    assert all(b.spend(t) for t in (0, 5, 9, 11, 16, 20))  # never 4 within 10 s
    assert b.recent == 3

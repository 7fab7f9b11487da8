"""Latency histogram: quantiles are bucket upper bounds, never optimistic."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.engine.latency import BOUNDS, LatencyHistogram

WIDTH = 2 ** (1 / 4)


def test_empty_has_no_quantiles() -> None:
    h = LatencyHistogram()
    assert h.quantile(0.5) is None
    assert h.summary_ms("read") == {"read_n": 0}


@pytest.mark.parametrize(
    ("samples", "q", "low", "high"),
    [
        ([0.005], 0.5, 0.005, 0.005 * WIDTH),
        ([0.001] * 99 + [1.0], 0.5, 0.001, 0.001 * WIDTH),
        ([0.001] * 99 + [1.0], 0.99, 0.001, 0.001 * WIDTH),
        ([0.001] * 98 + [1.0] * 2, 0.99, 1.0, 1.0 * WIDTH),
        ([0.0], 1.0, 0.0, BOUNDS[0]),
    ],
)
def test_table(samples: list[float], q: float, low: float, high: float) -> None:
    h = LatencyHistogram()
    for s in samples:
        h.record(s)
    value = h.quantile(q)
    assert value is not None and low <= value <= high


def test_beyond_the_last_bucket_is_infinite() -> None:
    h = LatencyHistogram()
    h.record(BOUNDS[-1] * 10)
    assert h.quantile(0.5) == math.inf


def test_summary_names_the_fields() -> None:
    h = LatencyHistogram()
    h.record(0.002)
    out = h.summary_ms("fetch")
    assert out["fetch_n"] == 1 and 2.0 <= out["fetch_p50_ms"] <= 2.0 * WIDTH + 0.001


def test_quantile_outside_range_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        LatencyHistogram().quantile(1.5)


@given(
    st.lists(st.floats(1e-6, 100.0), min_size=1, max_size=300),
    st.sampled_from([0.01, 0.07, 0.5, 0.9, 0.99, 1.0]),
)
def test_never_optimistic_at_most_one_bucket_pessimistic(samples: list[float], q: float) -> None:
    h = LatencyHistogram()
    for s in samples:
        h.record(s)
    exact = sorted(samples)[max(1, math.ceil(round(q * len(samples), 9))) - 1]
    value = h.quantile(q)
    assert value is not None
    assert exact <= value <= exact * WIDTH * (1 + 1e-9)

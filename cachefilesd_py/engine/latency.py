"""Latency histograms with bounded memory, for the daemon's own service times (pure).

An admin (and a benchmark) wants to know how long the daemon takes per READ and per
source fetch, without keeping every sample: a log-scale histogram with four buckets per
power of two (each bucket ≤ 19 % wide) from 1 µs to about 17 minutes, 120 counters in
all. A quantile is reported as the upper bound of the bucket it falls in, so it is at
most one bucket width pessimistic and never optimistic.
"""

from __future__ import annotations

import bisect
import math
import threading

_STEPS_PER_OCTAVE = 4
_FLOOR = 1e-6
#: upper bounds of the buckets, in seconds; one more bucket catches anything above
BOUNDS: tuple[float, ...] = tuple(
    _FLOOR * 2 ** (i / _STEPS_PER_OCTAVE) for i in range(1, 30 * _STEPS_PER_OCTAVE + 1)
)


class LatencyHistogram:
    """Thread-safe counts of durations in log-scale buckets."""

    def __init__(self) -> None:
        self._counts = [0] * (len(BOUNDS) + 1)
        self._total = 0
        self._sum = 0.0
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        index = bisect.bisect_left(BOUNDS, max(0.0, seconds))
        with self._lock:
            self._counts[index] += 1
            self._total += 1
            self._sum += seconds

    @property
    def count(self) -> int:
        return self._total

    def snapshot(self) -> tuple[list[int], int, float]:
        """Per-bucket counts (bucket *i* up to ``BOUNDS[i]``, the last one above all
        bounds), the total count and the sum of the durations, taken together."""
        with self._lock:
            return list(self._counts), self._total, self._sum

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the ``q`` quantile (None if empty;
        ``inf`` if it lies beyond the last bound)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} outside [0, 1]")
        with self._lock:
            total = self._total
            counts = list(self._counts)
        if total == 0:
            return None
        rank = max(1, math.ceil(round(q * total, 9)))  # round: 0.07 * 100 is 7.000…01
        seen = 0
        for index, n in enumerate(counts):
            seen += n
            if seen >= rank:
                return BOUNDS[index] if index < len(BOUNDS) else float("inf")
        return float("inf")  # pragma: no cover - seen reaches total above

    def summary_ms(self, name: str) -> dict[str, float | int]:
        """``{name}_n``, ``{name}_p50_ms``, ``{name}_p99_ms`` for a log line."""
        out: dict[str, float | int] = {f"{name}_n": self.count}
        for label, q in (("p50", 0.5), ("p99", 0.99)):
            value = self.quantile(q)
            if value is not None:
                out[f"{name}_{label}_ms"] = round(value * 1000, 3)
        return out

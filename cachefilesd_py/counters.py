"""Counters by a bounded label, kept where the events happen (pure, thread-safe).

The core (engine, sources, presence, space) counts what it does here — bytes fetched
per source, source retries, errors by kind — and the daemon reads the counts when
it is asked (``daemon/metrics.py``, the ``stats`` line). The core never imports the
daemon or a metrics library: a counter is a dict under a leaf lock.

A label becomes a Prometheus label value, and every distinct value is a time series
kept by the scraper for good: labels must come from a small set the configuration or
the code fixes (a ``source`` rule, an error kind), never from a key the kernel or an
origin chose. As a last guard a counter keeps at most ``max_labels`` distinct labels;
counts under any further label go to :data:`OVERFLOW`.
"""

from __future__ import annotations

import threading

#: the label of counts whose own label came after ``max_labels`` others
OVERFLOW = "other"


class LabelledCounts:
    """Monotonic counts by label (see the module docstring). ``add`` is one dict
    update under a leaf lock: cheap enough for once per fetched run."""

    __slots__ = ("_counts", "_lock", "max_labels")

    def __init__(self, max_labels: int = 64) -> None:
        self.max_labels = max_labels
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, label: str, n: int = 1) -> None:
        with self._lock:
            counts = self._counts
            if label not in counts and len(counts) >= self.max_labels:
                label = OVERFLOW
            counts[label] = counts.get(label, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def __getitem__(self, label: str) -> int:
        with self._lock:
            return self._counts.get(label, 0)

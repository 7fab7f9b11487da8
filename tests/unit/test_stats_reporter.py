"""The running daemon's stats line: periodic, on request, never fatal."""

from __future__ import annotations

import queue
import time

from cachefilesd_py.daemon.stats import StatsReporter


def test_request_emits_now_and_interval_emits_again() -> None:
    lines: queue.Queue[dict[str, object]] = queue.Queue()
    counter = iter(range(100))
    reporter = StatsReporter(lambda: {"reads": next(counter)}, interval=0.2, emit=lines.put)
    reporter.start()
    try:
        reporter.request()
        first = lines.get(timeout=5)
        second = lines.get(timeout=5)  # the interval, without a request
    finally:
        reporter.close()
    assert first == {"final": False, "reads": 0}
    assert second["reads"] == 1


def test_nothing_without_request_before_the_interval_and_close_is_prompt() -> None:
    lines: list[dict[str, object]] = []
    reporter = StatsReporter(lambda: {"x": 1}, interval=3600, emit=lines.append).start()
    reporter.close()
    assert lines == []


def test_a_failing_collector_is_logged_not_fatal() -> None:
    lines: queue.Queue[dict[str, object]] = queue.Queue()
    calls = iter([RuntimeError("broken counter"), {"ok": 1}])

    def collect() -> dict[str, object]:
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    reporter = StatsReporter(collect, interval=3600, emit=lines.put).start()
    try:
        for _ in range(100):  # the first request meets the broken counter
            if not lines.empty():
                break
            reporter.request()
            time.sleep(0.05)
        assert lines.get(timeout=5) == {"final": False, "ok": 1}
    finally:
        reporter.close()

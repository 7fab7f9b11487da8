"""The daemon's ``stats`` log line while it runs: every ``interval`` seconds and on SIGUSR1.

The counters and latency figures are otherwise only logged when the daemon stops; an
admin watching a long-running cache (``journalctl -u cachefilesd-py``) wants them
without a restart, so a small thread emits the same line periodically (``final=False``)
and whenever :meth:`StatsReporter.request` is called (the SIGUSR1 handler does that;
signal handlers must not log themselves, they may run while the logger holds a lock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger("daemon")

#: seconds between periodic stats lines
DEFAULT_INTERVAL = 600.0

Collect = Callable[[], dict[str, object]]


def _log_stats(fields: dict[str, object]) -> None:
    log.info("stats", **fields)


class StatsReporter:
    """Emits ``collect()`` as a ``stats`` line every ``interval`` seconds and on request."""

    def __init__(
        self,
        collect: Collect,
        interval: float = DEFAULT_INTERVAL,
        emit: Callable[[dict[str, object]], None] = _log_stats,
    ) -> None:
        self._collect = collect
        self._interval = interval
        self._emit = emit
        self._now = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stats", daemon=True)

    def start(self) -> StatsReporter:
        self._thread.start()
        return self

    def request(self) -> None:
        """Ask for a stats line now (safe from a signal handler: only sets an event)."""
        self._now.set()

    def close(self) -> None:
        self._stop.set()
        self._now.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            self._now.wait(self._interval)
            self._now.clear()
            if self._stop.is_set():
                return
            try:
                self._emit({"final": False, **self._collect()})
            except Exception:  # a broken counter must not take the daemon down
                log.exception("stats.failed")

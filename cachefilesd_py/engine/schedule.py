"""Work queues that one slow origin cannot take over: lanes with their own limits.

A frontend has kernel requests to answer with network work: opening a blob asks its
source for the blob's identity, serving a READ fetches bytes. A plain pool of workers
lets one origin that stalls (a server trickling bytes, a dead host) hold every worker
until its deadlines run out, while requests for healthy origins wait behind it.

:class:`LaneScheduler` runs work in *lanes*, one per origin (``Source.origin``: scheme,
host and port, or ``file:``). A fixed set of worker threads takes work from the lanes
in turn (round robin), and a lane may run at most ``per_lane`` items at once: with
more workers than that, every other origin always finds a worker. Work of a lane at
its limit waits in the lane's queue without holding a worker.

The scheduler also bounds what it holds: ``capacity`` items queued or running in all.
It never refuses work (a kernel request that was read must be answered); the caller
asks :meth:`LaneScheduler.has_room` before it takes more work in (the on-demand driver
stops reading the device while there is no room: the kernel keeps the requests).

Lock order: ``LaneScheduler._cond`` is a leaf; work runs without it held.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("engine.schedule")

Work = Callable[[], Any]


class SchedulerClosed(RuntimeError):
    """Work was submitted after :meth:`LaneScheduler.shutdown`."""


class LaneScheduler:
    def __init__(
        self, name: str, *, workers: int, per_lane: int | None = None, capacity: int = 1024
    ) -> None:
        if workers < 1:
            raise ValueError("a scheduler needs at least one worker")
        self.name = name
        self.workers = workers
        #: at most this many items of one lane run at once (default: all workers but
        #: a quarter, at least one, so other lanes always find a worker)
        self.per_lane = per_lane or max(1, workers - max(1, workers // 4))
        self.capacity = capacity
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Work]] = {}
        self._running: dict[str, int] = {}
        #: lanes with queued work and room to run it, in round-robin order
        self._ready: deque[str] = deque()
        self._held = 0
        self._closing = False
        self._cancel = False
        self._threads = [
            threading.Thread(target=self._worker, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # -- submitting ------------------------------------------------------------------

    def submit(self, lane: str, work: Work) -> None:
        """Queue ``work`` in ``lane``. Never blocks and never refuses (see the module
        docstring); raises :class:`SchedulerClosed` after shutdown."""
        with self._cond:
            if self._closing:
                raise SchedulerClosed(f"{self.name} is shut down")
            queue = self._queues.get(lane)
            if queue is None:
                queue = self._queues[lane] = deque()
                self._running[lane] = 0
            queue.append(work)
            self._held += 1
            if len(queue) == 1 and self._running[lane] < self.per_lane:
                self._ready.append(lane)
                self._cond.notify()

    @property
    def held(self) -> int:
        """Items queued or running."""
        with self._cond:
            return self._held

    def has_room(self) -> bool:
        with self._cond:
            return self._held < self.capacity

    def wait_room(self, timeout: float) -> bool:
        """Wait until fewer than ``capacity`` items are held; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._held < self.capacity, timeout)

    def lanes(self) -> dict[str, tuple[int, int]]:
        """Per lane: (queued, running), for stats and tests."""
        with self._cond:
            return {lane: (len(q), self._running[lane]) for lane, q in self._queues.items()}

    # -- workers ---------------------------------------------------------------------

    def _take(self) -> tuple[str, Work] | None:
        with self._cond:
            while True:
                if self._ready:
                    lane = self._ready.popleft()
                    queue = self._queues[lane]
                    work = queue.popleft()
                    self._running[lane] += 1
                    if queue and self._running[lane] < self.per_lane:
                        self._ready.append(lane)  # to the back: the others go first
                        self._cond.notify()  # and another worker may take it
                    return lane, work
                if self._closing and (self._cancel or self._held == 0):
                    return None
                self._cond.wait()

    def _done(self, lane: str) -> None:
        with self._cond:
            self._running[lane] -= 1
            self._held -= 1
            queue = self._queues[lane]
            if queue and self._running[lane] == self.per_lane - 1 and lane not in self._ready:
                self._ready.append(lane)
            elif not queue and self._running[lane] == 0:
                del self._queues[lane], self._running[lane]
            self._cond.notify_all()

    def _worker(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            lane, work = taken
            try:
                work()
            except Exception:  # a bug must never kill a worker silently
                log.exception("worker.crashed", scheduler=self.name, lane=lane)
            finally:
                self._done(lane)

    # -- shutdown --------------------------------------------------------------------

    def shutdown(self, *, wait: bool = True, cancel: bool = False, timeout: float = 60) -> None:
        """No more submits. With ``cancel``, queued work is dropped (only for work that
        answers no kernel request, such as read-ahead); otherwise it runs first."""
        with self._cond:
            self._closing = True
            if cancel:
                self._cancel = True
                dropped = sum(len(q) for q in self._queues.values())
                for q in self._queues.values():
                    q.clear()
                self._ready.clear()
                self._held -= dropped
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                t.join(timeout)

"""A connectivity driver whose network is scripted: the real state machine
(``sources/online.py``), fed path facts by the test instead of by rtnetlink.

It has the methods the engine's offline gate calls (``engine/offline.py``
``Connectivity``), reports fetch outcomes to the tracker exactly as
``sources/netlink.py`` does (the same ``failure_kind``), and calls ``on_transition``
for every change, like the netlink driver. ``link(origin, up)`` stands for the kernel
telling the driver that the route's device went down or came back up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from cachefilesd_py.sources.netlink import failure_kind
from cachefilesd_py.sources.online import (
    ConnectivityTracker,
    Event,
    FetchFailed,
    FetchSucceeded,
    Hysteresis,
    Link,
    LinkChanged,
    Route,
    RouteResolved,
    SourceState,
    Status,
    Transition,
)


class ScriptedConnectivity:
    def __init__(
        self,
        origins: Iterable[str],
        *,
        hysteresis: Hysteresis | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.tracker = ConnectivityTracker(hysteresis or Hysteresis())
        self.on_transition: list[Callable[[Transition], None]] = []
        self.transitions: list[Transition] = []
        self.admitted = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._ifindex: dict[str, int] = {}
        now = clock()
        for i, origin in enumerate(origins, start=100):
            self.tracker.add_source(origin, now)
            self._ifindex[origin] = i

    def link(self, origin: str, up: bool) -> None:
        """The device of ``origin``'s route goes up or down (a netlink fact)."""
        ifindex = self._ifindex[origin]
        self._apply(
            [
                LinkChanged(Link(ifindex, f"veth{ifindex}", up)),
                RouteResolved(origin, Route(ifindex, f"veth{ifindex}")),
            ]
        )

    # -- what the gate calls ------------------------------------------------------------

    def state(self, source: str) -> SourceState:
        with self._lock:
            return self.tracker.state(source)

    def status(self, source: str) -> Status:
        return self.state(source).status

    def may_fetch(self, source: str) -> bool:
        with self._lock:
            return self.tracker.may_fetch(source, self.clock())

    def admit(self, source: str) -> bool:
        with self._lock:
            ok = self.tracker.admit(source, self.clock())
            if ok:
                self.admitted += 1
            else:
                self.refused += 1
            return ok

    def fetch_succeeded(self, source: str) -> None:
        self._apply([FetchSucceeded(source)])

    def fetch_failed(self, source: str, exc: BaseException) -> None:
        kind = failure_kind(exc)
        self._apply([FetchSucceeded(source) if kind is None else FetchFailed(source, kind)])

    def _apply(self, events: list[Event]) -> None:
        out: list[Transition] = []
        with self._lock:
            now = self.clock()
            for ev in events:
                out += self.tracker.apply(ev, now)
            self.transitions += out
        for tr in out:
            for cb in self.on_transition:
                cb(tr)
